"""The guide's embeddings for mining, read through the training's guide cache.

The one place mining touches the cache: ``gist-ray mine`` and ``gist-ray train`` share the cache
file of a dataset (same guide, settings, prompts and texts, so the same fingerprint), whichever
runs first builds it; and the mined file's own cache is written from the embeddings already
there (its negatives are the data's positives), so training on it runs no guide at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gist_ray.config import Config
from gist_ray.data.training import TrainingSet


def guide_embeddings_for(cfg: Config, sets: list[TrainingSet]) -> list[dict[str, torch.Tensor]]:
    """Per dataset, column -> the guide's embedding of each row's text (float32, as stored),
    read from the guide cache, built first (in this process) when missing."""
    from gist_ray.guide.cache import GuideCache
    from gist_ray.guide.source import local_guide_cache
    from gist_ray.models.prompts import guide_prompts

    folders = local_guide_cache(cfg, sets, guide_prompts(cfg, sets))
    out = []
    for folder, s in zip(folders, sets):
        cache, rows = GuideCache(folder, s.rows), np.arange(s.rows)
        out.append({c: cache.embeddings(c, rows) for c in s.columns})
    return out


def known_embeddings(
    cfg: Config, sets: list[TrainingSet], caches: list[dict[str, torch.Tensor]]
) -> dict[tuple[str, str], torch.Tensor]:
    """(guide prompt, text) -> the guide's embedding, from the caches of ``sets``."""
    from gist_ray.models.prompts import guide_prompts

    known = {}
    for s, prompts, cache in zip(sets, guide_prompts(cfg, sets), caches):
        for col, texts in s.column_texts().items():
            for text, row in zip(texts, cache[col]):
                known[(prompts.get(col, ""), text)] = row
    return known


def seed_guide_cache(cfg: Config, known: dict[tuple[str, str], torch.Tensor]) -> list[str]:
    """Write the guide cache of ``cfg``'s datasets (e.g. a mined file) from embeddings already
    computed, where every (prompt, text) is known: the folder training would build, so it loads
    it instead of running the guide again. Returns the cache folders written or already there."""
    from gist_ray.data.training import load_training_sets
    from gist_ray.guide import build
    from gist_ray.guide import cache as guide_cache
    from gist_ray.models.prompts import guide_prompts

    sets = load_training_sets(cfg)
    chosen = [
        (s, p)
        for s, p in zip(sets, guide_prompts(cfg, sets))
        if all((p.get(c, ""), t) in known for c, ts in s.column_texts().items() for t in ts)
    ]  # a dataset with a text the guide has not seen: training builds its cache itself

    def from_known(_cfg: Config, folder: str, shards: list[int]) -> Iterator[int]:
        dtype = guide_cache.read_manifest(folder)["dtype"]
        for k in shards:
            table = guide_cache.read_texts(folder, k)
            keys = zip(table.column("prompt").to_pylist(), table.column("text").to_pylist())
            emb = torch.stack([known[key].float() for key in keys]).numpy().astype(dtype)
            with guide_cache.output_file(guide_cache.shard_path(folder, k)) as tmp:
                np.save(tmp, emb)
            yield len(emb)

    if not chosen:
        return []
    return build.ensure(cfg, [s for s, _ in chosen], [p for _, p in chosen], from_known)
