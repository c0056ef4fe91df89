"""``GistLoss``: the GIST loss as a module, configured once (definition: docs/loss.md).

A thin ``nn.Module`` over :func:`gist_ray.loss.functional.compute`, as Liger wraps its fused
autograd functions and OpenCLIP's ``ClipLoss`` keeps its gather settings: the settings are
validated in ``__init__``, every call only passes embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gist_ray.loss.functional import compute, validate_loss_args


class GistLoss(nn.Module):
    """``loss, stats = GistLoss(...)(embeddings, guide_embeddings)``.

    ``embeddings``: ``[anchor, positive, negative_1..k]`` student embeddings, ``[b, d]`` each;
    ``guide_embeddings``: their guide twins, ``[b, d_g]``, never differentiated. Returns the mean
    loss over the local rows (0-dim) and a dict of 0-dim tensors (``mask_frac/<segment>``,
    ``mask_frac/all``, ``threshold_mean``, ``positive_rank_mean``, ``no_negative_frac``); reading
    them with ``float()`` is the caller's choice of when to sync. With ``gather=True`` (inside an
    initialised process group) every candidate set is all-gathered, so each local query sees the
    global pool; ``gather`` may also be the gather function itself (see :func:`gist_loss`).

    ``matryoshka_dims``/``matryoshka_weights``: the loss summed over truncated, re-normalised
    widths with one guide mask (the stats then also hold ``loss/dim_<w>``);
    ``hardness_alpha``/``hardness_mode``: hardness weighting after the guide mask (docs/loss.md).
    ``compute_dtype``: None (the student's dtype), a dtype, or a ``loss.compute_dtype`` setting
    (``auto`` = bf16 on CUDA, fp32 elsewhere); the student's rows are cast to it before the
    gather (docs/loss.md "Precision").
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        validate_loss_args(
            temperature, margin, margin_strategy, backend, matryoshka_dims, matryoshka_weights,
            hardness_alpha, hardness_mode, compute_dtype,
        )  # fmt: skip
        self.temperature, self.margin, self.margin_strategy = temperature, margin, margin_strategy
        self.contrast_anchors, self.contrast_positives = contrast_anchors, contrast_positives
        self.backend, self.gather = backend, gather
        self.matryoshka_dims = tuple(matryoshka_dims)
        self.matryoshka_weights = None if matryoshka_weights is None else tuple(matryoshka_weights)
        self.hardness_alpha, self.hardness_mode = hardness_alpha, hardness_mode
        self.compute_dtype = compute_dtype

    @classmethod
    def from_config(cls, cfg: Any, gather: bool = False, **overrides: Any) -> GistLoss:
        """From any object with the loss settings as attributes (e.g. ``Config.loss``); the
        Matryoshka and hardness settings are optional there (default: off), ``compute_dtype``
        too (default: the student's dtype). ``overrides``: keyword arguments that replace the
        config's (e.g. the backend and dtype decided for a device: gist_ray.loss.select)."""
        settings: dict[str, Any] = dict(
            temperature=cfg.temperature, margin=cfg.margin, margin_strategy=cfg.margin_strategy,
            contrast_anchors=cfg.contrast_anchors, contrast_positives=cfg.contrast_positives,
            backend=cfg.backend, gather=gather,
            matryoshka_dims=getattr(cfg, "matryoshka_dims", ()) or (),
            matryoshka_weights=getattr(cfg, "matryoshka_weights", None),
            hardness_alpha=getattr(cfg, "hardness_alpha", 0.0),
            hardness_mode=getattr(cfg, "hardness_mode", "hard_negatives"),
            compute_dtype=getattr(cfg, "compute_dtype", None),
        )  # fmt: skip
        return cls(**{**settings, **overrides})

    def forward(
        self, embeddings: Sequence[torch.Tensor], guide_embeddings: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return compute(
            embeddings, guide_embeddings,
            temperature=self.temperature, margin=self.margin,
            margin_strategy=self.margin_strategy, contrast_anchors=self.contrast_anchors,
            contrast_positives=self.contrast_positives, backend=self.backend, gather=self.gather,
            matryoshka_dims=self.matryoshka_dims, matryoshka_weights=self.matryoshka_weights,
            hardness_alpha=self.hardness_alpha, hardness_mode=self.hardness_mode,
            compute_dtype=self.compute_dtype,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, margin={self.margin}, "
            f"margin_strategy={self.margin_strategy!r}, contrast_anchors={self.contrast_anchors}, "
            f"contrast_positives={self.contrast_positives}, backend={self.backend!r}, "
            f"gather={self.gather}"
            + (f", matryoshka_dims={list(self.matryoshka_dims)}" if self.matryoshka_dims else "")
            + (f", matryoshka_weights={list(self.matryoshka_weights)}"
               if self.matryoshka_weights is not None else "")
            + (f", hardness_alpha={self.hardness_alpha}, hardness_mode={self.hardness_mode!r}"
               if self.hardness_alpha else "")
            + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else "")
        )  # fmt: skip
