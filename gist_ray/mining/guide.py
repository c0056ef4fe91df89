"""The guide's embeddings for mining, read through the training's guide cache.

The one place mining touches the cache: ``gist-ray mine`` and ``gist-ray train`` share the cache
file of a dataset (same guide, settings, prompts and texts, so the same fingerprint), whichever
runs first builds it.
"""

from __future__ import annotations

import torch

from gist_ray.config import Config
from gist_ray.data import TrainingSet


def guide_embeddings_for(cfg: Config, sets: list[TrainingSet]) -> list[dict[str, torch.Tensor]]:
    """Per dataset, column -> the guide's embedding of each row's text (float32, as stored),
    loaded from the guide cache, built first (in this process) when missing."""
    from gist_ray.train import build_guide_cache, guide_prompts, worker_device

    caches = build_guide_cache(cfg, sets, guide_prompts(cfg, sets), worker_device(cfg))
    return [{c: t.float() for c, t in cache.items()} for cache in caches]
