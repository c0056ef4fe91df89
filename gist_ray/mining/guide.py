"""The guide's embeddings for mining, read through the training's guide cache.

The one place mining touches the cache: ``gist-ray mine`` and ``gist-ray train`` share the cache
file of a dataset (same guide, settings, prompts and texts, so the same fingerprint), whichever
runs first builds it; and the mined file's own cache is written from the embeddings already
there (its negatives are the data's positives), so training on it runs no guide at all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gist_ray.config import Config
from gist_ray.data import TrainingSet


def guide_embeddings_for(cfg: Config, sets: list[TrainingSet]) -> list[dict[str, torch.Tensor]]:
    """Per dataset, column -> the guide's embedding of each row's text (as stored), loaded
    from the guide cache, built first (in this process) when missing."""
    from gist_ray.train import build_guide_cache, guide_prompts, worker_device

    return build_guide_cache(cfg, sets, guide_prompts(cfg, sets), worker_device(cfg))


def known_embeddings(
    cfg: Config, sets: list[TrainingSet], caches: list[dict[str, torch.Tensor]]
) -> dict[tuple[str, str], torch.Tensor]:
    """(guide prompt, text) -> the guide's embedding, from the caches of ``sets``."""
    from gist_ray.train import guide_prompts

    known = {}
    for s, prompts, cache in zip(sets, guide_prompts(cfg, sets), caches):
        for col, texts in s.texts.items():
            for text, row in zip(texts, cache[col]):
                known[(prompts.get(col, ""), text)] = row
    return known


def seed_guide_cache(cfg: Config, known: dict[tuple[str, str], torch.Tensor]) -> list[Path]:
    """Write the guide cache of ``cfg``'s datasets (e.g. a mined file) from embeddings already
    computed, where every (prompt, text) is known: the file training would build, so it loads
    it instead of running the guide again. Returns the caches written or already there."""
    from gist_ray import guide_cache
    from gist_ray.assets import cache_root, resolve_model_path
    from gist_ray.data import load_training_sets
    from gist_ray.train import guide_prompts, guide_settings

    sets = load_training_sets(cfg)
    written = []
    for s, prompts in zip(sets, guide_prompts(cfg, sets)):
        keys = {c: [(prompts.get(c, ""), t) for t in texts] for c, texts in s.texts.items()}
        if any(k not in known for ks in keys.values() for k in ks):
            continue  # a text the guide has not seen: training builds this cache itself
        model_dir = resolve_model_path(cfg.model.guide)
        fp = guide_cache.fingerprint(model_dir, guide_settings(cfg), s.texts, prompts)
        path = guide_cache.cache_path(s.spec.source, fp, cache_root())
        if guide_cache.load(path, fp, s.rows) is None:
            tensors = {c: torch.stack([known[k] for k in ks]) for c, ks in keys.items()}
            guide_cache.save(path, fp, tensors)
        written.append(path)
    return written
