"""The guide cache built as a Ray Data batch-inference job: one guide actor per worker, each
task embeds one shard."""

from __future__ import annotations

import logging
from pathlib import Path

from gist_ray.config import Config
from gist_ray.launch.cluster import alive_nodes
from gist_ray.launch.resources import is_shared_storage
from gist_ray.launch.trainer import unwrap_worker_error

log = logging.getLogger(__name__)


def prepare_guide_cache(cfg: Config, sets: list) -> list[str] | None:
    """Load or build every dataset's guide cache on the cluster (None when ``data.guide_cache``
    is off): checks its folder (writable; shared when the cluster has several nodes), then runs
    the missing shards as a Ray Data job (:func:`run_guide_job`)."""
    from gist_ray.guide import build
    from gist_ray.guide import cache as guide_cache
    from gist_ray.models.prompts import guide_prompts

    if not cfg.data.guide_cache:
        return None
    nodes = alive_nodes()
    for s in sets:
        root, chosen = guide_cache.cache_root(cfg, s.spec.source)
        shared = cfg.ray.shared_storage or is_shared_storage(str(root))
        guide_cache.check_root(root, chosen, nodes, shared)
    return build.ensure(cfg, sets, guide_prompts(cfg, sets), run_guide_job, cfg.ray.num_workers)


def run_guide_job(cfg: Config, folder: Path, shards: list[int]):
    """Embed ``shards`` of a guide cache folder with a Ray Data job: ``map_batches`` runs
    :class:`gist_ray.guide.embed.ShardEmbedder` (the guide, loaded once per actor) on up to
    ``ray.num_workers`` actors, one GPU each with ``ray.use_gpu`` (else one CPU); each task
    writes its shard to the folder. Yields each finished shard's text count."""
    import ray.data

    from gist_ray.guide.embed import ShardEmbedder

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver logs its own progress, with an ETA
    ctx.execution_options.preserve_order = False
    gpu = {"num_gpus": 1} if cfg.ray.use_gpu else {"num_cpus": 1}
    out = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=len(shards))
    out = out.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={"config": cfg.to_dict(), "folder": str(folder)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.ray.num_workers, len(shards))),
        **gpu,
    )
    try:
        for row in out.iter_rows():
            yield int(row["texts"])
    except Exception as e:  # noqa: BLE001 - Ray Data wraps the task's error
        raise unwrap_worker_error(e) from e
