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

SIZES = (4096, 16384, 768, 1024)  # query rows, candidates per segment, student, guide widths
SQUARE = 8192  # the square bf16 matmul
REPS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    device = p.left[0].device

    def once() -> float:
        for x in p.cands:
            x.grad = None
        _sync(device)
        t0 = time.perf_counter()
        fn().sum().backward()
        _sync(device)
        return time.perf_counter() - t0

    once()
    return sorted(once() for _ in range(REPS))[REPS // 2]


def matmul_tflops(m: int, k: int, n: int, device: torch.device, square: int = SQUARE) -> float:
    """bf16 ``[m, k] × [k, n]`` rate, the better of that shape and a square one."""
    best = 0.0
    for mm, kk, nn in ((m, k, n), (square,) * 3):
        x = torch.randn(mm, kk, device=device, dtype=torch.bfloat16)
        y = torch.randn(nn, kk, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            x @ y.T
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            x @ y.T
        _sync(device)
        best = max(best, 2 * mm * kk * nn * 10 / (time.perf_counter() - t0) / 1e12)
        del x, y
    return best


def _digits(x: float) -> float:
    return float(f"{x:.3g}")


def speed(
    device: torch.device,
    backend: str = "triton",
    sizes: tuple[int, int, int, int] = SIZES,
    square: int = SQUARE,
) -> dict[str, Any]:
    """The figure on ``device`` (a GPU; smaller ``sizes`` and ``square`` for a dry run on the
    CPU). FLOPs are counted minimally: the student and guide tiles once and dL, dC once,
    ``2·b·(4N)·(3d + d_g)``."""
    b, n, d, d_g = sizes
    p = _problem(b, n, d, d_g, device)
    kernel = _seconds(lambda: tiled([p], backend)[0].loss, p)
    reference = _seconds(lambda: materialised(p), p)
    mm = matmul_tflops(b, d_g, n, device, square)
    rate = 2.0 * b * (4 * n) * (3 * d + d_g) / kernel / 1e12
    return {
        "b": b, "pool": n, "segments": 4, "d": d, "d_g": d_g, "dtype": "bfloat16",
        "kernel_ms": _digits(kernel * 1e3), "reference_bf16_ms": _digits(reference * 1e3),
        "speedup_vs_reference": _digits(reference / kernel),
        "kernel_tflops": _digits(rate), "matmul_bf16_tflops": _digits(mm),
        "fraction_of_matmul": _digits(rate / mm),
    }  # fmt: skip
