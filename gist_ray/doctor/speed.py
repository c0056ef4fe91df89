"""A short speed figure on one GPU: the tiled loss (the Triton kernel through the custom op),
forward and backward in bf16, against what a plain PyTorch user writes (every ``b × N`` matrix
materialised, bf16 GEMMs, float32 masked log-sum-exp) and against a plain bf16 matmul, all
measured in the same run on the same device. Not a benchmark (benchmarks/gpu_check.py is): a
sanity figure that shows a kernel running far below the hardware."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from gist_ray.loss.op import tiled
from gist_ray.loss.plan import DIAG_EXCLUDE, DIAG_PROTECT, Problem, build_segments

B, N, D, D_G = 4096, 16384, 768, 1024  # query rows, candidates per segment, widths
REPS = 3


def _problem(b: int, n: int, d: int, d_g: int, device: torch.device) -> Problem:
    """Segments AP, AA, PP, AN1 over three candidate tensors of ``n`` random unit rows (bf16);
    the local rows are the first ``b`` of the pool."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rows(r: int, dim: int, unit: bool = True) -> torch.Tensor:
        x = torch.randn(r, dim, device=device, generator=gen)
        return (torch.nn.functional.normalize(x, dim=1) if unit else x).bfloat16()

    cands = [rows(n, d).requires_grad_() for _ in range(3)]  # positive, anchor, negative
    guide = [rows(n, d_g, unit=False) for _ in range(3)]
    segments, _ = build_segments(1, True, True)
    return Problem((cands[1][:b], cands[0][:b]), tuple(cands), (guide[1][:b], guide[0][:b]),
                   tuple(guide), segments, 0, 0.05, 0.0, "absolute")  # fmt: skip


def materialised(p: Problem) -> torch.Tensor:
    """Per-row loss with every ``b × N`` matrix in memory (bf16 products, float32 softmax)."""
    rows = torch.arange(p.rows, device=p.left[0].device)
    t, scores = None, []
    for seg in p.segments:
        gl, gc = p.guide_left[seg.left], p.guide_cands[seg.cand]
        g = (gl @ gc.T).float() / (gl.float().norm(dim=1)[:, None] * gc.float().norm(dim=1))
        if t is None:
            t = g[rows, p.offset + rows].clone()
        drop = g > (t - p.margin)[:, None]
        if seg.diag == DIAG_PROTECT:
            drop[rows, p.offset + rows] = False
        if seg.diag == DIAG_EXCLUDE:
            drop[rows, p.offset + rows] = True
        s = (p.left[seg.left] @ p.cands[seg.cand].T).float() / p.temperature
        scores.append(s.masked_fill(drop, -math.inf))
    pos = scores[0][rows, p.offset + rows]
    return torch.logsumexp(torch.cat(scores, 1), 1) - pos


def _seconds(fn: Callable[[], torch.Tensor], p: Problem) -> float:
    """Median wall time of forward + backward (after one warm-up run: compilation)."""

    def once() -> float:
        for x in p.cands:
            x.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn().sum().backward()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()
    return sorted(once() for _ in range(REPS))[REPS // 2]


def matmul_tflops(m: int, k: int, n: int, device: torch.device) -> float:
    """bf16 ``[m, k] × [k, n]`` rate, the better of that shape and a square 8192³."""
    best = 0.0
    for mm, kk, nn in ((m, k, n), (8192, 8192, 8192)):
        x = torch.randn(mm, kk, device=device, dtype=torch.bfloat16)
        y = torch.randn(nn, kk, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            x @ y.T
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            x @ y.T
        torch.cuda.synchronize()
        best = max(best, 2 * mm * kk * nn * 10 / (time.perf_counter() - t0) / 1e12)
        del x, y
    return best


def speed(device: torch.device, backend: str = "triton") -> dict[str, Any]:
    """The figure on ``device`` (CUDA). FLOPs are counted minimally: the student and guide tiles
    once and dL, dC once, ``2·b·(4N)·(3d + d_g)``."""
    p = _problem(B, N, D, D_G, device)
    kernel = _seconds(lambda: tiled([p], backend)[0].loss, p)
    reference = _seconds(lambda: materialised(p), p)
    mm = matmul_tflops(B, D_G, N, device)
    rate = 2.0 * B * (4 * N) * (3 * D + D_G) / kernel / 1e12
    return {
        "b": B, "pool": N, "segments": 4, "d": D, "d_g": D_G, "dtype": "bfloat16",
        "kernel_ms": round(kernel * 1e3, 2), "reference_bf16_ms": round(reference * 1e3, 2),
        "speedup_vs_reference": round(reference / kernel, 2),
        "kernel_tflops": round(rate, 1), "matmul_bf16_tflops": round(mm, 1),
        "fraction_of_matmul": round(rate / mm, 3),
    }  # fmt: skip
