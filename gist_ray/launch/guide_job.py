"""The guide cache built as a Ray Data batch-inference job: guide actors sized to the cluster
(every CPU core or GPU busy, whatever the data size), each task embeds one shard, and the driver's
progress moves per batch."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from gist_ray.config import Config
from gist_ray.launch.cluster import alive_nodes
from gist_ray.launch.resources import is_shared_storage
from gist_ray.launch.trainer import unwrap_worker_error

log = logging.getLogger(__name__)

# Below this many texts per actor, loading one more guide costs more than its share saves.
MIN_TEXTS_PER_ACTOR = 32
# More CPU actors per node would hold more guide copies than a node's memory may allow; beyond
# this, actors get more threads instead.
MAX_CPU_ACTORS_PER_NODE = 16
POLL_S = 0.5  # how often the driver collects the actors' per-batch progress

# The last job's layout and timings (wall-clock seconds since the epoch), for benchmarks/.
LAST_JOB: dict[str, Any] = {}


@dataclass(frozen=True)
class JobLayout:
    """How many guide actors the job runs and what each holds."""

    actors: int
    threads: int  # torch intra-op threads per actor, and the CPUs Ray reserves for it
    gpus: int  # GPUs per actor (0: a CPU job)


def job_layout(node_cpus: list[int], node_gpus: list[int], texts: int, use_gpu: bool) -> JobLayout:
    """The job's actors for a cluster whose nodes have ``node_cpus`` CPUs and ``node_gpus`` GPUs.

    GPU: one actor per GPU. CPU: one single-threaded actor per core (measured on 2 cores: two
    one-thread processes never slower than one two-thread process, 18 % less time on long texts;
    benchmarks/RESULTS.md), up to :data:`MAX_CPU_ACTORS_PER_NODE` per node. With less data
    than :data:`MIN_TEXTS_PER_ACTOR` per actor there are fewer actors, and each gets the cores
    the others leave idle, as long as they still fit on the nodes."""
    useful = max(1, -(-texts // MIN_TEXTS_PER_ACTOR))
    if use_gpu:
        return JobLayout(actors=max(1, min(sum(node_gpus), useful)), threads=1, gpus=1)
    cpus = [int(c) for c in node_cpus if c >= 1] or [1]
    threads = max(-(-c // MAX_CPU_ACTORS_PER_NODE) for c in cpus)
    actors = min(sum(max(1, c // threads) for c in cpus), useful)
    while threads < max(cpus) and sum(c // (threads + 1) for c in cpus) >= actors:
        threads += 1
    return JobLayout(actors=actors, threads=threads, gpus=0)


def cluster_layout(cfg: Config, texts: int) -> JobLayout:
    """:func:`job_layout` for the Ray cluster this process is connected to."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = [int(r.get("CPU", 0)) for r in nodes]
    gpus = [int(r.get("GPU", 0)) for r in nodes]
    return job_layout(cpus, gpus, texts, cfg.ray.use_gpu)


def prepare_guide_cache(cfg: Config, sets: list) -> list[str] | None:
    """Load or build every dataset's guide cache on the cluster (None when ``data.guide_cache``
    is off): checks its folder (writable; shared when the cluster has several nodes: a URI on
    object storage is), then runs
    the missing shards as a Ray Data job (:func:`run_guide_job`), with shards sized to the
    job's actors."""
    from gist_ray.guide import build
    from gist_ray.guide import cache as guide_cache
    from gist_ray.models.prompts import guide_prompts

    if not cfg.data.guide_cache:
        return None
    nodes = alive_nodes()
    for s in sets:
        root, chosen = guide_cache.cache_root(cfg, s.spec.source)
        shared = cfg.ray.shared_storage or is_shared_storage(root)
        guide_cache.check_root(root, chosen, nodes, shared)
    workers = cluster_layout(cfg, 1 << 30).actors  # the most actors the cluster runs at once
    return build.ensure(cfg, sets, guide_prompts(cfg, sets), run_guide_job, workers)


class _Progress:
    """Counts the texts the actors have embedded (a Ray actor; the driver polls it)."""

    def __init__(self) -> None:
        self.done, self.ready = 0, []

    def add(self, n: int, at: float) -> None:
        if n:
            self.done += n
        else:
            self.ready.append(at)  # an actor has loaded its guide

    def take(self) -> tuple[int, list[float]]:
        done, self.done = self.done, 0
        return done, list(self.ready)


class _Report:
    """What a guide actor calls after each batch: tells the progress actor, without waiting."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress

    def __call__(self, n: int) -> None:
        self.progress.add.remote(n, time.time())


def run_guide_job(cfg: Config, folder: str, shards: list[int]):
    """Embed ``shards`` of a guide cache folder with a Ray Data job: ``map_batches`` runs
    :class:`gist_ray.guide.embed.ShardEmbedder` (the guide, loaded once per actor) on the
    actors of :func:`cluster_layout` (one GPU each with ``ray.use_gpu``, else its own cores and
    as many torch threads), one shard per task, handed out as actors free up; each task writes
    its shard to the folder (a path or a URI: each shard is uploaded whole). Yields the count
    of texts embedded since the last yield, per batch (polled every :data:`POLL_S`)."""
    import ray
    import ray.data

    from gist_ray.guide.cache import read_manifest, shard_size
    from gist_ray.guide.embed import ShardEmbedder

    manifest = read_manifest(folder)
    texts = sum(shard_size(manifest, k) for k in shards)
    layout = cluster_layout(cfg, texts)
    actors = min(layout.actors, len(shards))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver logs its own progress, with an ETA
    ctx.execution_options.preserve_order = False
    resources = {"num_gpus": layout.gpus} if layout.gpus else {"num_cpus": layout.threads}
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    started = time.time()
    out = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=len(shards))
    out = out.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={
            "config": cfg.to_dict(),
            "folder": str(folder),
            "threads": layout.threads,
            "report": _Report(progress),
        },
        batch_size=1,
        # One task in flight per actor: a free actor takes the next shard, so none idles
        # while another still has shards queued.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        **resources,
    )
    log.info(
        "guide job: %d actor(s), %s each",
        actors,
        f"{layout.gpus} GPU" if layout.gpus else f"{layout.threads} CPU thread(s)",
    )
    failed: list[BaseException] = []
    finished = threading.Event()

    def drain() -> None:
        try:
            for _ in out.iter_rows():
                pass
        except Exception as e:  # noqa: BLE001 - re-raised on the driver's thread below
            failed.append(e)
        finally:
            finished.set()

    threading.Thread(target=drain, name="guide-job", daemon=True).start()
    ready: list[float] = []
    told = 0
    while True:
        last = finished.wait(POLL_S)
        done, ready = ray.get(progress.take.remote())
        done = min(done, texts - told)  # a retried task counts its batches again
        if done:
            told += done
            yield done
        if last:
            break
    ended = time.time()
    ray.kill(progress)
    if failed:
        raise unwrap_worker_error(failed[0]) from failed[0]
    if told < texts:  # every shard is written; the last reports may still be on their way
        yield texts - told
    LAST_JOB.clear()
    LAST_JOB.update(actors=actors, threads=layout.threads, gpus=layout.gpus, texts=texts,
                    started=started, ready=sorted(ready), ended=ended)  # fmt: skip
    if ready:
        log.info(
            "guide job: guides loaded %.1fs after the start (first %.1fs); %d texts in %.1fs",
            max(ready) - started,
            min(ready) - started,
            texts,
            ended - started,
        )
