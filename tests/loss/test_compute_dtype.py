"""``compute_dtype``: the student's rows are cast to it at the loss front end, before the
gather, whatever the model's last module returns (under CUDA autocast LayerNorm and normalize
return float32). The decision for CUDA is asked of gist_ray.loss.select with the device named,
so these run on the CPU: the cast rows reach the backend (a recording kernel through the real
custom op) and cross a real 2-process gloo all-gather in bfloat16; and float32 (``auto`` on the
CPU) changes nothing, bit for bit."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gist_ray.core.distributed as gdist
import tests.loss.faulty as faulty
from gist_ray.loss import GistLoss, compute_dtype_for

B, D_IN, D, D_G = 12, 10, 16, 12


def _encoder() -> torch.nn.Module:
    """A model whose last module is a LayerNorm: float32 rows, as under CUDA autocast."""
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, 24), torch.nn.Tanh(), torch.nn.Linear(24, D), torch.nn.LayerNorm(D)
    )


def _batch(seed: int = 3, k: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(B, D_IN, generator=g) for _ in range(2 + k)]
    proj = torch.randn(D_IN, D_G, generator=g)
    gx = [xi @ proj + 0.7 * torch.randn(B, D_G, generator=g) for xi in x]
    return x, [t.half() for t in gx]  # the guide cache is 16-bit


def test_fp32_rows_reach_the_loss_in_bf16_when_the_device_is_cuda():
    dtype = compute_dtype_for("auto", "cuda")
    assert dtype == torch.bfloat16
    kernel = faulty.Recording()
    loss_fn = GistLoss(temperature=0.05, backend=faulty.register(kernel), compute_dtype=dtype)
    model, (x, gx) = _encoder(), _batch()
    emb = [model(t) for t in x]
    assert {e.dtype for e in emb} == {torch.float32}
    loss, _ = loss_fn(emb, gx)
    loss.backward()
    # anchors, positives (left) and the candidate tensors, every one of them bfloat16
    assert kernel.calls == 1 and len(kernel.seen) == 5
    assert {dt for dt, _ in kernel.seen} == {torch.bfloat16}
    grads = [p.grad for p in model.parameters()]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # The cast is the only difference from feeding bfloat16 rows: the same loss, bit for bit.
    same = GistLoss(temperature=0.05, backend="chunked")([e.detach().bfloat16() for e in emb], gx)
    assert torch.equal(loss.detach(), same[0])


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_float32_on_the_cpu_changes_nothing(backend):
    """``auto`` on the CPU is float32: the results of float32 rows are those without the
    setting, bit for bit (loss, statistics, gradients)."""
    x, gx = _batch(seed=11, k=2)
    gx = [g.float() for g in gx]
    results = []
    for setting in (None, "auto", "float32", torch.float32):
        model = _encoder()
        loss_fn = GistLoss(temperature=0.05, backend=backend, compute_dtype=setting)
        loss, stats = loss_fn([model(t) for t in x], gx)
        loss.backward()
        results.append((loss.detach(), stats, [p.grad for p in model.parameters()]))
    base_loss, base_stats, base_grads = results[0]
    for loss, stats, grads in results[1:]:
        assert torch.equal(loss, base_loss)
        assert all(torch.equal(stats[k], v) for k, v in base_stats.items())
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, base_grads))


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        seen: list[tuple[torch.dtype, torch.dtype, int, bool]] = []

        def gather(t: torch.Tensor) -> torch.Tensor:  # the real gather, watched
            rows = gdist.all_gather_with_grad(t)
            seen.append((t.dtype, rows.dtype, rows.shape[0], t.requires_grad))
            return rows

        model, (x, gx) = _encoder(), _batch()
        b = B // world
        local = slice(rank * b, (rank + 1) * b)
        loss_fn = GistLoss(
            temperature=0.05, backend="chunked", gather=gather,
            compute_dtype=compute_dtype_for("auto", "cuda"),
        )  # fmt: skip
        loss, _ = loss_fn([model(t[local]) for t in x], [g[local] for g in gx])
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        dist.all_reduce(loss.detach())
        for g in grads:  # what training does: the average over workers
            dist.all_reduce(g)
        if rank == 0:
            torch.save(
                {"seen": seen, "loss": loss / world, "grads": [g / world for g in grads]}, out
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_gather_moves_16_bit_rows(tmp_path):
    """Two gloo processes: every candidate tensor is cast before the all-gather (so it sends
    and receives bfloat16 rows, the student's float32 LayerNorm output included), and the two
    workers equal one process with the same setting (the cast is row-wise; the gather's
    backward sums bfloat16 gradients)."""
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(
        _worker, args=(2, tempfile.mktemp(dir=tmp_path), out), nprocs=2, join=True,
        start_method="spawn",
    )  # fmt: skip
    two = torch.load(out)
    # positives, anchors, negatives (with gradient), then their guide twins (the guide's rows
    # are cast too: both operands of a GEMM share one dtype)
    assert [grad for *_, grad in two["seen"]] == [True] * 3 + [False] * 3
    assert all(sent == got == torch.bfloat16 and rows == B for sent, got, rows, _ in two["seen"])
    model, (x, gx) = _encoder(), _batch()
    one = GistLoss(temperature=0.05, backend="chunked", compute_dtype=torch.bfloat16)
    loss, _ = one([model(t) for t in x], gx)
    loss.backward()
    torch.testing.assert_close(two["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for g2, p in zip(two["grads"], model.parameters()):
        err = ((g2 - p.grad).norm() / p.grad.norm()).item()
        assert err < 2e-2, f"relative gradient error {err:.2e}"


def test_gather_seam_sees_the_compute_dtype_on_one_process():
    seen = []
    loss_fn = GistLoss(gather=lambda t: seen.append(t.dtype) or t, compute_dtype="bfloat16")
    x, gx = _batch()
    loss_fn([t[:, :D_IN] @ torch.randn(D_IN, D) for t in x], gx)[0].item()
    assert seen == [torch.bfloat16] * 6  # student candidates, then the guide's
