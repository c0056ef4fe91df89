"""The problem every loss backend sees, and the arithmetic they must share (docs/loss.md).

The loss of query row i is a log-sum-exp over candidate *segments* (AP, AA, PP, AN_k). A segment
names its left operand (the local anchor or positive rows) and its candidate tensor; AP and PP
share the positives, so a :class:`Problem` holds each candidate tensor once and never
concatenates them:

* ``left``  ``(anchors, positives)``, ``[b, d]`` each: L2-normalised student rows;
* ``cands`` the distinct candidate tensors ``[N, d]`` (normalised, the global pool);
* ``guide_left`` / ``guide_cands``: their guide twins, ``[b | N, d_g]``, *not* normalised: a
  backend scales each guide dot product by the two inverse norms (:func:`inv_norm`), so the
  front end never copies the guide pool;
* every operand in one dtype (the compute dtype; docs/loss.md "Precision").

A backend returns per query row: the loss ``lse - s_pos/τ`` (differentiable), the number of
masked candidates per segment, the number of unmasked candidates scoring above the positive, and
the threshold ``t_i``. Masking (strict ``>``): ``absolute``: ``g > t - margin``; ``relative``:
``g > t - |t| * margin``.

**Exact masks on CPU.** A tie (a duplicate of row i's positive has ``g = t_i``) must be decided
the same way for every pair, but a BLAS matrix product rounds differently with its shape (and
the diagonal of a product differs from a row-wise dot). :func:`exact_over` therefore decides the
few pairs within rounding distance of the limit again in float64 with one fixed summation
(:func:`exact_sim`), which also gives ``t_i``; the ``reference`` and ``chunked`` backends use it.
The Triton kernel gets the same property by computing ``t_i`` with the same tile code as ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# What happens to column ``offset + i`` of row i within a segment.
DIAG_NONE = 0  # an ordinary candidate (AN_k)
DIAG_PROTECT = 1  # the labelled positive: always kept, never counted as masked (AP)
DIAG_EXCLUDE = 2  # the self-pair: never a candidate, not counted (AA, PP)

Strategy = Literal["absolute", "relative"]
STRATEGIES: tuple[str, ...] = ("absolute", "relative")

# Hardness weighting (docs/loss.md "Hardness weighting"): which entries of a segment get the
# logit ``s/τ + α·sg(s)``, as bit flags of ``Segment.hard``. The modes are sentence-transformers'
# ``hardness_mode`` names; like there, only anchor-to-document logits (AP, AN) are weighted.
HARD_OFF = 1  # the entries j != i of the segment
HARD_DIAG = 2  # the entry j = i (row i's own explicit hard negative)
HARDNESS_MODES: tuple[str, ...] = ("hard_negatives", "in_batch_negatives", "all_negatives")
_HARD_CODES = {  # mode -> (AP code, AN code)
    "hard_negatives": (0, HARD_DIAG),
    "in_batch_negatives": (HARD_OFF, HARD_OFF),
    "all_negatives": (HARD_OFF, HARD_OFF | HARD_DIAG),
}

ANCHOR, POSITIVE = 0, 1  # left slots


@dataclass(frozen=True)
class Segment:
    name: str  # "ap", "aa", "pp", "an1", "an2", ...
    left: int  # ANCHOR or POSITIVE
    cand: int  # index into Problem.cands
    diag: int  # DIAG_NONE, DIAG_PROTECT or DIAG_EXCLUDE
    hard: int = 0  # HARD_OFF | HARD_DIAG: entries weighted by hardness (when hardness > 0)


@dataclass(frozen=True)
class Problem:
    """Everything a backend needs (see the module docstring)."""

    left: tuple[torch.Tensor, torch.Tensor]
    cands: tuple[torch.Tensor, ...]
    guide_left: tuple[torch.Tensor, torch.Tensor]
    guide_cands: tuple[torch.Tensor, ...]
    segments: tuple[Segment, ...]
    offset: int  # global column of local row 0's positive / self-pair
    temperature: float
    margin: float
    strategy: Strategy
    hardness: float = 0.0  # α of the hardness weighting; 0 = off

    @property
    def rows(self) -> int:
        return self.left[0].shape[0]

    @property
    def pool(self) -> int:
        return self.cands[0].shape[0]

    @property
    def ap(self) -> Segment:
        return self.segments[0]


@dataclass
class BackendOutput:
    loss: torch.Tensor  # [b] float32, lse_i - s_pos_i/τ, differentiable w.r.t. left and cands
    masked: torch.Tensor  # [b, S] int64, masked candidates per segment (no grad)
    above: torch.Tensor  # [b] int64, unmasked candidates with s/τ > the positive's (no grad)
    threshold: torch.Tensor  # [b] float32, t_i


def build_segments(
    num_negatives: int,
    contrast_anchors: bool,
    contrast_positives: bool,
    hardness_mode: str = "hard_negatives",
) -> tuple[tuple[Segment, ...], tuple[str, ...]]:
    """Segments in the order AP, AA, PP, AN_1..k, and which column each candidate tensor is
    (``"positive"``, ``"anchor"``, ``"negative_k"``); a column no segment uses is not listed.
    ``hardness_mode`` sets which entries hardness weighting applies to (when it is on)."""
    hard_ap, hard_an = _HARD_CODES[hardness_mode]
    sources = ["positive"] + (["anchor"] if contrast_anchors else [])
    segs = [Segment("ap", ANCHOR, 0, DIAG_PROTECT, hard_ap)]
    if contrast_anchors:
        segs.append(Segment("aa", ANCHOR, 1, DIAG_EXCLUDE))
    if contrast_positives:
        segs.append(Segment("pp", POSITIVE, 0, DIAG_EXCLUDE))
    for k in range(num_negatives):
        segs.append(Segment(f"an{k + 1}", ANCHOR, len(sources), DIAG_NONE, hard_an))
        sources.append(f"negative_{k + 1}")
    return tuple(segs), tuple(sources)


def mask_limit(threshold: torch.Tensor, margin: float, strategy: str) -> torch.Tensor:
    """Per-row guide similarity above which a candidate is masked."""
    if strategy == "absolute":
        return threshold - margin
    return threshold - threshold.abs() * margin


def hardness_factors(p: Problem, seg: Segment) -> tuple[float, float]:
    """``(off-diagonal, diagonal)`` factors on the logits ``s/τ`` of ``seg``: ``1 + α·τ`` where
    hardness weighting applies (``s/τ + α·s``, the added ``α·s`` without gradient), else 1."""
    factor = 1.0 + p.hardness * p.temperature
    off = factor if seg.hard & HARD_OFF else 1.0
    return off, factor if seg.hard & HARD_DIAG else 1.0


def inv_norm(x: torch.Tensor) -> torch.Tensor:
    """``1 / max(‖x_i‖, 1e-12)`` per row, float32 (as ``F.normalize``)."""
    return x.float().norm(dim=-1).clamp_min(1e-12).reciprocal()


def exact_sim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine of the row pairs ``(x_i, y_i)`` in float64, summed in one fixed order, so equal
    pairs give bitwise-equal results wherever they occur."""
    x, y = x.double(), y.double()
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-12)


def exact_threshold(p: Problem) -> torch.Tensor:
    """``t_i = g(a_i, p_i)`` in float64 (:func:`exact_sim`); row i's positive is column
    ``offset + i`` of the AP candidates."""
    cols = slice(p.offset, p.offset + p.rows)
    return exact_sim(p.guide_left[p.ap.left], p.guide_cands[p.ap.cand][cols])


def exact_over(
    g: torch.Tensor, limit: torch.Tensor, guide_left: torch.Tensor, guide_cand: torch.Tensor
) -> torch.Tensor:
    """``g_ij > limit_i`` decided exactly: ``g`` ``[rows, w]`` is the float32 guide cosine of
    ``guide_left`` ``[rows, K]`` and ``guide_cand`` ``[w, K]``, ``limit`` is float64. Pairs whose
    ``g`` lies within the rounding bound of a float32 dot product of length K of the limit are
    recomputed with :func:`exact_sim` (a few per ten thousand pairs)."""
    band = (guide_left.shape[1] + 4) * 2.0**-23  # > K·2^-24 + the limit's own rounding
    lim32 = limit.float().unsqueeze(1)
    over = g > lim32
    near = (g - lim32).abs_() <= band
    idx = near.nonzero()
    if idx.numel():
        i, j = idx.unbind(1)
        over[i, j] = exact_sim(guide_left[i], guide_cand[j]) > limit[i]
    return over


# ---------------------------------------------------------------------------- the mask as bits
# Forward passes store which entries they dropped, one bit per (row, candidate), so the backward
# needs no guide GEMM and sees exactly the forward's mask. Layout: uint8 ``[S, b, 4·ceil(N/32)]``,
# bit ``j % 8`` of byte ``j // 8`` is candidate j; set = dropped (masked, self-pair or padding).
# Rows are whole little-endian int32 words (bit ``j % 32`` of word ``j // 32``), the unit the
# Triton kernels store; the bytes past ``ceil(N/8)`` are padding, all bits set.
# When that exceeds MASK_BITS_FRACTION of the device's memory, nothing is stored and the
# backward recomputes the guide tiles (shape ``[0]``).

MASK_BITS_FRACTION = 1 / 8


def mask_bits_shape(segments: int, rows: int, pool: int, device: torch.device) -> tuple[int, ...]:
    shape = (segments, rows, 4 * -(-pool // 32))
    if segments * rows * shape[2] > MASK_BITS_FRACTION * device_memory(device):
        return (0,)
    return shape


def device_memory(device: torch.device) -> int:
    """Total memory of ``device`` in bytes (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pack_bits(drop: torch.Tensor) -> torch.Tensor:
    """``[rows, w]`` bool -> ``[rows, ceil(w/8)]`` uint8 (padding bits set)."""
    rows, w = drop.shape
    pad = -w % 8
    if pad:
        drop = torch.cat([drop, drop.new_ones(rows, pad)], 1)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=drop.device)
    return (drop.view(rows, -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[rows, ceil(w/8)]`` uint8 -> ``[rows, w]`` bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and_(1)
    return bits.view(packed.shape[0], -1)[:, :w].bool()
