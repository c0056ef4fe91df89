"""The maths of the GIST loss front end, shared by :class:`~gist_ray.loss.GistLoss` and
:func:`gist_loss` (definition: docs/loss.md).

:func:`compute` checks the embeddings, brings them to one compute dtype (the student's, or
the one asked for: :mod:`gist_ray.loss.select`; cast before the gather, so the gather moves rows
of that dtype), L2-normalises the student rows, optionally gathers the candidate pool across
workers, builds the segment plan (:mod:`gist_ray.loss.plan`, no concatenated copies) and hands
it to a backend: ``reference`` (materialised oracle) or a tiled one through the custom op of
:mod:`gist_ray.loss.op` (``chunked`` on the CPU, the Triton kernels of :mod:`gist_ray.kernels`
on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from gist_ray.core.distributed import all_gather_with_grad, rank
from gist_ray.loss.op import kernel_names, tiled
from gist_ray.loss.plan import (
    DIAG_NONE,
    HARDNESS_MODES,
    STRATEGIES,
    BackendOutput,
    Problem,
    build_segments,
)
from gist_ray.loss.reference import reference_backend
from gist_ray.loss.select import COMPUTE_DTYPES, compute_dtype_for

BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def validate_loss_args(
    temperature: float,
    margin: float,
    margin_strategy: str,
    backend: str = "auto",
    matryoshka_dims: Sequence[int] = (),
    matryoshka_weights: Sequence[float] | None = None,
    hardness_alpha: float = 0.0,
    hardness_mode: str = "hard_negatives",
    compute_dtype: str | torch.dtype | None = None,
) -> None:
    """One-line ValueErrors naming the config key."""
    if not temperature > 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")
    if not margin >= 0:
        raise ValueError(f"loss.margin must be >= 0, got {margin}")
    _one_of("loss.margin_strategy", "strategy", margin_strategy, STRATEGIES)
    registered = tuple(k for k in kernel_names() if k not in BACKENDS)  # op.register_kernel
    _one_of("loss.backend", "backend", backend, BACKENDS + registered)
    if isinstance(compute_dtype, str):
        _one_of("loss.compute_dtype", "dtype", compute_dtype, COMPUTE_DTYPES)
    elif compute_dtype is not None and compute_dtype not in DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise ValueError(f"loss.compute_dtype: unknown dtype {compute_dtype}; allowed: {allowed}")
    validate_matryoshka(matryoshka_dims, matryoshka_weights)
    if not hardness_alpha >= 0:
        raise ValueError(f"loss.hardness_alpha must be >= 0, got {hardness_alpha}")
    _one_of("loss.hardness_mode", "mode", hardness_mode, HARDNESS_MODES)


def _one_of(key: str, what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def validate_matryoshka(
    dims: Sequence[int], weights: Sequence[float] | None, width: int | None = None
) -> None:
    """``loss.matryoshka_dims``: positive, strictly decreasing, at most the student's
    ``width`` (when known); ``loss.matryoshka_weights``: one ``>= 0`` per width."""
    dims = list(dims)
    if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in dims):
        raise ValueError(f"loss.matryoshka_dims must be positive integers, got {dims}")
    if any(a <= b for a, b in zip(dims, dims[1:])):
        raise ValueError(f"loss.matryoshka_dims must be strictly decreasing, got {dims}")
    if width is not None and dims and dims[0] > width:
        raise ValueError(
            f"loss.matryoshka_dims: {dims[0]} is wider than the student's embeddings ({width})"
        )
    if weights is None:
        return
    weights = list(weights)
    if not dims:
        raise ValueError("loss.matryoshka_weights is set but loss.matryoshka_dims is empty")
    if len(weights) != len(dims):
        raise ValueError(
            f"loss.matryoshka_weights has {len(weights)} values for {len(dims)} "
            f"loss.matryoshka_dims"
        )
    if not all(w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"loss.matryoshka_weights must be >= 0 and not all 0, got {weights}")


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
    gather: bool | Callable[[torch.Tensor], torch.Tensor],
    matryoshka_dims: Sequence[int] = (),
    matryoshka_weights: Sequence[float] | None = None,
    hardness_alpha: float = 0.0,
    hardness_mode: str = "hard_negatives",
    compute_dtype: str | torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (mean over local rows) and its statistics as 0-dim tensors (no host sync).

    ``embeddings`` is ``[anchor, positive, negative_1..k]`` (student, ``[b, d]`` each) and
    ``guide_embeddings`` their guide twins (``[b, d_g]``, never differentiated). Settings are
    assumed valid (see :func:`validate_loss_args`). With ``matryoshka_dims`` the loss is
    ``Σ_w weight_w · loss_w`` over the student truncated to each width and re-normalised; the
    guide mask does not depend on the width and is computed once (``reference`` computes every
    width independently: the oracle); ``loss/dim_<w>`` reports each width's loss.
    ``compute_dtype``: None = the student's dtype, else a dtype or a ``loss.compute_dtype``
    setting (``"auto"``: bf16 on CUDA, fp32 elsewhere), to which the student's rows are cast
    before anything else (the gather included)."""
    dtype = loss_dtype(check_inputs(embeddings, guide_embeddings), embeddings[0], compute_dtype)
    validate_matryoshka(matryoshka_dims, None, embeddings[0].shape[1])
    embeddings = [x.to(dtype) for x in embeddings]  # a no-op when already in it
    guide = [g.detach().to(dtype) for g in guide_embeddings]  # backends normalise per tile
    k = len(embeddings) - 2
    segments, sources = build_segments(k, contrast_anchors, contrast_positives, hardness_mode)
    column = {name: j for j, name in enumerate(column_names(len(embeddings)))}
    cands = [embeddings[column[s]] for s in sources]
    guide_cands = [guide[column[s]] for s in sources]
    offset = 0
    if gather:
        # The raw rows, once: every width is normalised from them after the gather (a row-wise
        # operation, so each rank gets the very rows one process would).
        offset = rank() * embeddings[0].shape[0]
        gather_rows = all_gather_with_grad if gather is True else gather
        cands = [gather_rows(x) for x in cands]
        guide_cands = [gather_rows(x) for x in guide_cands]
    dims = list(matryoshka_dims) or [embeddings[0].shape[1]]
    problems = [
        Problem(
            (_unit(embeddings[0], w, dtype), _unit(embeddings[1], w, dtype)),
            tuple(_unit(x, w, dtype) for x in cands),
            (guide[0], guide[1]),
            tuple(guide_cands),
            segments,
            offset,
            temperature,
            margin,
            margin_strategy,
            hardness_alpha,
        )
        for w in dims
    ]
    if backend == "reference":
        outs = [reference_backend(p) for p in problems]
    else:
        outs = tiled(problems, backend)
    stats = statistics(problems[0], outs[0])
    if not matryoshka_dims:
        return outs[0].loss.mean(), stats
    weights = list(matryoshka_weights) if matryoshka_weights is not None else [1.0] * len(dims)
    losses = [out.loss.mean() for out in outs]
    for w, value in zip(dims, losses):
        stats[f"loss/dim_{w}"] = value.detach()
    return sum(c * value for c, value in zip(weights, losses)), stats


def loss_dtype(
    student: torch.dtype, anchor: torch.Tensor, compute_dtype: str | torch.dtype | None
) -> torch.dtype:
    """The compute dtype: the ``student``'s without ``compute_dtype``, else the one it names on
    ``anchor``'s device (:func:`~gist_ray.loss.select.compute_dtype_for`)."""
    if compute_dtype is None:
        return student
    if isinstance(compute_dtype, str):
        return compute_dtype_for(compute_dtype, anchor.device)
    return compute_dtype


def _unit(x: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``width`` dims of the student rows ``x``, L2-normalised in float32 and rounded
    once to the compute dtype (autograd: the backward in float32)."""
    return F.normalize(x[:, :width].float(), dim=-1).to(dtype)


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
    gather: bool | Callable[[torch.Tensor], torch.Tensor] = False,
    matryoshka_dims: Sequence[int] = (),
    matryoshka_weights: Sequence[float] | None = None,
    hardness_alpha: float = 0.0,
    hardness_mode: str = "hard_negatives",
    compute_dtype: str | torch.dtype | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """GISTEmbed loss, mean over the local query rows (functional form of ``GistLoss``).

    ``anchor``/``positive``/``negatives[k]`` are student embeddings ``[b, d]``; the ``guide_*``
    twins are ``[b, d_g]`` and never receive gradient. With ``gather=True`` inside an initialised
    process group, every candidate set is all-gathered with gradient so each local query sees the
    global pool (``gather`` may also be the gather itself: a function of a ``[b, ...]`` tensor
    returning every rank's rows, e.g. :func:`~gist_ray.core.distributed.all_gather_with_grad`
    with another ``backward``). With ``return_stats=True`` also returns a dict of float statistics:
    ``mask_frac/<segment>``, ``threshold_mean``, ``positive_rank_mean`` and ``no_negative_frac``
    (``float()`` of each costs a host sync; :class:`GistLoss` returns them as tensors), and
    ``loss/dim_<w>`` per Matryoshka width.

    ``matryoshka_dims`` (strictly decreasing widths, each at most ``d``; empty = off) and
    ``matryoshka_weights`` (default all 1): the loss is ``Σ_w weight_w · GIST(student
    truncated to its first w dims and re-normalised)``, the guide mask computed once for every
    width. ``hardness_alpha`` (α >= 0; 0 = off) weights the guide's unmasked negatives selected
    by ``hardness_mode`` with the logit ``s/τ + α·sg(s)`` (docs/loss.md). ``compute_dtype``
    (None = the student's dtype; a dtype; or ``"auto"``, ``"bfloat16"``, ``"float32"``,
    ``"float16"``, ``auto`` being bf16 on CUDA and fp32 elsewhere): the student's rows are cast
    to it before the gather (docs/loss.md "Precision").
    """
    validate_loss_args(
        temperature, margin, margin_strategy, backend, matryoshka_dims, matryoshka_weights,
        hardness_alpha, hardness_mode, compute_dtype,
    )  # fmt: skip
    negatives, guide_negatives = list(negatives), list(guide_negatives)
    if len(negatives) != len(guide_negatives):
        raise ValueError(
            f"got {len(negatives)} negative columns but {len(guide_negatives)} guide negatives"
        )
    loss, stats = compute(
        [anchor, positive, *negatives], [guide_anchor, guide_positive, *guide_negatives],
        temperature=temperature, margin=margin, margin_strategy=margin_strategy,
        contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
        backend=backend, gather=gather, matryoshka_dims=matryoshka_dims,
        matryoshka_weights=matryoshka_weights, hardness_alpha=hardness_alpha,
        hardness_mode=hardness_mode, compute_dtype=compute_dtype,
    )  # fmt: skip
    if not return_stats:
        return loss
    return loss, {k: float(v.detach()) for k, v in stats.items()}
