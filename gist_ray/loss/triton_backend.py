"""The ``triton`` loss backend: a thin adapter from the segment plan to the fused kernel."""

from __future__ import annotations

from gist_ray.loss.plan import BackendOutput, Problem, mask_limit


def triton_backend(problem: Problem) -> BackendOutput:
    """Fused Triton kernel (:mod:`gist_ray.kernels`); CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1`` (set before ``gist_ray.kernels`` is first imported)."""
    from gist_ray.kernels.gist_function import gist_lse  # imports triton: only when chosen

    p = problem
    limit = mask_limit(p.threshold.float(), p.margin, p.strategy)
    lse, masked, above = gist_lse(
        p.left, p.cand, p.guide_left, p.guide_cand, limit, p.pos_logit,
        p.segments, p.offset, p.temperature,
    )  # fmt: skip
    return BackendOutput(lse, masked, above)
