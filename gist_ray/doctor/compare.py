"""One correctness check: a tiled backend against the ``reference`` oracle on one case, forward
and backward (docs/loss.md "Backends").

Both sides get the same inputs (gist_ray.doctor.cases) and the same objective, the Matryoshka-
weighted sum over widths of ``Σ_i r_i · loss_i`` with random per-row weights ``r_i`` (so a
backward that ignores or mixes up the upstream gradient of a row is caught). Compared: every
row's loss of every width, the masked counts of every segment (exactly: the guide is dyadic),
and the gradients of the raw student rows (what reaches the model). The reference runs in float32
on the same dtype-rounded inputs, a block of rows at a time (its memory is rows × pool).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from gist_ray.doctor.cases import Case, make_pool, problems
from gist_ray.doctor.settings import Settings
from gist_ray.loss.plan import BackendOutput, Problem
from gist_ray.loss.reference import reference_backend

# A backend under test: problems (one per Matryoshka width) -> one output per width.
Backend = Callable[[Sequence[Problem]], list[BackendOutput]]

# Relative tolerance of losses and gradients: float32 backends differ from the reference in
# summation order only; on CUDA the kernels' float32 GEMMs are tf32x3 (about float32, looser);
# 16-bit kernels round P and the gradients to 16 bits.
TOLERANCE = {
    ("cpu", torch.float32): 1e-4,
    ("cuda", torch.float32): 1e-3,
    ("cpu", torch.float16): 2e-2,
    ("cuda", torch.float16): 2e-2,
    ("cpu", torch.bfloat16): 5e-2,
    ("cuda", torch.bfloat16): 5e-2,
}
REFERENCE_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 26}  # per block of reference rows


def tolerance(device: torch.device, dtype: torch.dtype) -> float:
    return TOLERANCE[(device.type, dtype)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    """Max abs error over the expected's max magnitude; inf when ``actual`` is not finite."""
    actual, expected = actual.detach().float(), expected.detach().float()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.abs().max().item(), floor)
    return (actual - expected).abs().max().item() / scale


def _reference(ps: list[Problem], upstream: torch.Tensor):
    """Loss ``[widths, b]``, masked counts, and the gradients w.r.t. every problem's left and
    candidate tensors of ``Σ_w Σ_i upstream[w, i] · loss[w, i]``, a block of rows at a time."""
    b, pool = ps[0].rows, ps[0].pool
    dev = ps[0].left[0].device
    block = max(1, REFERENCE_ELEMS[dev.type] // (pool * len(ps[0].segments)))
    detached = [([x.detach().requires_grad_() for x in q.left],
                 [x.detach().requires_grad_() for x in q.cands]) for q in ps]  # fmt: skip
    losses, masked = torch.zeros(len(ps), b, device=dev), []
    for r0 in range(0, b, block):
        rows = slice(r0, min(b, r0 + block))
        total = 0.0
        for w, (q, (left, cands)) in enumerate(zip(ps, detached)):
            sub = replace(
                q, left=(left[0][rows], left[1][rows]), cands=tuple(cands),
                guide_left=(q.guide_left[0][rows], q.guide_left[1][rows]),
                offset=q.offset + r0,
            )  # fmt: skip
            out = reference_backend(sub)
            losses[w, rows] = out.loss.detach()
            if w == 0:
                masked.append(out.masked)
            total = total + (out.loss * upstream[w, rows]).sum()
        total.backward()
    tensors = [t for q in ps for t in (*q.left, *q.cands)]
    grads = [t.grad for left, cands in detached for t in (*left, *cands)]
    return losses, torch.cat(masked), tensors, grads


def _zeros_for_none(grads, leaves) -> list[torch.Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def check_case(
    case: Case,
    dtype: torch.dtype,
    device: torch.device,
    settings: Settings,
    backend: Backend,
    seed: int,
) -> dict[str, Any]:
    """The errors of ``backend`` against the reference on ``case`` (a record of the report;
    ``ok`` says whether it is within tolerance; an exception becomes ``error``)."""
    tol = tolerance(device, dtype)
    record: dict[str, Any] = {"case": case.name, "dtype": str(dtype).removeprefix("torch."),
                              "b": case.b, "pool": case.pool, "offset": case.offset,
                              "d": case.d, "d_g": case.d_g, "chunk": case.chunk,
                              "chunks": case.chunks, "tolerance": tol}  # fmt: skip
    t0 = time.perf_counter()
    try:
        pool = make_pool(case, settings.negatives, seed, device)
        leaves = list(pool.student.values())
        gen = torch.Generator().manual_seed(seed + 1)
        widths = len(settings.matryoshka_dims) or 1
        upstream = (0.5 + torch.rand(widths, case.b, generator=gen)).to(device)
        weights = settings.weights
        outs = backend(problems(pool, case, settings, dtype))
        objective = sum(
            c * (o.loss * upstream[w]).sum() for w, (c, o) in enumerate(zip(weights, outs))
        )
        got = _zeros_for_none(torch.autograd.grad(objective, leaves, allow_unused=True), leaves)
        ref_ps = problems(pool, case, settings, dtype)
        ref_loss, ref_masked, tensors, grads = _reference(ref_ps, upstream)
        per_width = len(grads) // widths
        pairs = [(t, g * weights[i // per_width]) for i, (t, g) in enumerate(zip(tensors, grads))
                 if g is not None]  # fmt: skip
        expected = torch.autograd.grad(
            [t for t, _ in pairs], leaves, grad_outputs=[g for _, g in pairs], allow_unused=True
        )
        expected = _zeros_for_none(expected, leaves)
        loss_err = max(rel_err(o.loss, ref_loss[w], floor=1.0) for w, o in enumerate(outs))
        grad_err = max(rel_err(g, e) for g, e in zip(got, expected))
        mask_rows = int((outs[0].masked != ref_masked).any(1).sum())
        record.update(
            loss_err=loss_err, grad_err=grad_err, mask_mismatch_rows=mask_rows,
            masked_fraction=float(ref_masked.sum()) / (case.b * case.pool * ref_masked.shape[1]),
            ok=loss_err <= tol and grad_err <= tol and mask_rows == 0,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a failing kernel is a result, not a crash
        record.update(ok=False, error=one_line(e), traceback=traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record
