"""The maths of the GIST loss front end, shared by :class:`~gist_ray.loss.GistLoss` and
:func:`gist_loss` (definition: docs/loss.md).

:func:`compute` normalises the embeddings, optionally gathers the candidate pool across
workers, builds the segment plan (:mod:`gist_ray.loss.plan`) and hands the flattened problem to a
backend: ``reference`` (materialised oracle), ``chunked`` (tiled PyTorch) or ``triton`` (the
fused kernel in :mod:`gist_ray.kernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gist_ray.distributed import all_gather_with_grad, rank
from gist_ray.loss.plan import (
    DIAG_EXCLUDE,
    DIAG_PROTECT,
    STRATEGIES,
    BackendOutput,
    Problem,
    build_segments,
)
from gist_ray.loss.reference import reference_backend

BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "triton")


def get_backend(name: str, device: torch.device) -> Callable[[Problem], BackendOutput]:
    """Resolve a backend name; ``auto`` means ``triton`` on CUDA and ``chunked`` elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "chunked"
    if name == "reference":
        return reference_backend
    if name == "chunked":
        from gist_ray.loss.chunked import chunked_backend

        return chunked_backend
    if name == "triton":
        from gist_ray.loss.triton_backend import triton_backend

        return triton_backend
    raise ValueError(f"loss.backend: unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")


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
    if len(embeddings) < 2:
        raise ValueError(f"need at least anchor and positive embeddings, got {len(embeddings)}")
    if len(embeddings) != len(guide_embeddings):
        raise ValueError(
            f"got {len(embeddings)} student columns but {len(guide_embeddings)} guide columns"
        )
    anchor = embeddings[0]
    b = anchor.shape[0]
    for name, t in zip(_column_names(len(embeddings))[1:], embeddings[1:]):
        if t.shape != anchor.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, anchor has {tuple(anchor.shape)}")
    run = get_backend(backend, anchor.device)

    with torch.no_grad():
        guide = [F.normalize(g.detach(), dim=-1) for g in guide_embeddings]
    student = [F.normalize(x, dim=-1) for x in embeddings]
    a, p, ns = student[0], student[1], student[2:]
    ga, gp, gns = guide[0], guide[1], guide[2:]
    threshold = (ga.float() * gp.float()).sum(-1)
    pos_logit = (a.float() * p.float()).sum(-1) / temperature

    if gather:
        offset = rank() * b
        a_all, p_all = all_gather_with_grad(a), all_gather_with_grad(p)
        ns_all = [all_gather_with_grad(n) for n in ns]
        ga_all, gp_all = all_gather_with_grad(ga), all_gather_with_grad(gp)
        gns_all = [all_gather_with_grad(g) for g in gns]
    else:
        offset = 0
        a_all, p_all, ns_all, ga_all, gp_all, gns_all = a, p, ns, ga, gp, gns

    segments = build_segments(b, p_all.shape[0], len(ns), contrast_anchors, contrast_positives)
    pool = {"ap": (p_all, gp_all), "aa": (a_all, ga_all), "pp": (p_all, gp_all)}
    pool.update({f"an{k + 1}": (n, g) for k, (n, g) in enumerate(zip(ns_all, gns_all))})
    problem = Problem(
        left=torch.cat([a, p]),
        guide_left=torch.cat([ga, gp]),
        cand=torch.cat([pool[s.name][0] for s in segments]),
        guide_cand=torch.cat([pool[s.name][1] for s in segments]),
        threshold=threshold,
        pos_logit=pos_logit.detach(),
        segments=segments,
        offset=offset,
        temperature=temperature,
        margin=margin,
        strategy=margin_strategy,
    )
    out = run(problem)
    loss = (out.lse - pos_logit).mean()
    return loss, statistics(problem, out)


def _column_names(n: int) -> list[str]:
    return ["anchor", "positive"] + [f"negative_{k + 1}" for k in range(n - 2)]


def statistics(p: Problem, out: BackendOutput) -> dict[str, torch.Tensor]:
    """Per-segment mask fractions and GIST diagnostics over the local rows (0-dim tensors)."""
    stats: dict[str, torch.Tensor] = {}
    masked = out.masked.double()
    maskable_total = 0
    for j, seg in enumerate(p.segments):
        # The positive (AP) and the self-pair (AA, PP) are never maskable candidates.
        maskable = seg.size - (1 if seg.diag in (DIAG_PROTECT, DIAG_EXCLUDE) else 0)
        maskable_total += maskable
        stats[f"mask_frac/{seg.name}"] = masked[:, j].mean() / max(maskable, 1)
    stats["mask_frac/all"] = masked.sum(1).mean() / max(maskable_total, 1)
    stats["threshold_mean"] = p.threshold.double().mean()
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
    return loss, {k: float(v) for k, v in stats.items()}
