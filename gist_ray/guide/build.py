"""Loading or building the guide cache of every training dataset: a complete folder is loaded, a
missing or truncated shard is rebuilt alone by the job runner given (a Ray Data job, or this
process), and the log says why a new cache is built (first one, or what changed). Folders are
local paths or URIs (:mod:`gist_ray.core.storage`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from gist_ray.core import storage
from gist_ray.core.errors import GistRayError
from gist_ray.core.log import fmt_eta
from gist_ray.guide.cache import (
    cache_root,
    fingerprint,
    folder_for,
    model_identity,
    plan,
    read_manifest,
    shard_problems,
    shard_size,
    texts_hash,
)

if TYPE_CHECKING:
    from gist_ray.config import Config
    from gist_ray.data.training import TrainingSet
log = logging.getLogger(__name__)

# Runs the job over the given shards of a cache folder (a path or a URI); yields the count of
# texts embedded as batches finish.
JobRunner = Callable[["Config", str, list[int]], Iterable[int]]


def ensure(
    cfg: Config,
    sets: Sequence[TrainingSet],
    prompts: Sequence[dict[str, str]],
    run_job: JobRunner,
    workers: int = 1,
) -> list[str]:
    """The cache folder of every dataset: loaded when complete, else built with ``run_job``
    (only the shards that are missing or truncated), saying why. Returns the folders."""
    from gist_ray.core.assets import resolve_model_path
    from gist_ray.models.spec import guide_settings, guide_spec

    spec = guide_spec(cfg)
    guide = model_identity(resolve_model_path(spec.name), spec.revision)
    folders = []
    for s, p in zip(sets, prompts):
        t0 = time.perf_counter()
        settings = {**guide_settings(cfg), "dtype": cfg.data.guide_cache_dtype}
        fp = fingerprint(guide, settings, texts_hash(s.data, s.columns), p)
        root, _ = cache_root(cfg, s.spec.source)
        folder = folder_for(root, s.name, fp)
        manifest = read_manifest(folder, fp)
        if manifest is None:
            _say_why_new(root, s.name, fp)
            manifest = plan(folder, s.data, p, fp, workers, cfg.data.guide_cache_dtype)
            todo = list(range(manifest["shards"]))
        else:
            problems = shard_problems(folder, manifest)
            for k, why in problems.items():
                log.warning("guide cache %s: shard %d is %s; rebuilding that shard", folder, k, why)
            todo = sorted(problems)
        if todo:
            _run_with_progress(cfg, folder, manifest, todo, run_job, s.name)
            left = shard_problems(folder, manifest)
            if left:
                k, why = next(iter(left.items()))
                raise GistRayError(f"guide cache {folder}: shard {k} is still {why} after the job")
        _remember(root, s.name, fp, folder)
        verb = "built" if todo else "loaded"
        log.info(
            "guide cache of %r %s in %.1fs (%d unique texts, %d rows): %s",
            s.name,
            verb,
            time.perf_counter() - t0,
            manifest["unique_texts"],
            manifest["rows"],
            folder,
        )
        folders.append(folder)
    return folders


def _pointer(root: str, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return storage.join(root, f"{safe}.latest.json")


def _say_why_new(root: str, name: str, fp: dict[str, str]) -> None:
    """Log why a new cache is built: first for this dataset, or what changed since the last."""
    try:
        last = storage.read_json(_pointer(root, name))
    except (GistRayError, OSError, ValueError):
        log.info("guide cache of %r: none yet under %s; building it", name, root)
        return
    old = last.get("fingerprint", {})
    changed = [k for k in fp if old.get(k) != fp[k]]
    what = "the dataset changed" if changed == ["texts"] else "changed: " + ", ".join(changed)
    log.warning(
        "guide cache of %r: %s since the cache at %s was built; building a new one",
        name,
        what,
        last.get("folder"),
    )


def _remember(root: str, name: str, fp: dict[str, str], folder: str) -> None:
    try:
        storage.write_json(_pointer(root, name), {"fingerprint": fp, "folder": folder})
    except (GistRayError, OSError):  # only for the message of a later rebuild
        pass


def _run_with_progress(cfg, folder, manifest, todo, run_job, name) -> None:
    total = sum(shard_size(manifest, k) for k in todo)
    t0, done, last = time.perf_counter(), 0, 0.0
    log.info(
        "guide cache of %r: embedding %d unique texts in %d shard(s) into %s",
        name,
        total,
        len(todo),
        folder,
    )
    for texts in run_job(cfg, folder, todo):
        done += texts
        now = time.perf_counter()
        if now - last >= 1.0 or done == total:
            log.info(guide_job_line(name, done, total, now - t0))
            last = now


def guide_job_line(name: str, done: int, total: int, elapsed: float) -> str:
    """The guide-cache job's progress, as the driver logs it while batches finish (at most once
    a second)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate else 0.0
    return (
        f"guide cache of {name!r}: {done:,}/{total:,} unique texts "
        f"({100 * done // max(total, 1)}%), {rate:,.0f} texts/s, ETA {fmt_eta(eta)}"
    )
