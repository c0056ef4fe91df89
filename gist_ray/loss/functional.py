"""The maths of the GIST loss front end, shared by :class:`~gist_ray.loss.GistLoss` and
:func:`gist_loss` (definition: docs/loss.md).

:func:`compute` checks the embeddings, brings them to one compute dtype, L2-normalises the
student rows, optionally gathers the candidate pool across workers, builds the segment plan
(:mod:`gist_ray.loss.plan`, no concatenated copies) and hands it to a backend: ``reference``
(materialised oracle) or a tiled one through the custom op of :mod:`gist_ray.loss.op`
(``chunked`` on the CPU, the Triton kernels of :mod:`gist_ray.kernels` on CUDA).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gist_ray.distributed import all_gather_with_grad, rank
from gist_ray.loss.op import tiled_backend
from gist_ray.loss.plan import (
    DIAG_NONE,
    STRATEGIES,
    BackendOutput,
    Problem,
    build_segments,
)
from gist_ray.loss.reference import reference_backend

BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def validate_loss_args(
    temperature: float, margin: float, margin_strategy: str, backend: str = "auto"
) -> None:
    """One-line ValueErrors naming the config key."""
    if not temperature > 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")
    if not margin >= 0:
        raise ValueError(f"loss.margin must be >= 0, got {margin}")
    if margin_strategy not in STRATEGIES:
        raise ValueError(
            f"loss.margin_strategy: unknown strategy {margin_strategy!r}; "
            f"allowed: {', '.join(STRATEGIES)}"
        )
    if backend not in BACKENDS:
        raise ValueError(
            f"loss.backend: unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}"
        )


def compute(
    embeddings: Sequence[torch.Tensor],
    guide_embeddings: Sequence[torch.Tensor],
    *,
    temperature: float,
    margin: float,
    margin_strategy: str,
    contrast_anchors: bool,
    contrast_positives: bool,
    backend: str,
    gather: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (mean over local rows) and its statistics as 0-dim tensors (no host sync).

    ``embeddings`` is ``[anchor, positive, negative_1..k]`` (student, ``[b, d]`` each) and
    ``guide_embeddings`` their guide twins (``[b, d_g]``, never differentiated). Settings are
    assumed valid (see :func:`validate_loss_args`)."""
    dtype = check_inputs(embeddings, guide_embeddings)
    # Normalise in float32, round once to the compute dtype (autograd: the backward in float32).
    student = [F.normalize(x.float(), dim=-1).to(dtype) for x in embeddings]
    guide = [g.detach().to(dtype) for g in guide_embeddings]  # backends normalise per tile
    k = len(embeddings) - 2
    segments, sources = build_segments(k, contrast_anchors, contrast_positives)
    column = {name: j for j, name in enumerate(column_names(len(embeddings)))}
    cands = [student[column[s]] for s in sources]
    guide_cands = [guide[column[s]] for s in sources]
    offset = 0
    if gather:
        offset = rank() * student[0].shape[0]
        cands = [all_gather_with_grad(x) for x in cands]
        guide_cands = [all_gather_with_grad(x) for x in guide_cands]
    problem = Problem(
        (student[0], student[1]), tuple(cands), (guide[0], guide[1]), tuple(guide_cands),
        segments, offset, temperature, margin, margin_strategy,
    )  # fmt: skip
    out = reference_backend(problem) if backend == "reference" else tiled_backend(problem, backend)
    return out.loss.mean(), statistics(problem, out)


def column_names(n: int) -> list[str]:
    return ["anchor", "positive"] + [f"negative_{k + 1}" for k in range(n - 2)]


def check_inputs(
    embeddings: Sequence[torch.Tensor], guide_embeddings: Sequence[torch.Tensor]
) -> torch.dtype:
    """One-line ValueErrors naming the tensor, before anything runs; returns the compute dtype
    (the student's, promoted over its columns: docs/loss.md "Precision")."""
    if len(embeddings) < 2:
        raise ValueError(f"need at least anchor and positive embeddings, got {len(embeddings)}")
    if len(embeddings) != len(guide_embeddings):
        raise ValueError(
            f"got {len(embeddings)} student columns but {len(guide_embeddings)} guide columns"
        )
    names = column_names(len(embeddings))
    named = [*zip(names, embeddings), *zip([f"guide_{n}" for n in names], guide_embeddings)]
    anchor, guide_anchor = embeddings[0], guide_embeddings[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-d tensor [rows, width], got {_describe(t)}")
        if t.dtype not in DTYPES:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {allowed}")
        if t.device != anchor.device:
            raise ValueError(f"{name} is on {t.device} but anchor is on {anchor.device}")
        if t.shape[0] != anchor.shape[0]:
            raise ValueError(f"{name} has {t.shape[0]} rows, anchor has {anchor.shape[0]}")
        width = guide_anchor.shape[1] if name.startswith("guide_") else anchor.shape[1]
        if t.shape[1] != width:
            ref = "guide_anchor" if name.startswith("guide_") else "anchor"
            raise ValueError(f"{name} has width {t.shape[1]}, {ref} has {width}")
    if anchor.shape[0] == 0:
        raise ValueError("anchor has no rows")
    dtype = embeddings[0].dtype
    for t in embeddings[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def statistics(p: Problem, out: BackendOutput) -> dict[str, torch.Tensor]:
    """Per-segment mask fractions and GIST diagnostics over the local rows (0-dim tensors)."""
    stats: dict[str, torch.Tensor] = {}
    masked = out.masked.double()
    maskable_total = 0
    for j, seg in enumerate(p.segments):
        # The positive (AP) and the self-pair (AA, PP) are never maskable candidates.
        maskable = p.pool - (0 if seg.diag == DIAG_NONE else 1)
        maskable_total += maskable
        stats[f"mask_frac/{seg.name}"] = masked[:, j].mean() / max(maskable, 1)
    stats["mask_frac/all"] = masked.sum(1).mean() / max(maskable_total, 1)
    stats["threshold_mean"] = out.threshold.detach().double().mean()
    stats["positive_rank_mean"] = (1 + out.above.double()).mean()
    stats["no_negative_frac"] = (masked.sum(1) >= maskable_total).double().mean()
    return stats


def gist_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    guide_anchor: torch.Tensor,
    guide_positive: torch.Tensor,
    negatives: Sequence[torch.Tensor] = (),
    guide_negatives: Sequence[torch.Tensor] = (),
    *,
    temperature: float = 0.01,
    margin: float = 0.0,
    margin_strategy: str = "absolute",
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    backend: str = "auto",
    gather: bool = False,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """GISTEmbed loss, mean over the local query rows (functional form of ``GistLoss``).

    ``anchor``/``positive``/``negatives[k]`` are student embeddings ``[b, d]``; the ``guide_*``
    twins are ``[b, d_g]`` and never receive gradient. With ``gather=True`` inside an initialised
    process group, every candidate set is all-gathered with gradient so each local query sees the
    global pool. With ``return_stats=True`` also returns a dict of float statistics:
    ``mask_frac/<segment>``, ``threshold_mean``, ``positive_rank_mean`` and ``no_negative_frac``
    (``float()`` of each costs a host sync; :class:`GistLoss` returns them as tensors).
    """
    validate_loss_args(temperature, margin, margin_strategy, backend)
    negatives, guide_negatives = list(negatives), list(guide_negatives)
    if len(negatives) != len(guide_negatives):
        raise ValueError(
            f"got {len(negatives)} negative columns but {len(guide_negatives)} guide negatives"
        )
    loss, stats = compute(
        [anchor, positive, *negatives], [guide_anchor, guide_positive, *guide_negatives],
        temperature=temperature, margin=margin, margin_strategy=margin_strategy,
        contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
        backend=backend, gather=gather,
    )  # fmt: skip
    if not return_stats:
        return loss
    return loss, {k: float(v.detach()) for k, v in stats.items()}
