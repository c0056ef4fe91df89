"""The naive, fully materialised GIST loss: the oracle every other backend is tested against.

Memory is O(b × N) per segment; use it for tests and small batches only.
"""

from __future__ import annotations

import torch

from gist_ray.loss.plan import DIAG_EXCLUDE, DIAG_PROTECT, BackendOutput, Problem, mask_limit


def reference_backend(p: Problem) -> BackendOutput:
    b = p.rows
    rows = torch.arange(b, device=p.left.device)
    limit = mask_limit(p.threshold, p.margin, p.strategy).unsqueeze(1)
    logits, masked, rivals = [], [], []
    for seg in p.segments:
        left = p.left[seg.left * b : (seg.left + 1) * b].float()
        guide_left = p.guide_left[seg.left * b : (seg.left + 1) * b].float()
        cand = p.cand[seg.start : seg.start + seg.size].float()
        guide_cand = p.guide_cand[seg.start : seg.start + seg.size].float()
        s = left @ cand.T / p.temperature
        mask = (guide_left @ guide_cand.T) > limit
        diag = torch.zeros_like(mask)
        diag[rows, p.offset + rows] = True
        if seg.diag == DIAG_PROTECT:
            mask &= ~diag
        counted = mask.clone()
        if seg.diag == DIAG_EXCLUDE:
            mask |= diag
            counted &= ~diag
        logits.append(s.masked_fill(mask, float("-inf")))
        masked.append(counted.sum(1))
        # The positive is never its own rival (its logit here may round above pos_logit).
        rivals.append(logits[-1].masked_fill(diag, float("-inf")) if seg.diag else logits[-1])
    scores = torch.cat(logits, dim=1)
    above = (torch.cat(rivals, dim=1) > p.pos_logit.unsqueeze(1)).sum(1)
    return BackendOutput(torch.logsumexp(scores, dim=1), torch.stack(masked, 1), above)
