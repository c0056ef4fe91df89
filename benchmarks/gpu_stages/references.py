"""Stage 4: what a plain PyTorch user would write, timed against the kernel AND compared with it.

Two materialised references on the very same bf16 problem (b query rows, N candidates per
segment, the largest N from --n down that both fit): every ``b × N`` matrix in fp32 (fp32
GEMMs, no TF32), and with bf16 GEMMs (bf16 logits; float32 masked log-sum-exp: what autocast
gives). The kernel's loss rows and gradients are compared with the fp32 reference (held to the
unit tests' bf16 tolerance), the bf16 reference's too (for scale). Targets: the kernel >= 5×
faster than the fp32 reference, >= 2× than the bf16 one.
"""

from __future__ import annotations

import math
import time

import torch

from gpu_stages.common import (
    Ctx,
    big_problem,
    clear_grads,
    free,
    leaves,
    rel_err,
    sync,
    triton_rows,
)

TOL_BF16 = 5e-2  # tests/loss/harness.py TOL[bfloat16]


class _Rows:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


def materialised(p, dtype: torch.dtype) -> _Rows:
    """Every b × N matrix in ``dtype`` (bf16 GEMMs give bf16 logits), masks, float32 masked
    log-sum-exp minus the positive's logit; differentiable to ``p``'s leaves."""
    rows = torch.arange(p.rows, device=p.left[0].device)
    t = None
    scores = []
    for seg in p.segments:
        gl, gc = p.guide_left[seg.left].to(dtype), p.guide_cands[seg.cand].to(dtype)
        g = (gl @ gc.T).float() / (gl.float().norm(dim=1)[:, None] * gc.float().norm(dim=1))
        if t is None:
            t = g[rows, p.offset + rows].clone()
        s = (p.left[seg.left].to(dtype) @ p.cands[seg.cand].to(dtype).T).float() / p.temperature
        drop = g > (t - p.margin)[:, None]
        del g
        if seg.diag == 1:
            drop[rows, p.offset + rows] = False
        if seg.diag == 2:
            drop[rows, p.offset + rows] = True
        scores.append(s.masked_fill_(drop, -math.inf))
    pos = scores[0][rows, p.offset + rows]
    return _Rows(torch.logsumexp(torch.cat(scores, 1), 1) - pos)


def run_once(fn, p, weights: torch.Tensor) -> dict:
    """Forward and backward of ``Σ w_i·loss_i`` once: times, loss rows, gradients (copies)."""
    clear_grads(p)
    sync()
    t0 = time.perf_counter()
    loss = fn(p).loss
    sync()
    t1 = time.perf_counter()
    (loss * weights).sum().backward()
    sync()
    t2 = time.perf_counter()
    return {"fwd_s": t1 - t0, "bwd_s": t2 - t1, "total_s": t2 - t0, "loss": loss.detach(),
            "grads": [x.grad.clone() for x in leaves(p)]}  # fmt: skip


def compare(got: dict, want: dict) -> dict:
    return {
        "loss_rel_err": rel_err(got["loss"], want["loss"]),
        "grad_rel_err": max(rel_err(g, w) for g, w in zip(got["grads"], want["grads"])),
    }


def run(ctx: Ctx) -> None:
    a = ctx.args
    b, d, d_g = a.b, a.d, a.d_guide

    def attempt(n: int) -> dict:
        p = big_problem(b, n, d, d_g, ctx.dev)
        weights = torch.randn(b, device=ctx.dev)
        run_once(triton_rows, p, weights)  # warm (compilation)
        tri = min((run_once(triton_rows, p, weights) for _ in range(max(a.reps, 2))),
                  key=lambda r: r["total_s"])  # fmt: skip
        ref32 = run_once(lambda q: materialised(q, torch.float32), p, weights)
        ref16 = run_once(lambda q: materialised(q, torch.bfloat16), p, weights)
        vs32, ref16_vs32 = compare(tri, ref32), compare(ref16, ref32)
        assert vs32["loss_rel_err"] <= TOL_BF16, f"loss differs from fp32 reference: {vs32}"
        assert vs32["grad_rel_err"] <= TOL_BF16, f"gradients differ from fp32 reference: {vs32}"
        s32, s16 = ref32["total_s"] / tri["total_s"], ref16["total_s"] / tri["total_s"]
        return {
            "b": b,
            "n_per_segment": n,
            "segments": 4,
            "d": d,
            "d_g": d_g,
            "triton_s": round(tri["total_s"], 4),
            "fp32_reference_s": round(ref32["total_s"], 4),
            "bf16_reference_s": round(ref16["total_s"], 4),
            "speedup_vs_fp32": round(s32, 2),
            "speedup_vs_bf16": round(s16, 2),
            "triton_vs_fp32_reference": vs32,
            "bf16_reference_vs_fp32_reference": ref16_vs32,
        }

    def largest_fitting() -> dict:
        tried = []
        for n in (a.n, a.n // 2, a.n // 4, a.n // 8, a.n // 16):
            if ctx.left() < 5:
                break
            try:
                return {**attempt(n), "tried_oom": tried}
            except torch.OutOfMemoryError:
                tried.append(n)
            free()  # after the except clause: its traceback no longer pins the tensors
        raise RuntimeError(f"no N fitted both references (out of memory at {tried})")

    ctx.case("materialised fp32 and bf16 references vs the kernel", largest_fitting)
