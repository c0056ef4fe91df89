"""The naive, fully materialised GIST loss: the oracle every other backend is tested against.

Memory is O(b × N) per segment; use it for tests and small batches only. Arithmetic is float32
(16-bit inputs are upcast, so products are exact); autograd differentiates ``lse - s_pos/τ`` as
one expression, so the positive's one-hot is subtracted in float32 before anything is rounded.
"""

from __future__ import annotations

import torch

from gist_ray.loss.plan import (
    DIAG_EXCLUDE,
    DIAG_PROTECT,
    BackendOutput,
    Problem,
    exact_over,
    exact_threshold,
    hardness_factors,
    inv_norm,
    mask_limit,
)


def reference_backend(p: Problem, above_slack: float = 0.0) -> BackendOutput:
    """``above_slack``: count rivals above the positive's logit plus this (tests probe near-ties
    with it)."""
    b = p.rows
    rows = torch.arange(b, device=p.left[0].device)
    threshold = exact_threshold(p)
    limit = mask_limit(threshold, p.margin, p.strategy)
    logits, masked, rivals = [], [], []
    pos = None
    for seg in p.segments:
        gl, gc = p.guide_left[seg.left], p.guide_cands[seg.cand]
        s = p.left[seg.left].float() @ p.cands[seg.cand].float().T / p.temperature
        g = gl.float() @ gc.float().T * inv_norm(gl).unsqueeze(1) * inv_norm(gc)
        mask = exact_over(g, limit, gl, gc)
        diag = torch.zeros_like(mask)
        diag[rows, p.offset + rows] = True
        if seg.diag == DIAG_PROTECT:
            mask &= ~diag
            pos = s[rows, p.offset + rows]
        counted = mask.clone()
        if seg.diag == DIAG_EXCLUDE:
            mask |= diag
            counted &= ~diag
        s = s.masked_fill(mask, float("-inf"))
        # The positive is never its own rival; rivals are ranked by s/τ, before hardness.
        rivals.append(s.masked_fill(diag, float("-inf")) if seg.diag else s)
        logits.append(_harden(p, seg, s, diag))
        masked.append(counted.sum(1))
    scores = torch.cat(logits, dim=1)
    above = (torch.cat(rivals, dim=1) > pos.detach().unsqueeze(1) + above_slack).sum(1)
    loss = torch.logsumexp(scores, dim=1) - pos
    return BackendOutput(loss, torch.stack(masked, 1), above, threshold.float())


def _harden(p: Problem, seg, s: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    """Hardness weighting after the mask: ``s/τ + α·sg(s)`` on the segment's weighted entries
    (masked entries stay -inf)."""
    off, on_diag = hardness_factors(p, seg)
    if off == on_diag == 1.0:
        return s
    weighted = diag if off == 1.0 else ~diag if on_diag == 1.0 else torch.ones_like(diag)
    return torch.where(weighted, s + p.hardness * p.temperature * s.detach(), s)
