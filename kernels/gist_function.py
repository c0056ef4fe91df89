"""Autograd wrapper and launchers of the GIST Triton kernels (:mod:`.gist_kernels`).

Forward: one launch of :func:`gist_fwd_kernel` per segment over a (row block × column split)
grid. Each program walks its split's column tiles with an online max/sum and writes a partial
lse, masked count and above count; the splits are combined here (``logsumexp`` over a
``[splits, b]`` buffer). Splitting the columns keeps the GPU full when ``b`` is small.

Backward: per segment and column chunk, :func:`gist_prob_kernel` recomputes the masked softmax
``P`` of the chunk (student and guide tiles fused, as in the forward) into a ``b × chunk``
buffer, and two cuBLAS GEMMs turn it into ``dL += P·C`` and ``dC = Pᵀ·L`` (scaled by
``dlse/τ``). A fully fused dL/dC kernel would need a ``[BLOCK_M, d]`` fp32 accumulator per
program: at d = 768 (padded to 1024) that does not fit in registers, and its two recomputes of
every tile would cost more than the GEMMs. Memory stays O(b·chunk + (b + N)(d + d_g)).

Tile shapes: on CUDA autotuned over a small table (key: d, d_g and the dtypes), so each GPU picks
what fits its shared memory; small problems and the interpreter use fixed shapes.

This module imports torch and triton only (no Ray, no MLflow); segments are any objects with
``left``, ``start``, ``size`` and ``diag`` attributes, such as ``gist_ray.loss.plan.Segment``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Protocol

import torch
import triton

from .gist_kernels import gist_fwd_kernel, gist_prob_kernel

# Decided when gist_kernels was imported (TRITON_INTERPRET=1 at that moment): kernels run on CPU
# tensors through numpy, and tiles are upcast to fp32 before tl.dot (bf16 dot is wrong there).
INTERPRETED = type(gist_fwd_kernel).__name__ == "InterpretedFunction"

# tl.dot precision for fp32 inputs on a GPU: "tf32x3" (default, ~fp32 accuracy on tensor cores),
# "ieee" (exact fp32 FMA, slow) or "tf32" (fast, ~1e-3 relative: flips guide masks near the
# threshold and moves s/τ by ~0.1 at τ = 0.01). fp16/bf16 tiles always use the native dot.
FP32_DOT = os.environ.get("GIST_RAY_FP32_DOT", "tf32x3")

# Backward P buffer: at most this many elements (256 MiB in bf16). Under the interpreter a small
# chunk lets tests with N < 100 cross chunk seams.
P_ELEMS = 1 << 27
INTERPRET_CHUNK = 64


class SegmentLike(Protocol):
    left: int  # 0: anchor rows of `left`, 1: positive rows
    start: int  # first candidate row
    size: int  # number of candidate rows
    diag: int  # 0 none, 1 protect (the positive), 2 exclude (the self-pair)


def _cfg(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    kw = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "BLOCK_KG": k}
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# Autotuning candidates: 16-bit shapes first; the small ones serve fp32 and small-smem GPUs (the
# autotuner skips configs that do not fit). Tuned per (d, d_g, dtypes), on the first problem of
# at least AUTOTUNE_MIN_WORK tile entries; smaller problems (tests, checks) use a fixed shape
# that fits every sm80+ GPU, so they pay one compile instead of five.
CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 32, 8, 4),
    _cfg(64, 64, 32, 4, 3),
]
FIXED = {2: _cfg(128, 64, 64, 4, 3), 4: _cfg(64, 64, 32, 4, 3)}  # by element size
AUTOTUNE_MIN_WORK = 1 << 26
AUTOTUNE = os.environ.get("GIST_RAY_AUTOTUNE", "1") != "0"
# Interpreter tiles. It costs ~40 ms per program: tests use b, N < 100, so 32-wide tiles give a
# few programs per launch yet still cross row, column, split, chunk and K (d > 32) seams.
INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_KG": 32}

if not INTERPRETED:
    _tuned = {
        k: triton.autotune(configs=CONFIGS, key=["d", "d_g"])(k)
        for k in (gist_fwd_kernel, gist_prob_kernel)
    }


def _launch(kernel, grid, args: tuple, work: int, dtype: torch.dtype, **constexprs) -> None:
    """Launch ``kernel`` on ``grid(meta)``: fixed tiles under the interpreter and for small
    problems (``work`` = rows × columns), autotuned ones otherwise."""
    if INTERPRETED:
        kernel[grid(INTERPRET_BLOCKS)](*args, **constexprs, **INTERPRET_BLOCKS)
    elif AUTOTUNE and work >= AUTOTUNE_MIN_WORK:
        _tuned[kernel][grid](*args, **constexprs)
    else:
        cfg = FIXED[2 if dtype.itemsize == 2 else 4]
        kernel[grid(cfg.kwargs)](
            *args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )


def _precision(student: torch.dtype, guide: torch.dtype) -> dict:
    """UPCAST and the tl.dot precisions of the student and guide tiles (their dtypes may differ,
    e.g. a bf16 student with a cached fp32 guide)."""
    if INTERPRETED:
        return {"UPCAST": True, "PRECISION": "ieee", "PRECISION_G": "ieee"}

    def prec(dtype: torch.dtype) -> str:
        return FP32_DOT if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit

    return {"UPCAST": False, "PRECISION": prec(student), "PRECISION_G": prec(guide)}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _column_splits(b: int, size: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns per split) so that about 2 programs per SM run for this segment."""
    unit = 32 if INTERPRETED else 256  # a multiple of every BLOCK_N
    row_blocks = triton.cdiv(b, 32 if INTERPRETED else 128)
    target = 2 if INTERPRETED else 2 * _num_sms(device)
    splits = max(1, min(triton.cdiv(target, row_blocks), triton.cdiv(size, unit)))
    per = triton.cdiv(triton.cdiv(max(size, 1), splits), unit) * unit
    return triton.cdiv(max(size, 1), per), per


def _check(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    if INTERPRETED and dev.type != "cpu":
        raise RuntimeError("gist kernels run under TRITON_INTERPRET=1: pass CPU tensors")
    if not INTERPRETED and dev.type != "cuda":
        raise RuntimeError(
            "the triton backend needs CUDA tensors (for CPU tensors use backend='chunked', or set "
            "TRITON_INTERPRET=1 before gist_ray.kernels is first imported)"
        )
    for t in tensors:
        if t.device != dev or t.stride(-1) != 1:
            raise ValueError("gist kernels need row-major tensors on one device")
    if tensors[0].dtype != tensors[1].dtype:
        raise ValueError(f"left is {tensors[0].dtype} but cand is {tensors[1].dtype}")


def gist_forward(
    left: torch.Tensor,
    cand: torch.Tensor,
    guide_left: torch.Tensor,
    guide_cand: torch.Tensor,
    limit: torch.Tensor,
    pos_logit: torch.Tensor,
    segments: Sequence[SegmentLike],
    offset: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row lse over kept candidates, masked counts ``[b, S]`` and above counts (int64)."""
    _check(left, cand, guide_left, guide_cand)
    b, d, d_g, dev = limit.shape[0], left.shape[1], guide_left.shape[1], left.device
    plan = [_column_splits(b, seg.size, dev) for seg in segments]
    parts = sum(n for n, _ in plan)
    lse_part = torch.empty(parts, b, dtype=torch.float32, device=dev)
    masked_part = torch.empty(parts, b, dtype=torch.int32, device=dev)
    above_part = torch.empty(parts, b, dtype=torch.int32, device=dev)
    limit, pos = limit.float().contiguous(), pos_logit.float().contiguous()
    flags = _precision(left.dtype, guide_left.dtype)
    row0 = 0
    for seg, (splits, per) in zip(segments, plan):

        def grid(meta, splits=splits):
            return (triton.cdiv(b, meta["BLOCK_M"]), splits)

        args = (
            left, guide_left, cand, guide_cand, limit, pos, lse_part, masked_part, above_part,
            b, d, d_g, seg.left * b, seg.start, seg.size, per, offset, row0, 1.0 / temperature,
            left.stride(0), guide_left.stride(0), cand.stride(0), guide_cand.stride(0),
        )  # fmt: skip
        _launch(gist_fwd_kernel, grid, args, b * seg.size, left.dtype, DIAG=seg.diag, **flags)
        row0 += splits
    lse = torch.logsumexp(lse_part, dim=0)  # all -inf stays -inf (no NaN)
    bounds = torch.tensor([0] + [n for n, _ in plan], device=dev).cumsum(0).tolist()
    masked = torch.stack(
        [masked_part[lo:hi].sum(0, dtype=torch.int64) for lo, hi in zip(bounds, bounds[1:])], 1
    )
    return lse, masked, above_part.sum(0, dtype=torch.int64)


def gist_backward(
    dlse: torch.Tensor,
    left: torch.Tensor,
    cand: torch.Tensor,
    guide_left: torch.Tensor,
    guide_cand: torch.Tensor,
    limit: torch.Tensor,
    lse: torch.Tensor,
    segments: Sequence[SegmentLike],
    offset: int,
    temperature: float,
    need_left: bool = True,
    need_cand: bool = True,
    chunk: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_i dlse_i · lse_i`` w.r.t. ``left`` and ``cand`` (in their dtype)."""
    b, d, d_g = lse.shape[0], left.shape[1], guide_left.shape[1]
    dev, dtype = left.device, left.dtype
    weight = dlse.float() / temperature  # chain rule through s = L·Cᵀ/τ
    # Scale the rows by weight / max|weight| in the input dtype (no fp16 underflow), and put
    # max|weight| back on the fp32/out side.
    wmax = weight.abs().max().clamp_min(1e-30)
    left_w = (left.float().view(2, b, d) * (weight / wmax)[None, :, None]).to(dtype).view(2 * b, d)
    lse = torch.where(torch.isinf(lse), 0.0, lse).float().contiguous()
    limit = limit.float().contiguous()
    if chunk is None:
        auto = max(256, min(1 << 16, P_ELEMS // max(b, 1)) // 256 * 256)
        chunk = INTERPRET_CHUNK if INTERPRETED else auto
    prob = torch.empty(b * min(chunk, max(s.size for s in segments)), dtype=dtype, device=dev)
    dleft = torch.zeros(2 * b, d, dtype=torch.float32, device=dev) if need_left else None
    dcand = torch.zeros_like(cand) if need_cand else None
    flags = _precision(dtype, guide_left.dtype)
    for seg in segments:
        rows = slice(seg.left * b, (seg.left + 1) * b)
        for lo in range(0, seg.size, chunk):
            width = min(chunk, seg.size - lo)
            p = prob[: b * width].view(b, width)

            def grid(meta, width=width):
                return (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_N"]))

            args = (
                left, guide_left, cand, guide_cand, limit, lse, p, b, d, d_g, seg.left * b,
                seg.start, lo, lo + width, offset, 1.0 / temperature,
                left.stride(0), guide_left.stride(0), cand.stride(0), guide_cand.stride(0),
                p.stride(0),
            )  # fmt: skip
            _launch(gist_prob_kernel, grid, args, b * width, dtype, DIAG=seg.diag, **flags)
            cols = slice(seg.start + lo, seg.start + lo + width)
            if dleft is not None:
                dleft[rows] += torch.mm(p, cand[cols])
            if dcand is not None:
                torch.mm(p.T, left_w[rows], out=dcand[cols])
                dcand[cols].mul_(wmax)
    if dleft is not None:
        dleft = (dleft * weight.repeat(2).unsqueeze(1)).to(dtype)
    return dleft, dcand


class GistFunction(torch.autograd.Function):
    """``(left, cand, guide_left, guide_cand, limit, pos_logit, segments, offset, temperature)
    -> (lse [b] fp32, masked [b, S] int64, above [b] int64)``; differentiable in ``left`` and
    ``cand`` through ``lse``."""

    @staticmethod
    def forward(ctx, left, cand, guide_left, guide_cand, limit, pos_logit, segments, offset, tau):
        with torch.cuda.device(left.device) if left.is_cuda else nullcontext():
            lse, masked, above = gist_forward(
                left, cand, guide_left, guide_cand, limit, pos_logit, segments, offset, tau
            )
        ctx.save_for_backward(left, cand, guide_left, guide_cand, limit, lse)
        ctx.segments, ctx.offset, ctx.tau = tuple(segments), offset, tau
        ctx.mark_non_differentiable(masked, above)
        return lse, masked, above

    @staticmethod
    def backward(ctx, dlse, _dmasked, _dabove):
        left, cand, guide_left, guide_cand, limit, lse = ctx.saved_tensors
        with torch.cuda.device(left.device) if left.is_cuda else nullcontext():
            dleft, dcand = gist_backward(
                dlse, left, cand, guide_left, guide_cand, limit, lse,
                ctx.segments, ctx.offset, ctx.tau, *ctx.needs_input_grad[:2],
            )  # fmt: skip
        return dleft, dcand, None, None, None, None, None, None, None


def gist_lse(
    left: torch.Tensor,
    cand: torch.Tensor,
    guide_left: torch.Tensor,
    guide_cand: torch.Tensor,
    limit: torch.Tensor,
    pos_logit: torch.Tensor,
    segments: Sequence[SegmentLike],
    offset: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Public entry: contiguous inputs in, ``(lse, masked, above)`` out (see GistFunction)."""
    return GistFunction.apply(
        left.contiguous(), cand.contiguous(), guide_left.contiguous(), guide_cand.contiguous(),
        limit, pos_logit, tuple(segments), offset, temperature,
    )  # fmt: skip
