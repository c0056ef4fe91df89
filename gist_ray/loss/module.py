"""``GistLoss``: the GIST loss as a module, configured once (definition: docs/loss.md).

A thin ``nn.Module`` over :func:`gist_ray.loss.functional.compute`, as Liger wraps its fused
autograd functions and OpenCLIP's ``ClipLoss`` keeps its gather settings: the settings are
validated in ``__init__``, every call only passes embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    global pool.
    """

    def __init__(
        self,
        temperature: float = 0.01,
        margin: float = 0.0,
        margin_strategy: str = "absolute",
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        backend: str = "auto",
        gather: bool = False,
    ) -> None:
        super().__init__()
        validate_loss_args(temperature, margin, margin_strategy, backend)
        self.temperature, self.margin, self.margin_strategy = temperature, margin, margin_strategy
        self.contrast_anchors, self.contrast_positives = contrast_anchors, contrast_positives
        self.backend, self.gather = backend, gather

    @classmethod
    def from_config(cls, cfg: Any, gather: bool = False) -> GistLoss:
        """From any object with the loss settings as attributes (e.g. ``Config.loss``)."""
        return cls(
            temperature=cfg.temperature, margin=cfg.margin, margin_strategy=cfg.margin_strategy,
            contrast_anchors=cfg.contrast_anchors, contrast_positives=cfg.contrast_positives,
            backend=cfg.backend, gather=gather,
        )  # fmt: skip

    def forward(
        self, embeddings: Sequence[torch.Tensor], guide_embeddings: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return compute(
            embeddings, guide_embeddings,
            temperature=self.temperature, margin=self.margin,
            margin_strategy=self.margin_strategy, contrast_anchors=self.contrast_anchors,
            contrast_positives=self.contrast_positives, backend=self.backend, gather=self.gather,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, margin={self.margin}, "
            f"margin_strategy={self.margin_strategy!r}, contrast_anchors={self.contrast_anchors}, "
            f"contrast_positives={self.contrast_positives}, backend={self.backend!r}, "
            f"gather={self.gather}"
        )
