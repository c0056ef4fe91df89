"""Triton kernels of the GIST loss (the ``@triton.jit`` layer only; launchers live in
:mod:`gist_ray.kernels.gist_function`; the loss itself is defined in docs/loss.md).

Notation: ``L``/``GL`` are the left operands of a segment (student / guide rows, ``b`` of them),
``C``/``GC`` its candidates (``n`` rows). ``RL``/``RC`` are the inverse norms of the guide rows:
the guide cosine of a tile is ``(GL·GCᵀ) * RL * RC``, so nobody has to copy a normalised guide.
Row i's candidate j is *masked* when its guide cosine is ``> limit_i`` (strict). The segment's
diagonal column ``offset + i`` is treated per ``diag`` (a runtime value): 0 an ordinary
candidate, 1 the labelled positive (never masked, never counted), 2 the self-pair (dropped,
never counted); the codes are those of ``gist_ray.loss.plan.DIAG_*``.

Tile plan: one live float32 accumulator at a time. Each tile computes the guide tile first,
turns it into the dropped-entry mask (and, in the forward, stores the mask as bits, one per
entry), and only then the student tile; the backward reads the bits instead of recomputing the
guide tile when the forward stored them. ``t_i`` and the positive's logit come from
:func:`gist_diag_kernel`, which runs the very same tile code on the tiles holding the diagonal,
so a candidate identical to row i's positive ties ``t_i`` exactly (and is kept: strict ``>``).

Precision: tiles are multiplied with float32 accumulation; 16-bit tiles go to the tensor cores as
they are, float32 tiles as ``tf32x3`` (three TF32 products: close to float32, which the mask's
strict comparison and the 1/τ-amplified logits need). An MMA computes every entry of a tile
the same way, so equal rows give equal products wherever they sit (``t_i`` relies on it).
``UPCAST`` is the Triton interpreter's path: its ``tl.dot`` is wrong on bf16 and, being numpy's
matmul, rounds the edge columns of its register blocks differently; there tiles are upcast to
float32 and multiplied by broadcast-and-sum, the same summation for every entry.

All row offsets are widened to int64 before multiplying by a stride: ``N × d`` exceeds 2**31 at
the sizes this kernel exists for. P's stay int32 (one fewer register per entry of the stored
tile): a P buffer holds at most ``gist_function.P_ELEMS`` = 2**27 elements per segment.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

# The launchers hand every kernel 16-byte aligned operands with widths and row strides that are
# multiples of 16 (gist_function.aligned), so the JIT specialises those the same way every time.
# The other pointers (small vectors, P, the bits planes) and the other integers must not
# specialise at all, or each call could pick a variant the compile gate never saw.
_ALIGN_FLAG = "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters


def _jit(ints: list[str], pointers: list[str]):
    kw = {"do_not_specialize": ints + (pointers if not _ALIGN_FLAG else [])}
    if _ALIGN_FLAG:
        kw["do_not_specialize_on_alignment"] = pointers
    return triton.jit(**kw)


@triton.jit
def _dot_tile(
    acc, A, B, row0, col0, a_len, b_len, K, stride_a, stride_b,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """``acc + A[row0:row0+BM] · B[col0:col0+BN]ᵀ`` (``A``: ``a_len × K``, ``B``: ``b_len × K``,
    rows past them and K past ``K`` read as zeros), a ``[BLOCK_M, BLOCK_N]`` float32 tile.

    With ``TMA`` (sm_90) ``A`` and ``B`` are tensor descriptors with blocks ``[BM, BLOCK_K]``,
    ``[BN, BLOCK_K]``: the loads are TMA copies, which hold no address or mask registers while
    the accumulator is live (that is what lets a 128×256 forward tile fit). Without it they are
    pointers with row strides (sm_80, where Triton 3.9 lowers descriptor loads with spills).
    Starting ``acc`` at -inf on dropped entries carries the mask through the student GEMM in
    the accumulator itself (-inf + x = -inf), so no mask tile stays live across it."""
    if not TMA:
        a_rows = row0 + tl.arange(0, BLOCK_M)
        b_rows = col0 + tl.arange(0, BLOCK_N)
        a_base = A + a_rows.to(tl.int64)[:, None] * stride_a
        b_base = B + b_rows.to(tl.int64)[None, :] * stride_b
    for k0 in range(0, K, BLOCK_K):
        if TMA:
            a = A.load([row0, k0])
            bt = tl.trans(B.load([col0, k0]))
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(a_base + ks[None, :], mask=(a_rows < a_len)[:, None] & k_ok[None, :],
                        other=0.0)  # fmt: skip
            bt = tl.load(b_base + ks[:, None], mask=(b_rows < b_len)[None, :] & k_ok[:, None],
                         other=0.0)  # fmt: skip
        if UPCAST:  # the interpreter: exact products, the same summation for every entry
            prod = a.to(tl.float32)[:, :, None] * bt.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=1)
        else:
            acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _guide_tile(
    GL, GC, rl, RC, row0, n0, cols, col_ok, b, n, d_g, stride_gl, stride_gc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KG: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Guide cosines of a tile: the one expression every mask decision and ``t_i`` come from.
    Columns past the segment come out NaN (so that no column-index tile has to stay live in
    registers across the GEMM: NaN marks them in :func:`_start_tile`)."""
    g = _dot_tile(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), GL, GC, row0, n0, b, n, d_g, stride_gl,
        stride_gc, BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, PRECISION, TMA,
    )  # fmt: skip
    rc = tl.load(RC + cols, mask=col_ok, other=float("nan"))
    return g * rl[:, None] * rc[None, :]


@triton.jit
def _on_diagonal(rows, n0, offset, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]``: is column ``n0 + j`` row i's diagonal ``offset + i``? Written
    apart from the tile's column indices on purpose: it is computed after the GEMM instead of
    being kept live through it."""
    return (tl.arange(0, BLOCK_N) + (n0 - offset))[None, :] == rows[:, None]


@triton.jit
def _start_tile(g, limit, rows, n0, offset, diag_code, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """The student GEMM's starting accumulator: 0 where the entry is kept, -inf where it is
    dropped (masked ``g > limit``, padding columns whose ``g`` is NaN, the self-pair); the
    labelled positive is always kept. Float selects only: a boolean tile carried through the
    diagonal branch would cost one register per entry next to the float one."""
    start = tl.where(g <= limit[:, None], 0.0, float("-inf"))  # NaN compares False: dropped
    row0 = tl.program_id(0) * BLOCK_M
    if (diag_code != 0) & (n0 < offset + row0 + BLOCK_M) & (n0 + BLOCK_N > offset + row0):
        # Only the one or two tiles of a row block that hold its diagonal get here.
        fill = tl.where(diag_code == 1, 0.0, float("-inf"))
        start = tl.where(_on_diagonal(rows, n0, offset, BLOCK_N), fill, start)
    return start


@triton.jit
def _harden(s, rows, n0, offset, hard_off, hard_diag, BLOCK_N: tl.constexpr):
    """Hardness weighting of the logits ``s = dot/τ`` after the mask: ``s·(1 + α·τ)`` (that is
    ``s/τ + α·s``) where it applies, ``hard_off`` off the diagonal and ``hard_diag`` on it (1
    where it does not apply; ``gist_ray.loss.plan.hardness_factors``). Dropped entries stay
    -inf. One select per entry on every tile, no branch: a branch for the diagonal tiles left
    two versions of the logit tile live where it joined (296 B of spills at 128×256)."""
    return s * tl.where(_on_diagonal(rows, n0, offset, BLOCK_N), hard_diag, hard_off)


@triton.jit
def _uncounted(rows, n0, hi, offset, diag_code, BLOCK_N: tl.constexpr):
    """Per row, the dropped entries of tile ``n0`` that are not masked candidates: the padding
    columns past ``hi`` and the self-pair."""
    pad = tl.maximum(n0 + BLOCK_N - hi, 0)
    own = (diag_code == 2) & (rows + offset >= n0) & (rows + offset < tl.minimum(n0 + BLOCK_N, hi))
    return pad + own.to(tl.int32)


@triton.jit
def _pack_words(drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` bool -> ``[BLOCK_M, BLOCK_N // 32]`` int32, bit ``j % 32`` of word
    ``j // 32`` (little-endian: the bytes of plan.pack_bits). Words, not bytes: each thread
    reduces its own entries of a word before two shuffles, where bytes kept 4× as many partial
    sums live next to the accumulator (72 B of spills at 128×256)."""
    bits = tl.reshape(drop.to(tl.int32), (BLOCK_M, BLOCK_N // 32, 32))
    return tl.sum(bits << tl.arange(0, 32)[None, None, :], axis=2)


@triton.jit
def _unpack_words(words, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def _words_ptrs(BITS, rows, n0, n, stride_bits, BLOCK_N: tl.constexpr):
    """Pointers to a tile's mask words (``BITS``: int32 words, ``ceil(n / 32)`` per row) and
    which of them exist."""
    word = n0 // 32 + tl.arange(0, BLOCK_N // 32)
    return BITS + rows.to(tl.int64)[:, None] * stride_bits + word[None, :], word < (n + 31) // 32


@_jit(
    ["b", "n", "cols_per_split", "offset", "part_row0", "diag_code", "stride_bits"],
    ["RL", "RC", "LIMIT", "POS", "LSE_PART", "MASKED_PART", "ABOVE_PART", "BITS"],
)
def gist_fwd_kernel(
    L, GL, C, GC, stride_l, stride_gl, stride_c, stride_gc,
    RL, RC, LIMIT, POS, LSE_PART, MASKED_PART, ABOVE_PART, BITS,
    b, n, d, d_g, cols_per_split, offset, part_row0, diag_code, inv_tau, hard_off, hard_diag,
    stride_bits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
    STORE_BITS: tl.constexpr, LOAD_BITS: tl.constexpr, HARD: tl.constexpr,
):  # fmt: skip
    """One segment, one (row block, column split): online max/sum over the split's tiles.

    Writes row ``part_row0 + split`` of the partial buffers: the split's lse (``-inf`` if every
    entry was dropped), its masked count (0 with ``LOAD_BITS``: the widest width counted) and
    its count of kept logits above ``POS``; with
    ``STORE_BITS`` also the dropped entries' bits (``BITS`` points at this segment's words).
    With ``LOAD_BITS`` (a narrower Matryoshka width) the mask comes from those bits and no
    guide tile is computed. With ``HARD`` the logits are hardness-weighted (:func:`_harden`)
    after ``POS`` is compared: the positive's rank is by similarity.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    row0 = pid_m * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < b
    limit = tl.load(LIMIT + rows, mask=row_ok, other=0.0)
    pos = tl.load(POS + rows, mask=row_ok, other=0.0)
    rl = tl.load(RL + rows, mask=row_ok, other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    n_masked = tl.zeros((BLOCK_M,), tl.int32)
    n_above = tl.zeros((BLOCK_M,), tl.int32)
    lo = split * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        if LOAD_BITS:  # the widest width's mask: no guide tile (padding words read as set)
            ptrs, ok = _words_ptrs(BITS, rows, n0, n, stride_bits, BLOCK_N)
            words = tl.load(ptrs, mask=row_ok[:, None] & ok, other=-1)
            start = tl.where(_unpack_words(words, BLOCK_M, BLOCK_N), float("-inf"), 0.0)
        else:
            g = _guide_tile(
                GL, GC, rl, RC, row0, n0, cols, cols < hi, b, n, d_g, stride_gl, stride_gc,
                BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, PRECISION, TMA,
            )  # fmt: skip
            start = _start_tile(g, limit, rows, n0, offset, diag_code, BLOCK_M, BLOCK_N)
        # Everything the mask decides is read off the start tile, before the student GEMM: the
        # student epilogue below then holds only its logits and three running reductions. A
        # width that loads the bits counts nothing (the launcher keeps the first width's
        # counts): fewer live values next to the accumulator.
        dropped = start == float("-inf")
        if not LOAD_BITS:
            n_masked += tl.sum(dropped.to(tl.int32), axis=1)
            n_masked -= _uncounted(rows, n0, hi, offset, diag_code, BLOCK_N)
        if STORE_BITS:
            ptrs, ok = _words_ptrs(BITS, rows, n0, n, stride_bits, BLOCK_N)
            tl.store(ptrs, _pack_words(dropped, BLOCK_M, BLOCK_N), mask=row_ok[:, None] & ok)
        s = (
            _dot_tile(
                start,
                L,
                C,
                row0,
                n0,
                b,
                n,
                d,
                stride_l,
                stride_c,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                UPCAST,
                PRECISION,
                TMA,
            )
            * inv_tau
        )
        # The positive's own logit equals POS bit for bit (same tile code in the diag kernel),
        # so it is not above itself.
        n_above += tl.sum((s > pos[:, None]).to(tl.int32), axis=1)
        if HARD:  # a variant of its own: the plain forward keeps its register budget
            s = _harden(s, rows, n0, offset, hard_off, hard_diag, BLOCK_N)
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


@_jit(["b", "n", "offset"], ["RL", "RC", "T_OUT", "POS_OUT"])
def gist_diag_kernel(
    L, GL, C, GC, stride_l, stride_gl, stride_c, stride_gc,
    RL, RC, T_OUT, POS_OUT, b, n, d, d_g, offset, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """``t_i`` (guide) and ``s_pos,i / τ`` (student) of the AP segment, read off the diagonal of
    the tiles ``rows × (offset + rows)`` computed by the same code as every other tile."""
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < b
    rl = tl.load(RL + rows, mask=row_ok, other=0.0)
    t = tl.zeros((BLOCK_M,), tl.float32)
    pos = tl.zeros((BLOCK_M,), tl.float32)
    # The column tiles holding this row block's diagonal, aligned to multiples of BLOCK_N as in
    # the forward: every entry is computed at the same place of the same tile as there.
    first = (offset + row0) // BLOCK_N * BLOCK_N
    for n0 in range(first, offset + row0 + BLOCK_M, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        g = _guide_tile(
            GL, GC, rl, RC, row0, n0, cols, cols < n, b, n, d_g, stride_gl, stride_gc,
            BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, PRECISION, TMA,
        )  # fmt: skip
        diag = _on_diagonal(rows, n0, offset, BLOCK_N)
        t += tl.sum(tl.where(diag, g, 0.0), axis=1)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = (
            _dot_tile(
                zero,
                L,
                C,
                row0,
                n0,
                b,
                n,
                d,
                stride_l,
                stride_c,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                UPCAST,
                PRECISION,
                TMA,
            )
            * inv_tau
        )
        pos += tl.sum(tl.where(diag, s, 0.0), axis=1)
    tl.store(T_OUT + rows, t, mask=row_ok)
    tl.store(POS_OUT + rows, pos, mask=row_ok)


@_jit(
    ["b", "n", "chunk_lo", "chunk_hi", "offset", "diag_code", "stride_bits"],
    ["RL", "RC", "LIMIT", "LSE", "W", "BITS"],
)
def gist_prob_kernel(
    L, GL, C, GC, stride_l, stride_gl, stride_c, stride_gc,
    RL, RC, LIMIT, LSE, W, BITS, P,
    b, n, d, d_g, chunk_lo, chunk_hi, offset, diag_code, inv_tau, hard_off, hard_diag,
    stride_bits, stride_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KG: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
    LOAD_BITS: tl.constexpr,
):  # fmt: skip
    """Backward recompute: ``P[i, j - chunk_lo] = w_i · (exp(z_ij - lse_i) - [j is i's
    positive])`` (``z = s/τ``, hardness-weighted as in :func:`_harden`) for kept entries, 0 for
    dropped ones, over the segment columns
    ``chunk_lo .. chunk_hi``, stored in P's dtype. The one-hot is subtracted in float32, before
    the only rounding (the difference is small exactly on the rows that matter).

    ``P`` is 16-byte aligned and ``stride_p`` a multiple of 16 whatever the chunk's width (the
    launcher allocates every chunk at the full width), and each row is stored out to
    ``stride_p`` (columns past ``chunk_hi`` get 0: dropped): the store mask is then constant over
    16 columns and the stores are vector stores (a mask ending at ``chunk_hi`` made them scalar).

    ``LSE`` must be finite (the launcher replaces -inf by 0; such rows have no kept entry)."""
    row0 = tl.program_id(0) * BLOCK_M
    n0 = chunk_lo + tl.program_id(1) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < b
    col_ok = cols < chunk_hi
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    w = tl.load(W + rows, mask=row_ok, other=0.0)
    if LOAD_BITS:
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        s = _dot_tile(
            zero,
            L,
            C,
            row0,
            n0,
            b,
            n,
            d,
            stride_l,
            stride_c,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            PRECISION,
            TMA,
        )
        ptrs, ok = _words_ptrs(BITS, rows, n0, n, stride_bits, BLOCK_N)
        words = tl.load(ptrs, mask=row_ok[:, None] & ok, other=-1)  # all bits set: dropped
        s = tl.where(_unpack_words(words, BLOCK_M, BLOCK_N), float("-inf"), s)
    else:
        limit = tl.load(LIMIT + rows, mask=row_ok, other=0.0)
        rl = tl.load(RL + rows, mask=row_ok, other=0.0)
        g = _guide_tile(
            GL, GC, rl, RC, row0, n0, cols, col_ok, b, n, d_g, stride_gl, stride_gc,
            BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, PRECISION, TMA,
        )  # fmt: skip
        start = _start_tile(g, limit, rows, n0, offset, diag_code, BLOCK_M, BLOCK_N)
        s = _dot_tile(
            start,
            L,
            C,
            row0,
            n0,
            b,
            n,
            d,
            stride_l,
            stride_c,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            PRECISION,
            TMA,
        )
    # Hardness weighting: the logit s/τ·f on weighted entries (as _harden does it in the
    # forward); its α·s carries no gradient, so d(logit)/ds stays 1/τ (in W).
    diag_tile = (n0 < offset + row0 + BLOCK_M) & (n0 + BLOCK_N > offset + row0)
    if diag_tile & ((diag_code == 1) | (hard_diag != hard_off)):
        on_diag = _on_diagonal(rows, n0, offset, BLOCK_N)
        z = s * tl.where(on_diag, inv_tau * hard_diag, inv_tau * hard_off)
        prob = tl.exp(z - lse[:, None])
        prob = tl.where(on_diag & (diag_code == 1), prob - 1.0, prob)
    else:
        prob = tl.exp(s * (inv_tau * hard_off) - lse[:, None])
    prob = prob * w[:, None]
    # Chunk-relative columns from the program id alone: divisible by BLOCK_N (``cols -
    # chunk_lo`` would inherit chunk_lo's unknown alignment).
    p_cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ptrs = P + (rows * stride_p)[:, None] + p_cols[None, :]
    tl.store(ptrs, prob.to(P.dtype.element_ty), mask=row_ok[:, None] & (p_cols < stride_p)[None, :])
