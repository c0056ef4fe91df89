"""Tiled pure-PyTorch GIST loss: the CPU backend, with memory linear in the batch.

The forward pass walks each segment's candidate columns in chunks, computing the student tile
``L·Cᵀ/τ`` and the guide tile ``GL·GCᵀ`` of one chunk at a time, masking it and folding it into
a per-row online (max, sum); only the per-row lse is saved. The backward pass recomputes every
tile from that lse, turns it into the masked softmax ``P`` and accumulates
``dL = (dlse/τ)·P·C`` and ``dC = Pᵀ·(dlse/τ)·L``. Peak memory is a few ``rows × chunk`` fp32
buffers plus the inputs and their gradients, never ``rows × N``.

All arithmetic is fp32 (fp16/bf16 inputs are upcast one chunk at a time); gradients are returned
in the input dtype.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from gist_ray.loss.plan import (
    DIAG_EXCLUDE,
    DIAG_NONE,
    DIAG_PROTECT,
    BackendOutput,
    Problem,
    Segment,
    mask_limit,
)

# Elements of one rows × chunk fp32 tile buffer (16 MiB). Large enough for the matmuls to run at
# full speed, small enough to stay a rounding error next to the b × N of the reference.
TILE_ELEMS = 1 << 22
MIN_CHUNK, MAX_CHUNK = 32, 8192


def chunk_width(rows: int, tile_elems: int | None = None) -> int:
    """Columns per chunk so that ``rows × chunk`` stays near ``tile_elems`` (default
    :data:`TILE_ELEMS`)."""
    return max(MIN_CHUNK, min(MAX_CHUNK, (tile_elems or TILE_ELEMS) // max(rows, 1)))


class _Tiles:
    """Preallocated tile buffers (re-used by every chunk: a fresh 16 MiB allocation per chunk
    would cost page faults comparable to the element-wise work) and the masked-tile maths."""

    def __init__(self, p: Problem, chunk: int) -> None:
        b, dev = p.rows, p.left.device
        self.p, self.b, self.chunk = p, b, chunk
        self.s = torch.empty(b * chunk, device=dev)
        self.g = torch.empty(b * chunk, device=dev)
        self.mask = torch.empty(b * chunk, dtype=torch.bool, device=dev)
        self.limit = mask_limit(p.threshold.float(), p.margin, p.strategy).unsqueeze(1)
        # Per slot: student rows pre-scaled by 1/τ (so one matmul yields logits), guide rows.
        inv_tau = 1.0 / p.temperature
        self.left = [p.left[k * b : (k + 1) * b].float() * inv_tau for k in (0, 1)]
        self.guide_left = [p.guide_left[k * b : (k + 1) * b].float() for k in (0, 1)]

    def chunks(self, seg: Segment):
        for c0 in range(0, seg.size, self.chunk):
            yield c0, min(self.chunk, seg.size - c0)

    def masked_logits(
        self, seg: Segment, c0: int, w: int, count: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Logits of columns ``c0 .. c0+w`` of ``seg``, dropped entries set to -inf.

        Returns the logits ``[b, w]``, the float32 candidate chunk, the masked count per row (if
        ``count``) and the rows whose diagonal column ``offset + i`` lies in this chunk."""
        p, b = self.p, self.b
        lo = seg.start + c0
        cand = p.cand[lo : lo + w].float()
        s = torch.mm(self.left[seg.left], cand.T, out=self.s[: b * w].view(b, w))
        g = torch.mm(self.guide_left[seg.left], p.guide_cand[lo : lo + w].float().T,
                     out=self.g[: b * w].view(b, w))  # fmt: skip
        mask = torch.gt(g, self.limit, out=self.mask[: b * w].view(b, w))
        # Row i's diagonal column offset + i, for the rows whose diagonal lies in this chunk.
        first, last = max(0, c0 - p.offset), max(0, min(b, c0 + w - p.offset))
        rows = torch.arange(first, max(first, last), device=s.device)
        if seg.diag != DIAG_NONE and rows.numel():
            mask[rows, rows + (p.offset - c0)] = False  # neither kind is counted as masked
        counts = mask.sum(1) if count else None
        if seg.diag == DIAG_EXCLUDE and rows.numel():
            mask[rows, rows + (p.offset - c0)] = True
        s.masked_fill_(mask, float("-inf"))
        return s, cand, counts, rows


class _ChunkedGist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left, cand, guide_left, guide_cand, p: Problem, chunk: int):
        t = _Tiles(p, chunk)
        b, dev = p.rows, left.device
        neg_inf = torch.tensor(float("-inf"), device=dev)
        m = torch.full((b,), float("-inf"), device=dev)  # running row max
        acc = torch.zeros(b, device=dev)  # running sum of exp(s - m)
        masked = torch.zeros(b, len(p.segments), dtype=torch.long, device=dev)
        above = torch.zeros(b, dtype=torch.long, device=dev)
        pos = p.pos_logit.float().unsqueeze(1)
        for j, seg in enumerate(p.segments):
            for c0, w in t.chunks(seg):
                s, _, counts, rows = t.masked_logits(seg, c0, w)
                masked[:, j] += counts
                above += torch.gt(s, pos, out=t.mask[: b * w].view(b, w)).sum(1)
                if seg.diag == DIAG_PROTECT and rows.numel():
                    # The positive is never above itself (its matmul logit may round above the
                    # front end's pos_logit; the reference then counts it).
                    above[rows] -= (s[rows, rows + (p.offset - c0)] > pos[rows, 0]).long()
                m_new = torch.maximum(m, s.amax(1))
                # A row whose every entry so far is masked keeps m = -inf; shift it by 0 instead
                # so that exp(-inf - shift) = 0 rather than exp(-inf + inf) = NaN.
                shift = torch.where(m_new == neg_inf, 0.0, m_new)
                acc = acc * torch.exp(m - shift) + s.sub_(shift.unsqueeze(1)).exp_().sum(1)
                m = m_new
        lse = torch.where(acc > 0, m + acc.log(), neg_inf)
        ctx.save_for_backward(left, cand, guide_left, guide_cand, lse)
        ctx.problem, ctx.chunk = p, chunk
        ctx.mark_non_differentiable(masked, above)
        return lse, masked, above

    @staticmethod
    def backward(ctx, dlse, _dmasked, _dabove):
        left, cand, guide_left, guide_cand, lse = ctx.saved_tensors
        # Read the saved tensors (autograd checked their versions), not the Problem's references.
        p = replace(ctx.problem, left=left, cand=cand, guide_left=guide_left, guide_cand=guide_cand)
        t = _Tiles(p, ctx.chunk)
        b = p.rows
        w_row = dlse.float() / p.temperature  # dlse_i / τ: chain rule through s = L·Cᵀ/τ
        lse_col = lse.unsqueeze(1)
        # An all-masked row has lse = -inf (never in practice: the positive is always kept).
        lse_col = torch.where(torch.isinf(lse_col), 0.0, lse_col)
        dleft = torch.zeros(2 * b, left.shape[1], device=left.device)
        dcand = torch.zeros(cand.shape, device=cand.device) if ctx.needs_input_grad[1] else None
        scaled_left = [left[k * b : (k + 1) * b].float() * w_row.unsqueeze(1) for k in (0, 1)]
        for seg in p.segments:
            rows = slice(seg.left * b, (seg.left + 1) * b)
            for c0, w in t.chunks(seg):
                s, c, _, _ = t.masked_logits(seg, c0, w, count=False)
                prob = s.sub_(lse_col).exp_()  # the masked softmax P (masked entries: exp(-inf))
                if ctx.needs_input_grad[0]:
                    dleft[rows].addmm_(prob, c)
                if dcand is not None:
                    lo = seg.start + c0
                    torch.mm(prob.T, scaled_left[seg.left], out=dcand[lo : lo + w])
        dleft = (dleft * w_row.repeat(2).unsqueeze(1)).to(left.dtype)
        if not ctx.needs_input_grad[0]:
            dleft = None
        if dcand is not None:
            dcand = dcand.to(cand.dtype)
        return dleft, dcand, None, None, None, None


def chunked_backend(problem: Problem, chunk: int | None = None) -> BackendOutput:
    """Tiled backend; ``chunk`` columns per tile (default: :func:`chunk_width` of the rows)."""
    chunk = chunk or chunk_width(problem.rows)
    lse, masked, above = _ChunkedGist.apply(
        problem.left, problem.cand, problem.guide_left, problem.guide_cand, problem, chunk
    )
    return BackendOutput(lse, masked, above)


__all__ = ["TILE_ELEMS", "chunk_width", "chunked_backend"]
