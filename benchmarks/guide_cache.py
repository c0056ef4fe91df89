"""The guide-cache build (`gist-ray cache-guide`, a Ray Data job) against sentence-transformers'
``SentenceTransformer.encode`` of the same unique texts in one process, on the same cores, side
by side in one run.

Texts: InsuranceQA training (question, answer) pairs (``gist_ray.data.insuranceqa.train_rows``,
seed 42) whose question and answer are both new, so ``--sizes N`` unique texts are N/2 rows of a
jsonl file; guide all-mpnet-base-v2 (the default guide, built-in asset) at 64 tokens.

1. sentence-transformers: the model loaded (not timed), one warm-up encode of 8 texts (not
   timed), then ``encode(texts, batch_size=64)`` timed; torch threads = every core.
2. gist-ray: Ray started (timed apart, excluded), then ``gist_ray.commands.train.cache_guide``
   (what ``gist-ray cache-guide`` runs after parsing its arguments) into a fresh cache folder,
   timed whole. The job's own timestamps (``gist_ray.launch.guide_job.LAST_JOB``) split it:
   ``setup`` (data load, texts hashed, unique texts found and written, before the job is
   submitted), ``start-up`` (from the job's submission until the first actor has loaded its
   guide: actor processes started, torch imported, guide loaded), ``embed`` (from then to the
   last shard written; the other actors' guide loads fall inside it, so it is the conservative
   figure). The ratio to sentence-transformers is taken on ``embed``, and also on the whole
   command less Ray's start (nothing excluded but Ray).

Usage: python benchmarks/guide_cache.py [--sizes 384 3000] [--out benchmarks/guide_cache.json]
Run it alone: the ratio means something only if nothing else uses the cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def unique_pairs(n_texts: int) -> list[tuple[str, str]]:
    from gist_ray.data.insuranceqa import train_rows

    rows = train_rows(42, None)
    seen: set[str] = set()
    out = []
    for q, a in zip(rows["anchor"], rows["positive"]):
        if q not in seen and a not in seen and q != a:
            seen.update((q, a))
            out.append((q, a))
            if 2 * len(out) >= n_texts:
                return out
    raise SystemExit(f"only {2 * len(out)} unique texts available")


def cpu_snapshot() -> dict[int, tuple[str, float, int]]:
    """pid -> (command line, CPU seconds so far, parent pid) for every process (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(d.name)] = (cmd, (int(fields[11]) + int(fields[12])) / tick, int(fields[1]))
    return out


class CpuSampler:
    """Snapshots every half second while running, merged per pid, so a process that exits
    before the end (a guide actor) keeps its last CPU figure."""

    def __init__(self) -> None:
        import threading

        self.merged: dict[int, tuple[str, float, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.merged.update(cpu_snapshot())
            if self.stop.wait(0.5):
                self.merged.update(cpu_snapshot())
                return

    def __enter__(self) -> CpuSampler:
        self.before = cpu_snapshot()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.by_group = cpu_by_group(self.before, self.merged)


def cpu_by_group(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two snapshots, by kind of process: this process and its
    descendants (the Ray cluster it started) by role, the rest as other users'."""
    me = os.getpid()

    def ours(pid: int) -> bool:
        for _ in range(64):
            if pid == me:
                return True
            if pid not in after or pid <= 1:
                return False
            pid = after[pid][2]
        return False

    groups: dict[str, float] = {}
    for pid, (cmd, cpu, _parent) in after.items():
        spent = cpu - before.get(pid, (cmd, 0.0, 0))[1]
        if spent <= 0:
            continue
        if not ours(pid):
            kind = "other users' processes"
        elif pid == me:
            kind = "driver (this process)"
        elif "MapWorker" in cmd or "ShardEmbedder" in cmd:
            kind = "guide actors"
        elif "raylet" in cmd or "gcs_server" in cmd:
            kind = "raylet + GCS"
        elif "dashboard" in cmd or "runtime_env" in cmd or "log_monitor" in cmd:
            kind = "Ray dashboard, agents, log monitor"
        else:
            kind = "other Ray processes"
        groups[kind] = round(groups.get(kind, 0.0) + spent, 1)
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


def st_encode(texts: list[str]) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from gist_ray.core.assets import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(resolve_model_path("mpnet"), device="cpu")
    model.max_seq_length = 64
    model.encode(texts[:8], batch_size=8)
    with CpuSampler() as sampler:
        t0, c0 = time.perf_counter(), time.process_time()
        model.encode(texts, batch_size=64, show_progress_bar=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": wall, "cpu_seconds": cpu, "texts_per_s": len(texts) / wall,
            "threads": torch.get_num_threads(),
            "cpu_seconds_by_process": sampler.by_group}  # fmt: skip


def gist_ray_job(pairs: list[tuple[str, str]], work: Path) -> dict:
    from gist_ray.commands.train import cache_guide
    from gist_ray.config import load_config
    from gist_ray.guide.cache import read_manifest
    from gist_ray.launch import guide_job

    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": q, "positive": a}) + "\n" for q, a in pairs))
    cfg = load_config(
        overrides=[
            "model.guide=all-mpnet-base-v2",
            "model.max_seq_length=64",
            f"data.train={data}",
            "data.max_examples=0",
            f"data.guide_cache_dir={work / 'cache'}",
            "ray.num_workers=1",
            f"output_dir={work / 'out'}",
        ]
    )
    with CpuSampler() as sampler:
        t0 = time.time()
        (folder,) = cache_guide(cfg)
        t1 = time.time()
    by_process = sampler.by_group
    job = dict(guide_job.LAST_JOB)
    texts = read_manifest(Path(folder))["unique_texts"]
    embed = job["ended"] - min(job["ready"])
    return {
        "texts": texts,
        "shards": read_manifest(Path(folder))["shards"],
        "actors": job["actors"],
        "threads_per_actor": job["threads"],
        "command_seconds": t1 - t0,
        "setup_seconds": job["started"] - t0,
        "startup_seconds": min(job["ready"]) - job["started"],
        "all_guides_loaded_seconds": max(job["ready"]) - job["started"],
        "embed_seconds": embed,
        "after_job_seconds": t1 - job["ended"],
        "texts_per_s": texts / embed,
        "command_texts_per_s": texts / (t1 - t0),
        "cpu_seconds_by_process": by_process,  # over the whole command
    }


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}, torch {torch.__version__}"  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 3000])
    ap.add_argument("--out", default=str(HERE / "guide_cache.json"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()[0]
    pairs = {n: unique_pairs(n) for n in args.sizes}
    runs: dict[int, dict] = {}
    for n in args.sizes:  # before Ray starts, so its idle processes do not share the cores
        texts = [t for pair in pairs[n] for t in pair]
        runs[n] = {"sentence_transformers": st_encode(texts)}
        print(f"ST encode {len(texts)} texts: {runs[n]['sentence_transformers']}", flush=True)

    from gist_ray.config import load_config
    from gist_ray.launch import cluster

    t0 = time.time()
    cluster.connect(load_config(overrides=[]))
    ray_start = time.time() - t0
    try:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(prefix="gist-ray-guide-bench-") as tmp:
                runs[n]["gist_ray"] = gist_ray_job(pairs[n], Path(tmp))
            g, s = runs[n]["gist_ray"], runs[n]["sentence_transformers"]
            g["ratio_embed"] = g["texts_per_s"] / s["texts_per_s"]
            g["ratio_command_less_ray"] = g["command_texts_per_s"] / s["texts_per_s"]
            print(f"gist-ray cache-guide {n}: {g}", flush=True)
    finally:
        cluster.shutdown()
    ended = dt.datetime.now(dt.timezone.utc)
    result = {
        "machine": machine(),
        "date": f"{started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC",
        "load_average_1min": [load_start, os.getloadavg()[0]],
        "ray_start_seconds": ray_start,
        "runs": {str(n): r for n, r in runs.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    append_results(Path(args.results), result, Path(args.out))


def append_results(path: Path, r: dict, raw: Path) -> None:
    rows = []
    for n, run in r["runs"].items():
        s, g = run["sentence_transformers"], run["gist_ray"]
        rows.append(
            f"| {n} | {s['texts_per_s']:.1f} ({s['seconds']:.1f} s) | "
            f"{g['actors']} x {g['threads_per_actor']}, {g['shards']} | "
            f"{g['setup_seconds']:.1f} / {g['startup_seconds']:.1f} / "
            f"{g['all_guides_loaded_seconds']:.1f} | {g['embed_seconds']:.1f} | "
            f"{g['texts_per_s']:.1f} | **{g['ratio_embed']:.2f}x** | "
            f"{g['command_seconds']:.1f} | {g['ratio_command_less_ray']:.2f}x |"
        )
    raw_name = raw.relative_to(HERE.parent) if raw.is_relative_to(HERE.parent) else raw
    head = (
        "| unique texts | ST encode texts/s | actors x threads, shards | setup / first guide "
        "loaded / all loaded, s | embed s | gist-ray texts/s | ratio | whole command s | "
        "ratio, whole command |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|\n"
    )
    text = f"""
## Guide-cache build against sentence-transformers' encode (CPU, issue 21)

`python benchmarks/guide_cache.py` (raw: `{raw_name}`): the same unique InsuranceQA texts
(questions and answers), all-mpnet-base-v2 at 64 tokens, embedded by sentence-transformers'
`encode` in one process (every core as torch threads, batch 64) and by `gist-ray cache-guide`
(its Ray Data job) on the same cores, one after the other in one run. Machine: {r["machine"]}.
Date: {r["date"]}; 1-min load average {r["load_average_1min"][0]:.1f} at the start,
{r["load_average_1min"][1]:.1f} at the end. Ray's start ({r["ray_start_seconds"]:.1f} s) is
excluded throughout.

{head}{chr(10).join(rows)}

"""
    for n, run in r["runs"].items():
        s, g = run["sentence_transformers"], run["gist_ray"]
        text += (
            f"CPU seconds at {n} texts, by process: during ST's encode "
            f"({s['seconds']:.1f} s x {os.cpu_count()} cores): "
            + ", ".join(f"{k} {v}" for k, v in s["cpu_seconds_by_process"].items())
            + f"; during the whole gist-ray command ({g['command_seconds']:.1f} s): "
            + ", ".join(f"{k} {v}" for k, v in g["cpu_seconds_by_process"].items())
            + ".\n\n"
        )
    text += (
        "setup: from the command's start to the job's submission (data loaded, texts hashed, "
        "unique texts written); first guide loaded: from the submission until the first actor "
        "holds its guide (actor process, torch import, guide load; the counterpart of "
        "sentence-transformers' untimed model load); embed: from then to the last shard "
        "written (the other actors' guide loads fall inside it); ratio: gist-ray texts/s over "
        "ST's, on embed; whole command: everything but Ray's start.\n"
    )
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
