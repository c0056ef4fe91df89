"""Launchers of the GIST Triton kernels (:mod:`.gist_kernels`): the forward and the backward of
the tiled loss on a :class:`gist_ray.loss.plan.Problem`, as plain functions. Autograd and
``torch.compile`` support come from the custom op in :mod:`gist_ray.loss.op`.

Forward: :func:`gist_diag_kernel` reads ``t_i`` and the positive's logit off the diagonal tiles
of AP; then one launch of :func:`gist_fwd_kernel` per segment, each on that segment's own left
and candidate tensors (no concatenated copy), over a (row block × column split) grid sized to
whole waves over the SMs. Each program walks its split's column tiles with an online max/sum and
writes a partial lse, masked count and above count, combined here; it also stores the dropped
entries as bits when they fit (``plan.mask_bits_shape``).

Backward: per candidate tensor and column chunk, :func:`gist_prob_kernel` forms
``w·(P - onehot)`` of every segment reading that tensor (AP and PP share the positives) into a
``segments·b × chunk`` buffer (one row stride for every chunk, so the kernel's stores are
vector stores), and cuBLAS GEMMs turn it into ``dL += P·C`` (each chunk's product in float32,
summed in a float32 accumulator: :func:`add_mm`) and ``dC = Pᵀ·L`` (one GEMM over the stacked
segments, written once in the candidates' dtype). The guide's inverse norms come from the
forward (:func:`guide_norms`, saved by the op). A fused dL/dC kernel would need a
``[BLOCK_M, d]`` float32 accumulator per program: at d = 768 that does not fit in registers,
and its second recompute of every tile would cost more than the GEMMs. Memory stays
O(b·chunk + (b + N)(d + d_g) + the mask bits).

Tile shapes: one fixed plan per dtype and GPU family (:data:`PLANS`); every variant the
launchers can pick is compiled for sm_90a and sm_80 without a GPU by :mod:`.compile_check`. A
backward that recomputes the guide tiles uses the forward's tiles, so its mask is bit-identical
to the forward's. On sm_90 the GEMM operands go to the kernels as TMA tensor descriptors.
Nothing here reads a device value on the host: no sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from gist_ray.loss.plan import Problem, hardness_factors, mask_bits_shape, mask_limit

from .gist_kernels import gist_diag_kernel, gist_fwd_kernel, gist_prob_kernel

# Decided when gist_kernels was imported (TRITON_INTERPRET=1 at that moment): kernels run on CPU
# tensors through numpy, and tiles are upcast to fp32 before tl.dot (bf16 dot is wrong there).
INTERPRETED = type(gist_fwd_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def constexprs(self) -> dict[str, int]:
        b = self
        return {"BLOCK_M": b.block_m, "BLOCK_N": b.block_n, "BLOCK_K": b.block_k,
                "BLOCK_KG": b.block_k}  # fmt: skip

    @property
    def options(self) -> dict:
        # No FMA contraction: fused `acc * inv_tau - shift` kept both the accumulator and the
        # logits live in the epilogue (spills at 128×256); it also pins the rounding, which
        # Triton's default would change in 3.10.
        return {"num_warps": self.num_warps, "num_stages": self.num_stages,
                "enable_fp_fusion": False}  # fmt: skip

    def descriptors(self, left: torch.Tensor, cands: torch.Tensor) -> tuple:
        """TMA descriptors of a GEMM's left rows and candidate rows for these tiles."""
        return (TensorDescriptor.from_tensor(left, [self.block_m, self.block_k]),
                TensorDescriptor.from_tensor(cands, [self.block_n, self.block_k]))  # fmt: skip


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one dtype on one GPU family (:func:`plan_for`). ``fwd`` serves the forward,
    the diagonal kernel and a backward that recomputes the guide tile (so a recomputed mask is
    bit-identical to the forward's); ``bwd`` the backward that reads the mask bits (one GEMM
    per tile, so it affords wider tiles). ``smem``: the most shared memory any of its kernels
    needs on the architecture that picks it (the compile gate checks it). ``tma``: GEMM operands
    as tensor descriptors (TMA copies, sm_90+) rather than pointers."""

    name: str
    fwd: TileConfig
    bwd: TileConfig
    smem: int
    tma: bool


# Chosen with the compile gate (kernels/compile_check.py): the widest tiles whose 16-bit kernels
# spill no register on their architecture, with Triton 3.6 and 3.9 (benchmarks/RESULTS.md). A
# forward tile runs two GEMMs (guide, then student) and an online-softmax epilogue: at 128×256 on
# sm_90a it fits only because its operands are TMA descriptors (no address registers) and with 2
# stages (the diagonal kernel spills 8 B at 3 on Triton 3.6; stages only pipeline the loads, the
# K order and so the rounding stay those of the forward). sm_80 keeps MMA operands in registers,
# so its forward tiles are smaller. fp32 (tf32x3, three MMAs per product) is not held to zero
# spills on sm_80. Budgets are the largest kernel's need (sm90-fp32: its backward with the hardness
# factor needs 96 KiB + 32 B).
PLANS: dict[tuple[int, str], TilePlan] = {
    (2, "sm90"): TilePlan("sm90-16bit", TileConfig(128, 256, 64, 8, 2),
                          TileConfig(128, 256, 64, 8, 3), 145 * 1024, tma=True),
    (2, "sm80"): TilePlan("sm80-16bit", TileConfig(64, 64, 64, 4, 3),
                          TileConfig(128, 128, 64, 8, 3), 64 * 1024, tma=False),
    (4, "sm90"): TilePlan("sm90-fp32", TileConfig(128, 64, 32, 8, 3),
                          TileConfig(128, 128, 32, 8, 3), 97 * 1024, tma=True),
    (4, "sm80"): TilePlan("sm80-fp32", TileConfig(128, 64, 32, 8, 3),
                          TileConfig(128, 64, 32, 8, 3), 48 * 1024, tma=False),
}  # fmt: skip
# Under the interpreter (~40 ms per program) 32-wide tiles give tests with b, N < 100 a few
# programs per launch, yet still cross row, column, split, chunk and K seams.
_SMALL = TileConfig(32, 32, 32, 1, 1)
INTERPRET_PLAN = TilePlan("interpreter", _SMALL, _SMALL, 0, tma=True)
FP32_PRECISION = "tf32x3"  # ~fp32 accuracy on tensor cores; 16-bit tiles use the native dot

# Backward P buffer: at most this many elements per segment (256 MiB in bf16).
P_ELEMS = 1 << 27
INTERPRET_CHUNK = 64
MIN_SPLIT_TILES = 4  # column tiles per forward program, at least
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (and z); x allows 2**31 - 1
NORM_BLOCK_ELEMS = 1 << 24  # guide elements per norm call: bounds any fp32 temporary (64 MiB)
# bf16/fp16 x bf16/fp16 -> fp32 GEMMs (torch >= 2.8, CUDA): the backward's dL accumulates its
# chunks in float32 without upcasting P and C.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def plan_for(itemsize: int, major: int, smem_limit: int) -> TilePlan:
    """The tile plan for an element size on a GPU of compute capability ``major``: sm80's on
    sm_8x, sm90's on sm_9x; on newer GPUs (not compiled by the gate) sm90's if its shared
    memory fits, else sm80's."""
    families = {8: ("sm80",), 9: ("sm90",)}.get(major, ("sm90", "sm80") if major > 9 else ())
    for family in families:
        plan = PLANS[(itemsize, family)]
        if plan.smem <= smem_limit:
            return plan
    raise RuntimeError(f"no GIST tile plan for compute capability {major}.x and {smem_limit} B "
                       "of shared memory")  # fmt: skip


def pick_plan(dtype: torch.dtype, device: torch.device) -> TilePlan:
    if INTERPRETED:
        return INTERPRET_PLAN
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return plan_for(dtype.itemsize, props.major, smem)


def _flags(dtype: torch.dtype, plan: TilePlan) -> dict:
    if INTERPRETED:
        return {"UPCAST": True, "PRECISION": "ieee", "TMA": plan.tma}
    precision = FP32_PRECISION if dtype == torch.float32 else "tf32"
    return {"UPCAST": False, "PRECISION": precision, "TMA": plan.tma}


def _launch(kernel, grid: tuple[int, ...], cfg: TileConfig, *args, **constexprs) -> None:
    options = {} if INTERPRETED else cfg.options
    kernel[grid](*args, **constexprs, **cfg.constexprs, **options)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def column_splits(b: int, n: int, cfg: TileConfig, device: torch.device) -> tuple[int, int]:
    """(splits, columns per split): a multiple of BLOCK_N each, so that the row blocks × splits
    programs of a segment make whole waves over the SMs, each with >= MIN_SPLIT_TILES tiles."""
    row_blocks, col_tiles = triton.cdiv(b, cfg.block_m), triton.cdiv(max(n, 1), cfg.block_n)
    sms = _num_sms(device)
    # Under the interpreter every tile may be its own split: small tests still cross splits.
    max_splits = max(1, col_tiles // (1 if INTERPRETED else MIN_SPLIT_TILES))
    waves = max(1, row_blocks * max_splits // sms)
    splits = min(max_splits, max(1, triton.cdiv(waves * sms, row_blocks)), MAX_GRID_Y)
    per = triton.cdiv(col_tiles, splits) * cfg.block_n
    return triton.cdiv(max(n, 1), per), per


def forward_grid(b: int, n: int, cfg: TileConfig, device: torch.device) -> tuple[tuple, int]:
    """The forward's grid (row blocks, column splits) and columns per split. The splits are the
    grid's y dimension, capped at :data:`MAX_GRID_Y` (a split then walks more column tiles);
    row blocks go on x."""
    splits, per = column_splits(b, n, cfg, device)
    return (triton.cdiv(b, cfg.block_m), splits), per


def prob_grid(b: int, width: int, cfg: TileConfig) -> tuple[int, int]:
    """The backward kernel's grid over a ``b × width`` chunk: row blocks on x, column tiles on
    y (at most ``P_ELEMS / BLOCK_N``-ish: a chunk is at most 2**16 columns)."""
    grid = (triton.cdiv(b, cfg.block_m), triton.cdiv(width, cfg.block_n))
    assert grid[1] <= MAX_GRID_Y, grid
    return grid


def check(p: Problem) -> torch.dtype:
    """Errors before any launch: device, dtype (one for every operand), row-major layout."""
    named = [("anchor rows", p.left[0]), ("positive rows", p.left[1])]
    named += [(f"candidates {j}", x) for j, x in enumerate(p.cands)]
    named += [("guide anchor rows", p.guide_left[0]), ("guide positive rows", p.guide_left[1])]
    named += [(f"guide candidates {j}", x) for j, x in enumerate(p.guide_cands)]
    dev, dtype = p.left[0].device, p.left[0].dtype
    if INTERPRETED and dev.type != "cpu":
        raise RuntimeError("gist kernels run under TRITON_INTERPRET=1: pass CPU tensors")
    if not INTERPRETED and dev.type != "cuda":
        raise RuntimeError(
            "the triton backend needs CUDA tensors (for CPU tensors use backend='chunked', or set "
            "TRITON_INTERPRET=1 before gist_ray.kernels is first imported)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"anchor rows are {dtype}; the kernels take float32, float16, bfloat16")
    for name, t in named:
        if t.device != dev:
            raise ValueError(f"{name} are on {t.device}, anchor rows on {dev}")
        if t.dtype != dtype:
            raise ValueError(f"{name} are {t.dtype}, anchor rows {dtype}: cast to one dtype first")
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be a row-major 2-d tensor")
    return dtype


def _operands(p: Problem, seg, cfg: TileConfig, flags: dict) -> tuple:
    """The kernels' first arguments: the student left rows, guide left rows, candidates and
    guide candidates of ``seg`` (tensor descriptors under ``TMA``, else the tensors), then
    their row strides."""
    L, GL, C, GC = (
        p.left[seg.left],
        p.guide_left[seg.left],
        p.cands[seg.cand],
        p.guide_cands[seg.cand],
    )
    strides = (L.stride(0), GL.stride(0), C.stride(0), GC.stride(0))
    if flags["TMA"]:
        (L, C), (GL, GC) = cfg.descriptors(L, C), cfg.descriptors(GL, GC)
    return L, GL, C, GC, *strides


def _words(bits: torch.Tensor, j: int) -> tuple[torch.Tensor, int]:
    """Segment ``j``'s plane of the mask bits as int32 words (the kernels' unit) and its row
    stride in words; the empty tensor and 0 when no bits are stored."""
    words = bits.view(torch.int32)
    return (words[j], words.stride(1)) if bits.numel() else (words, 0)


def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it is 16-byte aligned with width and row stride multiples of 16, else a
    copy padded with zero columns (dot products unchanged). Real embedding widths (384, 768,
    1024, ...) never copy; the point is that the kernels only ever see one specialisation."""
    w = x.shape[1]
    if w % 16 == 0 and x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0:
        return x
    out = x.new_zeros(x.shape[0], -(-w // 16) * 16)
    out[:, :w] = x
    return out


def inv_norms(x: torch.Tensor) -> torch.Tensor:
    """``1 / max(‖x_i‖, 1e-12)`` per row in float32 (as ``plan.inv_norm``) without a float32
    copy of ``x``: squares are summed in float32 by the reduction itself, at most
    :data:`NORM_BLOCK_ELEMS` elements per call. Every call sees the same ``[rows, d]`` shape
    (the last block is the window ending at the last row, overlapping the one before), so
    every row is reduced the same way wherever it sits: a duplicate row gets the same norm
    bit for bit (the ties of ``t_i`` rely on it)."""
    n, d = x.shape
    rows = max(1, NORM_BLOCK_ELEMS // max(d, 1))
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    for lo in range(0, n, rows):
        lo = max(0, min(lo, n - rows))
        out[lo : lo + rows] = torch.linalg.vector_norm(x[lo : lo + rows], dim=-1,
                                                       dtype=torch.float32)  # fmt: skip
    return out.clamp_min_(1e-12).reciprocal_()


def guide_norms(p: Problem) -> torch.Tensor:
    """The guide rows' inverse norms, ``guide_left`` then ``guide_cands``, in one float32
    vector: computed once by the forward and saved for the backward."""
    return torch.cat([inv_norms(x) for x in (*p.guide_left, *p.guide_cands)])


def _split_norms(p: Problem, norms: torch.Tensor) -> tuple[list, list]:
    sizes = [x.shape[0] for x in (*p.guide_left, *p.guide_cands)]
    parts = list(norms.split(sizes))
    return parts[: len(p.guide_left)], parts[len(p.guide_left) :]


def _setup(p: Problem, norms: torch.Tensor | None = None):
    """dtype, device, tile plan, flags, guide inverse norms (``norms``, the forward's, or
    computed now) and the kernels' view of ``p`` (aligned operands; the backward's GEMMs keep
    using ``p`` itself)."""
    dtype = check(p)
    dev = p.left[0].device
    plan = pick_plan(dtype, dev)
    kp = replace(
        p, left=tuple(map(aligned, p.left)), cands=tuple(map(aligned, p.cands)),
        guide_left=tuple(map(aligned, p.guide_left)),
        guide_cands=tuple(map(aligned, p.guide_cands)),
    )  # fmt: skip
    if norms is None or not norms.numel():
        norms = guide_norms(p)
    rl, rc = _split_norms(p, norms)
    return dtype, dev, plan, _flags(dtype, plan), rl, rc, kp, norms


def forward(problems: Sequence[Problem]):
    """``(loss, masked, above, threshold, lse, bits, norms)`` of the problems, one per
    Matryoshka width (chunked.forward has the contract of the first six; ``norms``: the guide's
    inverse norms, :func:`guide_norms`, for the backward): the first width's launches compute
    the guide tiles and store the mask bits; the other widths' launches load the bits instead
    of recomputing the guide (they recompute it only when the bits do not fit)."""
    p = problems[0]
    dtype, dev, plan, flags, rl, rc, kp, norms = _setup(p)
    b, n, inv_tau, cfg = p.rows, p.pool, 1.0 / p.temperature, plan.fwd
    threshold, pos = _diagonal(kp, cfg, flags, rl, rc)
    limit = mask_limit(threshold, p.margin, p.strategy).contiguous()
    grid, per = forward_grid(b, n, cfg, dev)
    splits = grid[1]
    parts = splits * len(p.segments)
    masked_part = torch.empty(parts, b, dtype=torch.int32, device=dev)
    bits = torch.empty(mask_bits_shape(len(p.segments), b, n, dev), dtype=torch.uint8, device=dev)
    store = bits.numel() > 0
    losses, aboves, lses = [], [], []
    for w, q in enumerate(problems):
        kq = kp if w == 0 else _student_view(q, kp)
        if w:
            pos = _diagonal(kq, cfg, flags, rl, rc)[1]
        lse_part = torch.empty(parts, b, dtype=torch.float32, device=dev)
        above_part = torch.empty(parts, b, dtype=torch.int32, device=dev)
        d, d_g = kq.left[0].shape[1], kq.guide_left[0].shape[1]
        for j, seg in enumerate(p.segments):
            plane, stride = _words(bits, j)
            hard_off, hard_diag = hardness_factors(p, seg)
            _launch(
                gist_fwd_kernel, grid, cfg, *_operands(kq, seg, cfg, flags), rl[seg.left],
                rc[seg.cand], limit, pos, lse_part, masked_part, above_part, plane, b, n, d, d_g,
                per, p.offset, j * splits, seg.diag, inv_tau, hard_off, hard_diag, stride,
                STORE_BITS=store and w == 0, LOAD_BITS=store and w > 0,
                HARD=(hard_off, hard_diag) != (1.0, 1.0), **flags,
            )  # fmt: skip
        if w == 0:  # the mask's counts (the widths that load its bits write zeros)
            masked = masked_part.view(len(p.segments), splits, b).sum(1, dtype=torch.int64).T
        lses.append(torch.logsumexp(lse_part, dim=0))  # all -inf stays -inf (no NaN)
        losses.append(lses[-1] - pos)
        aboves.append(above_part.sum(0, dtype=torch.int64))
    lse = torch.stack(lses)
    return (torch.stack(losses), masked.contiguous(), torch.stack(aboves), threshold, lse, bits,
            norms)  # fmt: skip


def _student_view(q: Problem, kp: Problem) -> Problem:
    """The kernels' view of another width ``q`` of ``kp``'s problem: its aligned student
    operands, ``kp``'s (already aligned) guide."""
    check(q)
    return replace(kp, left=tuple(map(aligned, q.left)), cands=tuple(map(aligned, q.cands)))


def _diagonal(p: Problem, cfg: TileConfig, flags: dict, rl, rc):
    """``(t, pos)``: the threshold and the positive's logit, from :func:`gist_diag_kernel`."""
    ap, b, dev = p.ap, p.rows, p.left[0].device
    t = torch.empty(b, dtype=torch.float32, device=dev)
    pos = torch.empty_like(t)
    _launch(
        gist_diag_kernel, (triton.cdiv(b, cfg.block_m),), cfg, *_operands(p, ap, cfg, flags),
        rl[ap.left], rc[ap.cand], t, pos, b, p.pool, p.left[0].shape[1], p.guide_left[0].shape[1],
        p.offset, 1.0 / p.temperature, **flags,
    )  # fmt: skip
    return t, pos


def backward(
    problems: Sequence[Problem],
    grad: torch.Tensor,
    lse: torch.Tensor,
    bits: torch.Tensor,
    norms: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of ``Σ_w Σ_i grad[w, i] · loss[w, i]`` w.r.t. every width's ``left`` and
    ``cands`` (width after width); ``lse`` ``[widths, b]``, ``bits`` and ``norms`` come from
    :func:`forward` on the same problems (every width reads the same bits; ``norms`` None or
    empty: computed again)."""
    if norms is None or not norms.numel():
        norms = guide_norms(problems[0])
    dleft, dcands = [], []
    for w, q in enumerate(problems):
        dl, dc = _backward(q, grad[w], lse[w], bits, norms, chunk)
        dleft += dl
        dcands += dc
    return dleft, dcands


def add_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32 and the product never rounded to ``a``'s dtype:
    16-bit operands go through cuBLAS's fp32-output GEMM where torch has it (CUDA, torch >=
    2.8), else they are upcast (the interpreter's CPU tensors)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _MM_OUT_DTYPE and a.is_cuda:
        acc += torch.mm(a, b, out_dtype=torch.float32)
    else:
        acc.addmm_(a.float(), b.float())


def chunk_width(b: int) -> int:
    """Columns per backward chunk at ``b`` rows when compiled: at most ``P_ELEMS`` elements of
    ``P``, whole 256-column tiles, 256 .. 65,536 (gist-ray doctor sizes its seam case by it)."""
    return max(256, min(1 << 16, P_ELEMS // max(b, 1)) // 256 * 256)


def _backward(
    p: Problem,
    grad: torch.Tensor,
    lse: torch.Tensor,
    bits: torch.Tensor,
    norms: torch.Tensor,
    chunk: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One width of :func:`backward`."""
    dtype, dev, plan, flags, rl, rc, kp, _ = _setup(p, norms)
    b, n, inv_tau = p.rows, p.pool, 1.0 / p.temperature
    d, d_g = kp.left[0].shape[1], kp.guide_left[0].shape[1]
    load = bits.numel() > 0
    cfg = plan.bwd if load else plan.fwd  # a recomputed mask needs the forward's tiles
    limit = lse  # unused by the kernel when the mask comes from the bits
    if not load:
        limit = mask_limit(_diagonal(kp, cfg, flags, rl, rc)[0], p.margin, p.strategy)
    # w_i = dloss_i / τ, scaled to max |w| = 1 so that 16-bit P does not underflow; the scale
    # goes back on the float32 side.
    weight = grad.float() / p.temperature
    wmax = weight.abs().amax().clamp_min(1e-30)
    w = (weight / wmax).contiguous()
    lse = torch.where(torch.isinf(lse), 0.0, lse).float().contiguous()
    if chunk is None:
        chunk = INTERPRET_CHUNK if INTERPRETED else chunk_width(b)
    if chunk % cfg.block_n:
        raise ValueError(f"chunk must be a multiple of the tile width {cfg.block_n}, got {chunk}")
    groups: dict[int, list[int]] = {}
    for j, seg in enumerate(p.segments):
        groups.setdefault(seg.cand, []).append(j)
    biggest = max(len(g) for g in groups.values())
    # One row stride for every chunk, the last (narrower) one included, a multiple of 16: the
    # kernel's P stores are then 16-byte vector stores (docs/kernel.md "Backward").
    stride_p = -(-min(chunk, n) // 16) * 16
    prob = torch.empty(biggest * b, stride_p, dtype=dtype, device=dev)
    dleft = [torch.zeros(x.shape, dtype=torch.float32, device=dev) for x in p.left]
    dcands = [torch.empty_like(c) for c in p.cands]
    for ci, members in groups.items():
        C = p.cands[ci]
        lefts = [p.left[p.segments[j].left] for j in members]
        stacked = lefts[0] if len(lefts) == 1 else torch.cat(lefts)
        for lo in range(0, n, chunk):
            width = min(chunk, n - lo)
            rows = prob[: len(members) * b]
            grid = prob_grid(b, width, cfg)
            for r, j in enumerate(members):
                seg = p.segments[j]
                pr = rows[r * b : (r + 1) * b]  # the kernel writes all stride_p columns
                plane, stride = _words(bits, j)
                hard_off, hard_diag = hardness_factors(p, seg)
                _launch(
                    gist_prob_kernel, grid, cfg, *_operands(kp, seg, cfg, flags), rl[seg.left],
                    rc[ci], limit, lse, w, plane, pr, b, n, d, d_g, lo, lo + width, p.offset,
                    seg.diag, inv_tau, hard_off, hard_diag, stride, stride_p, LOAD_BITS=load,
                    **flags,
                )  # fmt: skip
                add_mm(dleft[seg.left], pr[:, :width], C[lo : lo + width])
            out = dcands[ci][lo : lo + width]
            torch.mm(rows[:, :width].T, stacked, out=out)
            out.mul_(wmax)
    return [(g * wmax).to(dtype) for g in dleft], dcands
