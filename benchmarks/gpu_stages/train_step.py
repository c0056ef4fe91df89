"""Stage 6: one end-to-end training step of a tiny random BERT, without Ray or MLflow: the
per-worker step training runs, gist_ray.train.step.training_step (embed under its autocast,
``GistLoss`` with backend ``auto`` and ``compute_dtype`` ``auto``, backward; under --smoke the
kernels through the interpreter), once plainly and once with gradient caching
(gist_ray.train.gradcache: embed without a graph in mini-batches, loss and its gradients on the
embeddings, re-embed each mini-batch and backpropagate), then an optimizer step.

The two ways must agree (no dropout, so they compute the same function): the loss, and the
parameter gradients as a whole (cosine of the flattened gradients, and their norms).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from gpu_stages.common import Ctx, train_backend
from gpu_stages.tiny_bert import Probe, build, sentences

ROWS, MINI = 24, 8


def step(encoder, loss_fn, columns, guide, mini: int) -> dict:
    """gist_ray.train.step.training_step itself (the step training runs, with or without
    gradient caching), with the dtypes the loss and its op receive recorded."""
    from gist_ray.train.step import training_step

    encoder.zero_grad(set_to_none=True)
    with Probe(loss_fn) as probe:
        loss, stats = training_step(encoder, loss_fn, columns, guide, mini)
    grads = [p.grad.detach().float().flatten() for p in encoder.parameters() if p.grad is not None]
    flat = torch.cat(grads)
    assert torch.isfinite(loss), "non-finite loss"
    assert torch.isfinite(flat).all(), "non-finite parameter gradient"
    return {"loss": float(loss), "grad": flat, "params_with_grad": len(grads),
            "loss_input": probe.loss_input, "kernel_input": probe.kernel_input,
            "mask_frac_all": round(float(stats["mask_frac/all"]), 4)}  # fmt: skip


def run(ctx: Ctx) -> None:
    from gist_ray.loss import GistLoss
    from gist_ray.models.encoder import Encoder

    device = torch.device(ctx.dev)
    with tempfile.TemporaryDirectory(dir=ctx.out) as tmp:
        encoder = Encoder(build(Path(tmp) / "student", ctx.dev, hidden=64, seed=1))
    encoder.train()
    columns = [sentences(ROWS, 100 + j) for j in range(3)]  # anchor, positive, negative
    gen = torch.Generator().manual_seed(0)
    guide = [
        torch.nn.functional.normalize(torch.randn(ROWS, 48, generator=gen), dim=-1).half()
        for _ in columns
    ]  # a 16-bit guide cache, on the CPU until the step moves it
    loss_fn = GistLoss(backend=train_backend(ctx), margin=0.05, compute_dtype="auto")
    runs: dict[str, dict] = {}

    def one(name: str, mini: int) -> dict:
        runs[name] = step(encoder, loss_fn, columns, guide, mini)
        return {k: v for k, v in runs[name].items() if k != "grad"}

    ctx.case("plain step", lambda: one("plain", 0))
    ctx.case(f"gradient caching step (mini-batch {MINI})", lambda: one("cached", MINI))

    def agree() -> dict:
        plain, cached = runs["plain"], runs["cached"]
        g, h = plain["grad"], cached["grad"]
        cosine = float(torch.nn.functional.cosine_similarity(g, h, dim=0))
        norms = float(h.norm() / g.norm())
        loss_diff = abs(plain["loss"] - cached["loss"]) / max(abs(plain["loss"]), 1e-6)
        tight = device.type == "cpu"  # float32 throughout; CUDA runs the encoder in bf16
        assert cosine >= (0.9999 if tight else 0.99), f"gradient cosine {cosine:.5f}"
        assert abs(norms - 1) <= (1e-3 if tight else 5e-2), f"gradient norm ratio {norms:.4f}"
        assert loss_diff <= (1e-4 if tight else 2e-2), f"loss differs by {loss_diff:.3g}"
        return {"grad_cosine": round(cosine, 6), "grad_norm_ratio": round(norms, 5),
                "loss_rel_diff": loss_diff}  # fmt: skip

    ctx.case("gradient caching equals the plain step", agree)

    def optimizer_step() -> dict:
        opt = torch.optim.AdamW(encoder.parameters(), lr=1e-3)
        before = step(encoder, loss_fn, columns, guide, 0)
        opt.step()
        after = step(encoder, loss_fn, columns, guide, 0)
        return {"loss_before": round(before["loss"], 5), "loss_after": round(after["loss"], 5)}

    ctx.case("optimizer step", optimizer_step)
