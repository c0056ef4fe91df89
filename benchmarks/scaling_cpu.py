"""Issue-6 benchmarks on a CPU machine: guide cache vs live guide, gradient-caching memory, and
1 vs 2 workers. Student all-MiniLM-L6-v2, guide all-mpnet-base-v2, InsuranceQA rows.

    python benchmarks/scaling_cpu.py --out benchmarks/scaling_cpu.json

Each measurement that needs a clean peak-memory reading runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cfg(batch: int, max_len: int, extra: list[str] = ()):
    from gist_ray.config import load_config

    return load_config(
        overrides=[
            f"train.batch_size={batch}",
            "ray.num_workers=1",
            f"model.max_seq_length={max_len}",
            *extra,
        ]
    )


def _rows(n: int):
    from gist_ray.data.training import load_pairs

    ds = load_pairs("insuranceqa", max_examples=n, seed=0)
    return [ds["anchor"], ds["positive"], ds["negative_1"]]


def bench_guide_cache(batch: int, max_len: int, repeats: int) -> dict:
    """Live-guide step vs cached-guide step (same batch, no gradient caching), one process."""

    from gist_ray.guide.source import live_guide_embeddings
    from gist_ray.loss import GistLoss
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec
    from gist_ray.train.step import training_step

    loss_fn = GistLoss.from_config(_cfg(batch, max_len).loss)
    student = load_encoder(ModelSpec("minilm", max_seq_length=max_len)).train()
    guide = load_encoder(ModelSpec("mpnet", max_seq_length=max_len), frozen=True)
    cols = _rows(batch * (repeats + 1))
    out = {"live_step_s": [], "guide_forward_s": [], "cached_step_s": []}
    for r in range(repeats + 1):  # the first round warms up
        batch_cols = [c[r * batch : (r + 1) * batch] for c in cols]
        t0 = time.perf_counter()
        g = live_guide_embeddings(guide, batch_cols)
        t_guide = time.perf_counter() - t0
        training_step(student, loss_fn, batch_cols, g)
        t_live = time.perf_counter() - t0
        student.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        training_step(student, loss_fn, batch_cols, [x.clone() for x in g])  # cache hit
        t_cached = time.perf_counter() - t0
        student.zero_grad(set_to_none=True)
        if r:
            out["live_step_s"].append(t_live)
            out["guide_forward_s"].append(t_guide)
            out["cached_step_s"].append(t_cached)
    med = {k: sorted(v)[len(v) // 2] for k, v in out.items()}
    med["guide_share_of_live"] = med["guide_forward_s"] / med["live_step_s"]
    med["cached_vs_live_minus_guide"] = med["cached_step_s"] / (
        med["live_step_s"] - med["guide_forward_s"]
    )
    return {"batch": batch, "max_seq_length": max_len, "repeats": repeats, **med}


def _peak_child(batch: int, mini: int, max_len: int) -> None:
    """Child process: one gradient-cached step at ``batch`` rows; prints peak RSS growth."""
    import torch

    from gist_ray.loss import GistLoss
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec
    from gist_ray.train.step import training_step

    loss_fn = GistLoss.from_config(_cfg(batch, max_len).loss)
    student = load_encoder(ModelSpec("minilm", max_seq_length=max_len)).train()
    cols = _rows(batch)
    gen = torch.Generator().manual_seed(0)
    guide_emb = [
        torch.nn.functional.normalize(torch.randn(batch, 768, generator=gen), dim=-1) for _ in cols
    ]  # the guide cache's role: embeddings read, no guide forward
    # Warm up on one mini-batch so allocator and thread-pool growth is not counted as the batch's.
    warm = [c[:mini] for c in cols]
    training_step(student, loss_fn, warm, [g[:mini] for g in guide_emb], mini)
    student.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    training_step(student, loss_fn, cols, guide_emb, mini)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "batch": batch,
                "mini_batch_size": mini,
                "max_seq_length": max_len,
                "step_s": dt,
                "peak_rss_growth_mib": (peak - base) / 1024,
                "embeddings_mib": 3 * batch * (384 + 768) * 4 / 2**20,
            }
        )
    )


def bench_memory(batches: list[int], mini: int, max_len: int) -> list[dict]:
    rows = []
    for b in batches:
        res = subprocess.run(
            [sys.executable, __file__, "--peak-child", str(b), str(mini), str(max_len)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def bench_workers(per_worker: int, steps: int, max_len: int) -> list[dict]:
    """Weak scaling through the real Ray path: 1 and 2 workers, same per-worker batch."""
    import tempfile

    import mlflow

    from gist_ray.commands.train import train
    from gist_ray.config import load_config

    out = []
    for workers in (1, 2):
        tmp = tempfile.mkdtemp(prefix="gist-ray-bench-")
        cfg = load_config(
            overrides=[
                f"ray.num_workers={workers}",
                f"train.batch_size={per_worker * workers}",
                f"train.max_steps={steps}",
                f"model.max_seq_length={max_len}",
                "eval.source=",
                f"data.max_examples={per_worker * workers * steps}",
                "train.checkpoint_every=1000",
                f"output_dir={tmp}/out",
                f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            ]
        )
        t0 = time.perf_counter()
        res = train(cfg)
        wall = time.perf_counter() - t0
        hist = mlflow.MlflowClient(res["tracking_uri"]).get_metric_history(
            res["run_id"], "step_time_s"
        )
        times = sorted(m.value for m in hist)[: max(1, steps - 1)]  # drop the slowest (warm-up)
        step = sum(times) / len(times)
        out.append(
            {
                "workers": workers,
                "per_worker_batch": per_worker,
                "global_batch": per_worker * workers,
                "step_s": step,
                "samples_per_s": per_worker * workers / step,
                "step_times_s": [round(m.value, 2) for m in sorted(hist, key=lambda m: m.step)],
                "run_wall_s": round(wall, 1),  # Ray start, guide cache, steps, save
            }
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    import torch

    # One thread: on a shared 2-core machine OpenMP's second thread spin-waits behind other
    # processes and makes steps several times slower and far noisier (measured here).
    torch.set_num_threads(1)
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-child":
        _peak_child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/scaling_cpu.json")
    p.add_argument("--cache-batch", type=int, default=16)
    p.add_argument("--cache-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-batches", default="256,1024,4096")
    p.add_argument("--mem-len", type=int, default=32)
    p.add_argument("--workers-batch", type=int, default=16, help="rows per worker")
    p.add_argument("--workers-steps", type=int, default=4)
    p.add_argument("--workers-len", type=int, default=128)
    p.add_argument("--skip", default="", help="comma list of: cache,memory,workers")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if "cache" not in skip:
        result["guide_cache"] = bench_guide_cache(args.cache_batch, args.cache_len, args.repeats)
        print(result["guide_cache"], flush=True)
    if "memory" not in skip:
        result["memory"] = bench_memory(
            [int(b) for b in args.mem_batches.split(",")], 16, args.mem_len
        )
    if "workers" not in skip:
        result["workers"] = bench_workers(args.workers_batch, args.workers_steps, args.workers_len)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
