"""Triton kernels of the GIST loss (the ``@triton.jit`` layer only; launchers live in
:mod:`gist_ray.kernels.gist_function`).

Notation: ``L``/``GL`` are the left operands (student / guide rows of one left slot, starting at
row ``left_row0``), ``C``/``GC`` the candidates of one segment (rows ``col0 ..``). Row ``i``'s
candidate ``j`` (segment-relative) is *masked* when ``g_ij > limit_i`` (strict); the segment's
diagonal column ``offset + i`` is treated per ``DIAG``: 0 an ordinary candidate, 1 the labelled
positive (never masked, never counted), 2 the self-pair (dropped, never counted). The codes are
those of ``gist_ray.loss.plan.DIAG_*``.

Precision: tiles are multiplied with fp32 accumulation. ``UPCAST`` converts loaded tiles to fp32
before ``tl.dot``; the launchers set it under the Triton interpreter, whose ``tl.dot`` silently
returns garbage on bf16 operands (it reinterprets them as uint16). On a GPU fp16/bf16 tiles go to
the tensor cores as they are and fp32 tiles use ``PRECISION`` (student) / ``PRECISION_G`` (guide),
``tf32x3`` by default: tensor-core speed at close to fp32 accuracy, which the guide mask's strict
comparison and the 1/τ-amplified logits need.

All row offsets are widened to int64 before multiplying by a stride: ``N_total × d`` exceeds
2**31 at the sizes this kernel exists for.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot_tile(
    A,
    B,
    a_rows,
    b_rows,
    a_ok,
    b_ok,
    K,
    stride_a,
    stride_b,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``A[a_rows] · B[b_rows]ᵀ`` as a ``[BLOCK_M, BLOCK_N]`` fp32 tile, looping over K."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_base = A + a_rows.to(tl.int64)[:, None] * stride_a
    b_base = B + b_rows.to(tl.int64)[None, :] * stride_b
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_base + ks[None, :], mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_base + ks[:, None], mask=b_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _masked_tile(
    L,
    GL,
    C,
    GC,
    rows,
    cols,
    row_ok,
    col_ok,
    limit,
    left_row0,
    col0,
    offset,
    inv_tau,
    d,
    d_g,
    stride_l,
    stride_gl,
    stride_c,
    stride_gc,
    DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    PRECISION_G: tl.constexpr,
):
    """Student logits ``s/τ`` of one tile, which entries to drop, which count as masked, and
    where the diagonal lies."""
    s = _dot_tile(
        L, C, left_row0 + rows, col0 + cols, row_ok, col_ok, d, stride_l, stride_c,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
    )  # fmt: skip
    g = _dot_tile(
        GL, GC, left_row0 + rows, col0 + cols, row_ok, col_ok, d_g, stride_gl, stride_gc,
        BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, PRECISION_G,
    )  # fmt: skip
    valid = row_ok[:, None] & col_ok[None, :]
    diag = cols[None, :] == (rows + offset)[:, None]
    counted = (g > limit[:, None]) & valid
    if DIAG != 0:
        counted = counted & ~diag
    drop = counted | ~valid
    if DIAG == 2:
        drop = drop | diag
    return s * inv_tau, drop, counted, diag


@triton.jit
def gist_fwd_kernel(
    L,
    GL,
    C,
    GC,
    LIMIT,
    POS,
    LSE_PART,
    MASKED_PART,
    ABOVE_PART,
    b,
    d,
    d_g,
    left_row0,
    col0,
    col_size,
    cols_per_split,
    offset,
    part_row0,
    inv_tau,
    stride_l,
    stride_gl,
    stride_c,
    stride_gc,
    DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    PRECISION_G: tl.constexpr,
):
    """One segment, one (row block, column split): online max/sum over the split's tiles.

    Writes row ``part_row0 + split`` of the partial buffers: the split's lse (``-inf`` if every
    entry was dropped), its masked count and its count of kept logits above ``POS``.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < b
    limit = tl.load(LIMIT + rows, mask=row_ok, other=0.0)
    pos = tl.load(POS + rows, mask=row_ok, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    n_masked = tl.zeros((BLOCK_M,), tl.int32)
    n_above = tl.zeros((BLOCK_M,), tl.int32)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, col_size)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s, drop, counted, diag = _masked_tile(
            L, GL, C, GC, rows, cols, row_ok, cols < hi, limit, left_row0, col0, offset,
            inv_tau, d, d_g, stride_l, stride_gl, stride_c, stride_gc,
            DIAG, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KG, UPCAST, PRECISION, PRECISION_G,
        )  # fmt: skip
        s = tl.where(drop, float("-inf"), s)
        n_masked += tl.sum(counted.to(tl.int32), axis=1)
        higher = s > pos[:, None]
        if DIAG == 1:
            higher = higher & ~diag  # the positive is never above itself
        n_above += tl.sum(higher.to(tl.int32), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # Rows with everything dropped so far keep m = -inf: shift them by 0, so that
        # exp(-inf - shift) = 0 instead of exp(-inf + inf) = NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m = m_new
    safe_acc = tl.where(acc > 0, acc, 1.0)
    lse = tl.where(acc > 0, m + tl.log(safe_acc), float("-inf"))
    out = (part_row0 + split).to(tl.int64) * b + rows
    tl.store(LSE_PART + out, lse, mask=row_ok)
    tl.store(MASKED_PART + out, n_masked, mask=row_ok)
    tl.store(ABOVE_PART + out, n_above, mask=row_ok)


@triton.jit
def gist_prob_kernel(
    L,
    GL,
    C,
    GC,
    LIMIT,
    LSE,
    P,
    b,
    d,
    d_g,
    left_row0,
    col0,
    chunk_lo,
    chunk_hi,
    offset,
    inv_tau,
    stride_l,
    stride_gl,
    stride_c,
    stride_gc,
    stride_p,
    DIAG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    PRECISION_G: tl.constexpr,
):
    """Backward recompute: ``P[i, j - chunk_lo] = exp(s_ij/τ - lse_i)`` for kept entries, 0
    for dropped ones, over the segment columns ``chunk_lo .. chunk_hi`` (stored in P's dtype).

    ``LSE`` must be finite (the launcher replaces -inf by 0; such rows have no kept entry)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = chunk_lo + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < b
    col_ok = cols < chunk_hi
    limit = tl.load(LIMIT + rows, mask=row_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    s, drop, _counted, _diag = _masked_tile(
        L, GL, C, GC, rows, cols, row_ok, col_ok, limit, left_row0, col0, offset,
        inv_tau, d, d_g, stride_l, stride_gl, stride_c, stride_gc,
        DIAG, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KG, UPCAST, PRECISION, PRECISION_G,
    )  # fmt: skip
    prob = tl.exp(tl.where(drop, float("-inf"), s) - lse[:, None])
    ptrs = P + rows.to(tl.int64)[:, None] * stride_p + (cols - chunk_lo)[None, :]
    tl.store(ptrs, prob.to(P.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
