"""Tiled pure-PyTorch GIST loss: the CPU backend, with memory linear in the batch.

The forward pass walks each segment's candidate columns in chunks: the guide tile
``GL·GCᵀ`` (scaled by the inverse norms) decides which entries are dropped, the student tile
``L·Cᵀ/τ`` is folded into a per-row online (max, sum). It saves the per-row lse and the dropped
entries as bits (:func:`gist_ray.loss.plan.pack_bits`; recomputed instead when they would not
fit). The backward recomputes each student tile, forms ``w_i·(P - onehot)`` in float32 (the
positive's one-hot subtracted before anything is rounded) and accumulates
``dL += (w·(P - I))·C`` and ``dC += (w·(P - I))ᵀ·L``. Peak memory is a few ``rows × chunk``
float32 buffers, the bits, and the inputs and their gradients; never ``rows × N``.

All arithmetic is float32 (16-bit inputs are upcast a chunk at a time); gradients are returned
in the input dtype. These are plain functions; autograd comes from :mod:`gist_ray.loss.op`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gist_ray.loss.plan import (
    DIAG_EXCLUDE,
    DIAG_NONE,
    DIAG_PROTECT,
    Problem,
    Segment,
    exact_over,
    exact_threshold,
    hardness_factors,
    inv_norm,
    mask_bits_shape,
    mask_limit,
    pack_bits,
    unpack_bits,
)

# Elements of one rows × chunk float32 tile buffer (16 MiB). Large enough for the matmuls to run
# at full speed, small enough to stay a rounding error next to the b × N of the reference.
TILE_ELEMS = 1 << 22
MIN_CHUNK, MAX_CHUNK = 32, 8192


def chunk_width(rows: int, tile_elems: int | None = None) -> int:
    """Columns per chunk so that ``rows × chunk`` stays near ``tile_elems`` (default
    :data:`TILE_ELEMS`); a multiple of 8 (the mask bits are stored a byte at a time)."""
    width = max(MIN_CHUNK, min(MAX_CHUNK, (tile_elems or TILE_ELEMS) // max(rows, 1)))
    return width // 8 * 8


class _Tiles:
    """Preallocated tile buffers (re-used by every chunk: a fresh 16 MiB allocation per chunk
    costs page faults comparable to the element-wise work) and the tile maths. The guide side
    (which entries are dropped) comes from ``p``, the first width; the student side of every
    width is one :class:`_Width`."""

    def __init__(self, p: Problem, chunk: int, threshold: torch.Tensor | None) -> None:
        if chunk % 8:
            raise ValueError(f"chunk must be a multiple of 8, got {chunk}")
        b, dev = p.rows, p.left[0].device
        self.p, self.b, self.chunk = p, b, chunk
        self.s = torch.empty(b * chunk, device=dev)
        self.g = torch.empty(b * chunk, device=dev)
        # float64 (plan.exact_over); None when the mask comes from the forward's bits
        self.limit = None if threshold is None else mask_limit(threshold, p.margin, p.strategy)
        self.guide_left = [x.float() for x in p.guide_left]
        self.inv_left = [inv_norm(x).unsqueeze(1) for x in p.guide_left]
        self.inv_cand = [inv_norm(x) for x in p.guide_cands]

    def chunks(self):
        for c0 in range(0, self.p.pool, self.chunk):
            yield c0, min(self.chunk, self.p.pool - c0)

    def diag_rows(self, c0: int, w: int) -> torch.Tensor:
        """Rows i whose diagonal column ``offset + i`` lies in columns ``c0 .. c0+w``."""
        first = max(0, c0 - self.p.offset)
        last = max(first, min(self.b, c0 + w - self.p.offset))
        return torch.arange(first, last, device=self.s.device)

    def drop(self, seg: Segment, c0: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries of columns ``c0 .. c0+w`` left out of the softmax ``[b, w]`` and the masked
        count per row (the positive and the self-pair are never counted)."""
        p, b = self.p, self.b
        gc = p.guide_cands[seg.cand][c0 : c0 + w]
        g = torch.mm(self.guide_left[seg.left], gc.float().T, out=self.g[: b * w].view(b, w))
        g.mul_(self.inv_left[seg.left]).mul_(self.inv_cand[seg.cand][c0 : c0 + w])
        drop = exact_over(g, self.limit, p.guide_left[seg.left], gc)
        rows = self.diag_rows(c0, w)
        if seg.diag != DIAG_NONE and rows.numel():
            drop[rows, rows + (p.offset - c0)] = False
        counts = drop.sum(1)
        if seg.diag == DIAG_EXCLUDE and rows.numel():
            drop[rows, rows + (p.offset - c0)] = True
        return drop, counts


class _Width:
    """The student side of one problem (one Matryoshka width): its float32 left rows, and the
    chunk's logits."""

    def __init__(self, q: Problem, tiles: _Tiles) -> None:
        self.q, self.t = q, tiles
        self.left = [x.float() for x in q.left]

    def logits(self, seg: Segment, c0: int, w: int, drop: torch.Tensor):
        """``s/τ`` of the chunk with dropped entries at -inf, and the float32 candidates."""
        b = self.t.b
        cand = self.q.cands[seg.cand][c0 : c0 + w].float()
        s = torch.mm(self.left[seg.left], cand.T, out=self.t.s[: b * w].view(b, w))
        return s.mul_(1.0 / self.q.temperature).masked_fill_(drop, float("-inf")), cand

    def harden(self, seg: Segment, c0: int, w: int, s: torch.Tensor) -> torch.Tensor:
        """Hardness weighting of the chunk's logits, in place (plan.hardness_factors)."""
        off, on_diag = hardness_factors(self.q, seg)
        if off == on_diag == 1.0:
            return s
        rows = self.t.diag_rows(c0, w)
        cols = rows + (self.q.offset - c0)
        diag = s[rows, cols] * on_diag
        s.mul_(off)
        s[rows, cols] = diag
        return s


def forward(problems: Sequence[Problem], chunk: int | None = None):
    """``(loss, masked, above, threshold, lse, bits)`` of the problems, one per Matryoshka width
    (same guide, segments and settings; plan.BackendOutput): ``loss``, ``above`` and ``lse`` are
    ``[widths, b]``; ``masked``, ``threshold`` and ``bits`` (what :func:`backward` needs, with
    ``lse``) are the mask's, computed once for every width."""
    p = problems[0]
    chunk = chunk or chunk_width(p.rows)
    threshold = exact_threshold(p)
    t = _Tiles(p, chunk, threshold)
    widths = [_Width(q, t) for q in problems]
    nw, b, dev = len(problems), p.rows, p.left[0].device
    ap = p.ap
    pos = torch.stack([
        (x.left[ap.left] * x.q.cands[ap.cand][p.offset : p.offset + b].float()).sum(-1)
        for x in widths
    ]) / p.temperature  # fmt: skip
    shape = mask_bits_shape(len(p.segments), b, p.pool, dev)
    # All set: the padding bytes past ceil(N/8) read as dropped, as the kernels write them.
    bits = torch.full(shape, 255, dtype=torch.uint8, device=dev)
    m = torch.full((nw, b), float("-inf"), device=dev)  # running row max
    acc = torch.zeros(nw, b, device=dev)  # running sum of exp(s - m)
    masked = torch.zeros(b, len(p.segments), dtype=torch.long, device=dev)
    above = torch.zeros(nw, b, dtype=torch.long, device=dev)
    for j, seg in enumerate(p.segments):
        for c0, w in t.chunks():
            drop, counts = t.drop(seg, c0, w)
            masked[:, j] += counts
            if bits.numel():
                bits[j, :, c0 // 8 : c0 // 8 + (w + 7) // 8] = pack_bits(drop)
            rows = t.diag_rows(c0, w)
            for k, x in enumerate(widths):
                s, _ = x.logits(seg, c0, w, drop)
                higher = s > pos[k].unsqueeze(1)
                if seg.diag == DIAG_PROTECT and rows.numel():
                    higher[rows, rows + (p.offset - c0)] = False  # the positive: not a rival
                above[k] += higher.sum(1)
                s = x.harden(seg, c0, w, s)
                m_new = torch.maximum(m[k], s.amax(1))
                # A row whose every entry so far is dropped keeps m = -inf; shift it by 0
                # instead so that exp(-inf - shift) = 0 rather than exp(-inf + inf) = NaN.
                shift = torch.where(torch.isinf(m_new), 0.0, m_new)
                sums = s.sub_(shift.unsqueeze(1)).exp_().sum(1)
                acc[k] = acc[k] * torch.exp(m[k] - shift) + sums
                m[k] = m_new
    lse = torch.where(acc > 0, m + acc.log(), float("-inf"))
    return lse - pos, masked, above, threshold.float(), lse, bits


def backward(
    problems: Sequence[Problem],
    grad_loss: torch.Tensor,
    lse: torch.Tensor,
    bits: torch.Tensor,
    chunk: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of ``Σ_w Σ_i grad_loss[w, i] · loss[w, i]`` w.r.t. every problem's ``left`` and
    ``cands`` (their dtypes; width after width). ``lse`` and ``bits``: from :func:`forward`."""
    p = problems[0]
    chunk = chunk or chunk_width(p.rows)
    t = _Tiles(p, chunk, None if bits.numel() else exact_threshold(p))
    widths = [_Width(q, t) for q in problems]
    w_rows = (grad_loss.float() / p.temperature).unsqueeze(2)  # chain rule through s/τ
    lse_cols = torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(2)  # never -inf in practice
    dleft = [[torch.zeros(x.shape, device=x.device) for x in q.left] for q in problems]
    dcands = [[torch.zeros(x.shape, device=x.device) for x in q.cands] for q in problems]
    for j, seg in enumerate(p.segments):
        for c0, w in t.chunks():
            if bits.numel():
                drop = unpack_bits(bits[j, :, c0 // 8 : c0 // 8 + (w + 7) // 8], w)
            else:
                drop, _ = t.drop(seg, c0, w)
            rows = t.diag_rows(c0, w)
            for k, x in enumerate(widths):
                s, cand = x.logits(seg, c0, w, drop)
                prob = x.harden(seg, c0, w, s).sub_(lse_cols[k]).exp_()  # the masked softmax P
                if seg.diag == DIAG_PROTECT and rows.numel():
                    prob[rows, rows + (p.offset - c0)] -= 1.0  # the one-hot, in float32
                # d(logit)/ds is 1/τ with or without hardness (its α·s carries no gradient)
                prob.mul_(w_rows[k])
                dleft[k][seg.left].addmm_(prob, cand)
                dcands[k][seg.cand][c0 : c0 + w].addmm_(prob.T, x.left[seg.left])
    return (
        [g.to(x.dtype) for q, gs in zip(problems, dleft) for g, x in zip(gs, q.left)],
        [g.to(x.dtype) for q, gs in zip(problems, dcands) for g, x in zip(gs, q.cands)],
    )


__all__ = ["TILE_ELEMS", "backward", "chunk_width", "forward"]
