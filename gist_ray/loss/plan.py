"""The segment plan shared by every loss backend.

The GIST loss of query row i is a log-sum-exp over several candidate *segments* (AP, AA, PP,
AN_k). Every backend sees the same flattened problem, so there is one code path for all of them:

* ``left``   ``[2*b, d]``: the anchor rows (slot 0, rows ``0..b-1``) then the local positive rows
  (slot 1, rows ``b..2b-1``); ``guide_left`` ``[2*b, d_g]`` is their guide twin.
* ``cand``   ``[N_total, d]``: every segment's candidates concatenated; ``guide_cand`` likewise.
* ``segments``: where each segment's columns lie, which left slot it uses, and what happens on its
  diagonal column ``offset + i`` (the labelled positive in AP, the self-pair in AA and PP).

A backend returns, per query row, the log-sum-exp of ``s/τ`` over unmasked candidates, the number
of masked candidates per segment, and the number of unmasked candidates scoring above the
positive (for the positive's rank). Masking (strict ``>``):
``absolute``: ``g > t - margin``; ``relative``: ``g > t - |t| * margin``.
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


@dataclass(frozen=True)
class Segment:
    name: str  # "ap", "aa", "pp", "an1", "an2", ...
    left: int  # 0: anchor rows, 1: positive rows
    start: int  # first column in the concatenated candidates
    size: int  # number of columns
    diag: int  # DIAG_NONE, DIAG_PROTECT or DIAG_EXCLUDE


@dataclass(frozen=True)
class Problem:
    """Everything a backend needs; tensors are already L2-normalised."""

    left: torch.Tensor  # [2b, d]
    guide_left: torch.Tensor  # [2b, d_g]
    cand: torch.Tensor  # [N_total, d]
    guide_cand: torch.Tensor  # [N_total, d_g]
    threshold: torch.Tensor  # [b] float32, t_i = g(a_i, p_i)
    pos_logit: torch.Tensor  # [b] float32, s(a_i, p_i) / τ, detached (for the rank statistic)
    segments: tuple[Segment, ...]
    offset: int  # global column of local row 0's positive / self-pair
    temperature: float
    margin: float
    strategy: Strategy

    @property
    def rows(self) -> int:
        return self.threshold.shape[0]


@dataclass
class BackendOutput:
    lse: torch.Tensor  # [b] float32, differentiable w.r.t. left and cand
    masked: torch.Tensor  # [b, S] int64, masked candidates per segment (no grad)
    above: torch.Tensor  # [b] int64, unmasked candidates with s/τ > pos_logit (no grad)


def mask_limit(threshold: torch.Tensor, margin: float, strategy: str) -> torch.Tensor:
    """Per-row guide similarity above which a candidate is masked."""
    if strategy == "absolute":
        return threshold - margin
    return threshold - threshold.abs() * margin


def build_segments(
    b: int,
    pool: int,
    num_negatives: int,
    contrast_anchors: bool,
    contrast_positives: bool,
) -> tuple[Segment, ...]:
    """Segments in the normative order AP, AA, PP, AN_1..k; each has ``pool`` columns."""
    specs = [("ap", 0, DIAG_PROTECT)]
    if contrast_anchors:
        specs.append(("aa", 0, DIAG_EXCLUDE))
    if contrast_positives:
        specs.append(("pp", 1, DIAG_EXCLUDE))
    specs += [(f"an{k + 1}", 0, DIAG_NONE) for k in range(num_negatives)]
    return tuple(
        Segment(name, left, i * pool, pool, diag) for i, (name, left, diag) in enumerate(specs)
    )
