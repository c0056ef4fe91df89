"""Issue 13: does a worker's memory grow with the dataset? And how fast is the guide cache built?

1. Peak private memory (RssAnon, sampled every 0.2 s from /proc) of each Ray Train worker of
   ``gist-ray train`` (2 CPU workers, tiny student and guide of width 32, guide cache on, 3 steps
   of a global batch of 32, no eval) at 20,000 / 200,000 / 2,000,000 rows.
2. Guide-cache build throughput (unique texts/s) of the Ray Data job with 1 and 2 workers, and
   the cache's size on disk per row.

Rows are drawn from pools of ``--pool`` texts per column (anchor, positive, negative), so the
number of *unique* texts, and with it the guide's work, stays bounded while the rows grow 100x:
what grows with the rows is the data itself and the cache's row -> text index, which is what the
memory question is about. Writes ``benchmarks/data_scaling.json``; the table in
``benchmarks/RESULTS.md`` comes from it.

    .venv/bin/python benchmarks/data_scaling.py            # ~10-15 min on a 2-vCPU box
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_rows(path: Path, rows: int, pool: int, seed: int) -> Path:
    """A parquet file of ``rows`` (anchor, positive, negative) rows drawn from text pools."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import make_sentences

    rng = np.random.default_rng(seed)
    columns = {}
    for i, name in enumerate(("anchor", "positive", "negative")):
        texts = np.array([f"{s} {name[0]}{j}" for j, s in enumerate(make_sentences(pool, i))])
        columns[name] = pa.array(texts[rng.integers(0, pool, rows)], pa.string())
    pq.write_table(pa.table(columns), path)
    return path


def _parent(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        pid = _parent(pid)
    return False


class RssSampler:
    """Samples RssAnon of the processes under ``root`` (the gist-ray command, which starts the
    local Ray cluster) whose command line names ``marker`` (Ray's worker processes are titled
    ``ray::RayTrainWorker...``); keeps each pid's peak. Other users' Ray workers on the machine
    are not counted."""

    def __init__(self, root: int, marker: str = "RayTrainWorker", every_s: float = 0.2) -> None:
        self.root, self.marker, self.every_s = root, marker, every_s
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if self.marker.encode() not in (proc / "cmdline").read_bytes():
                        continue
                    if not descends_from(int(proc.name), self.root):
                        continue
                    for line in (proc / "status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            kib = int(line.split()[1])
                            pid = int(proc.name)
                            self.peak[pid] = max(self.peak.get(pid, 0), kib)
                except (OSError, ValueError):
                    continue


def gist_ray(args: list[str], env: dict[str, str], sample: bool = False) -> tuple[float, dict]:
    """Run one gist-ray command; (wall seconds, peak RssAnon KiB per Ray Train worker)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/gist-ray"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = RssSampler(proc.pid)
    if sample:
        sampler.__enter__()
    _, err = proc.communicate()
    if sample:
        sampler.__exit__()
    if proc.returncode:
        raise RuntimeError(f"gist-ray {args[0]} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, sampler.peak


def sets(pairs: list[str]) -> list[str]:
    return sum((["--set", p] for p in pairs), [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    ap.add_argument("--pool", type=int, default=10_000, help="texts per column's pool")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data_scaling.json")
    a = ap.parse_args()

    from tests.conftest import build_tiny_bert

    work = Path(tempfile.mkdtemp(prefix="gist-ray-data-scaling-"))
    student = build_tiny_bert(work / "student", hidden=32, seed=0)
    guide = build_tiny_bert(work / "guide", hidden=32, seed=1)
    env = {**os.environ, "GIST_RAY_CACHE": str(work / "cache"), "PATH": f"{ROOT}/.venv/bin:"}
    env["PATH"] += os.environ.get("PATH", "")
    common = [
        f"model.student={student}",
        f"model.guide={guide}",
        "model.max_seq_length=32",
        "data.max_examples=0",
        "eval.source=",
        "train.batch_size=32",
        "ray.num_cpus=2",
        "ray.num_workers=2",
    ]
    result = {
        "machine": f"{platform.node()}: {os.cpu_count()} vCPU, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "pool_per_column": a.pool,
        "memory": [],
        "cache_build": [],
    }
    for rows in a.rows:
        data = write_rows(work / f"rows-{rows}.parquet", rows, a.pool, seed=rows)
        out = work / f"train-{rows}"
        run = [f"data.train={data}", "train.max_steps=3", "train.checkpoint_every=100"]
        wall, peak = gist_ray(["train", *sets([*common, *run, f"output_dir={out}"])], env, True)
        peaks = sorted(peak.values())
        cache = next((data.parent / ".gist-ray-guide-cache").glob(f"rows-{rows}-*"))
        disk = sum(f.stat().st_size for f in cache.iterdir() if f.is_file())
        manifest = json.loads((cache / "manifest.json").read_text())
        entry = {
            "rows": rows,
            "unique_texts": manifest["unique_texts"],
            "worker_peak_rss_anon_mib": [round(k / 1024, 1) for k in peaks],
            "cache_bytes": disk,
            "cache_bytes_per_row": round(disk / rows, 1),
            "train_wall_s": round(wall, 1),
        }
        print(entry, flush=True)
        result["memory"].append(entry)
    data = work / f"rows-{a.rows[0]}.parquet"
    for workers in (1, 2):
        where = work / f"build-{workers}"
        args = [f"data.train={data}", f"data.guide_cache_dir={where}", f"output_dir={where}/out"]
        common_w = [c for c in common if not c.startswith("ray.num_workers")]
        gist_ray(["cache-guide", *sets([*common_w, *args, f"ray.num_workers={workers}"])], env)
        text = (where / "out" / "gist-ray.log").read_text()
        built = [ln for ln in text.splitlines() if "built in" in ln][-1]
        seconds = float(built.split("built in ")[1].split("s")[0])
        unique = int(built.split("(")[1].split(" unique")[0])
        job = [ln for ln in text.splitlines() if "unique texts (100%)" in ln][-1]
        entry = {
            "workers": workers,
            "unique_texts": unique,
            "build_s": seconds,  # planning (unique texts, index) + the job
            "texts_per_s": round(unique / seconds),
            "job_texts_per_s": int(job.split("), ")[1].split(" texts/s")[0].replace(",", "")),
        }
        print(entry, flush=True)
        result["cache_build"].append(entry)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
