"""gist-ray mine vs sentence-transformers' mine_hard_negatives on InsuranceQA: time, and the
quality of the same student trained on each miner's negatives.

Both miners use the same guide (all-mpnet-base-v2 at the training's 64 tokens), the same rows
(the built-in InsuranceQA training rows, ``--rows`` of them, as ``gist-ray train`` samples
them), the same corpus (the rows' unique positives), the same k and TopK-PercPos at 95% of the
positive's score (sentence-transformers: ``relative_margin=0.05``, ``sampling_strategy="top"``).
gist-ray reads the guide's embeddings from the guide cache (built by an earlier training or
``gist-ray cache-guide`` on the same data, or here if missing: that time is reported apart);
sentence-transformers embeds every anchor and positive with the guide each call.

Quality (``--train``): the student (minilm) trained the default way (``gist-ray train``, only
``data.train`` changed) on (a) the built-in rows with their random candidate negatives, (b)
sentence-transformers' mined negatives, (c) gist-ray's; then ``benchmarks/heldout_eval.py`` on
held-out InsuranceQA test questions. The guide caches of (b) and (c) are written from the
embeddings already computed (their texts are the data's), so no training runs the guide.

Usage: python benchmarks/mine_compare.py [--rows 1024] [--k 1] [--train] --dir DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mine_ours(cfg) -> dict:
    from gist_ray.commands import mine as command
    from gist_ray.data.training import load_training_sets
    from gist_ray.mining.guide import guide_embeddings_for

    t0 = time.perf_counter()
    guide_embeddings_for(cfg, load_training_sets(cfg))  # load (or build) the guide cache
    t_cache = time.perf_counter() - t0
    t0 = time.perf_counter()
    [s] = command.mine(cfg)
    return {"cache_s": t_cache, "mine_s": time.perf_counter() - t0, "summary": s.__dict__}


def seed_from(cfg, rows: int) -> list[str]:
    """The guide cache of ``cfg``'s rows written from the cache of the first ``rows`` rows
    (the built-in rows are a fixed shuffle, so fewer rows are a prefix of more)."""
    from gist_ray.config import load_config_dict
    from gist_ray.data.training import load_training_sets
    from gist_ray.mining.guide import guide_embeddings_for, known_embeddings, seed_guide_cache

    big = cfg.to_dict()
    big["data"]["max_examples"] = rows
    big = load_config_dict(big)
    sets = load_training_sets(big)
    known = known_embeddings(big, sets, guide_embeddings_for(big, sets))
    return [str(p) for p in seed_guide_cache(cfg, known)]


def search_scale(queries: int, corpus: int, dim: int, k: int) -> dict:
    """The exact search alone on random unit vectors: torch (chunked) and faiss."""
    import torch
    import torch.nn.functional as F

    from gist_ray.mining.search import Searcher, faiss_available
    from gist_ray.mining.select import Rule, mine_negatives

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(queries, dim, generator=g), dim=-1)
    c = F.normalize(torch.randn(corpus, dim, generator=g), dim=-1)
    excluded = [[i % corpus] for i in range(queries)]
    pos = (q * c[[i % corpus for i in range(queries)]]).sum(-1) + 0.5  # a positive above all
    out = {"queries": queries, "corpus": corpus, "dim": dim, "k": k}
    for backend in ("torch", "faiss") if faiss_available() else ("torch",):
        t0 = time.perf_counter()
        searcher = Searcher(c, backend, 65536)
        for b in range(0, queries, 1024):
            mine_negatives(
                q[b : b + 1024], searcher, excluded[b : b + 1024], pos[b : b + 1024], Rule(k=k)
            )
        out[f"{backend}_s"] = time.perf_counter() - t0
    return out


def mine_st(cfg, out: Path) -> dict:
    """sentence-transformers' mine_hard_negatives on the same rows, guide and settings."""
    import datasets
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from gist_ray.core.assets import resolve_model_path
    from gist_ray.data.training import load_training_sets

    [s] = load_training_sets(cfg)
    ds = datasets.Dataset.from_dict({c: s.column_texts()[c] for c in ("anchor", "positive")})
    t0 = time.perf_counter()
    guide = SentenceTransformer(resolve_model_path(cfg.model.guide), device="cpu")
    guide.max_seq_length = min(cfg.model.max_seq_length, guide.max_seq_length)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    mined = mine_hard_negatives(
        ds,
        guide,
        relative_margin=round(1 - cfg.mine.perc, 6),
        num_negatives=cfg.mine.k,
        sampling_strategy="top",
        output_format="n-tuple",
        batch_size=64,
        verbose=True,
    )
    t_mine = time.perf_counter() - t0
    mined.to_parquet(str(out))
    return {"load_s": t_load, "mine_s": t_mine, "rows": len(mined), "output": str(out)}


def seed_cache(cfg, path: Path) -> list[str]:
    """The guide cache of ``path`` from the embeddings of the original rows."""
    from gist_ray.commands.mine import training_config
    from gist_ray.data.training import load_training_sets
    from gist_ray.mining.guide import guide_embeddings_for, known_embeddings, seed_guide_cache

    sets = load_training_sets(cfg)
    known = known_embeddings(cfg, sets, guide_embeddings_for(cfg, sets))
    return [str(p) for p in seed_guide_cache(training_config(cfg, str(path)), known)]


def overlap(ours: Path, st: Path, k: int) -> dict:
    """How often the two miners chose the same negatives for the same (anchor, positive)."""
    import pyarrow.parquet as pq

    def rows(p):
        t = pq.read_table(p).to_pylist()
        return {
            (r["anchor"], r["positive"]): [r[f"negative_{j}"] for j in range(1, k + 1)] for r in t
        }

    a, b = rows(ours), rows(st)
    both = set(a) & set(b)
    same_first = sum(a[x][0] == b[x][0] for x in both)
    shared = sum(len(set(a[x]) & set(b[x])) for x in both)
    return {"rows_both": len(both), "same_first": same_first, "shared_negatives": shared}


def train(name: str, source: str, d: Path, rows: int) -> dict:
    out = d / f"train-{name}"
    cmd = [
        "gist-ray", "train",
        "--set", f"data.train={source}",
        "--set", f"data.max_examples={rows}",
        "--set", f"output_dir={out}",
        "--set", f"mlflow.tracking_uri=sqlite:///{d / 'mlflow.db'}",
        "--set", f"mlflow.artifact_location={d / 'mlruns'}",
        "--set", "eval.source=",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return {"source": source, "model": str(out / "model"), "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024, help="data.max_examples")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--perc", type=float, default=0.95)
    p.add_argument("--train", action="store_true", help="also train (a), (b), (c) and evaluate")
    p.add_argument("--dir", type=Path, required=True, help="work folder (outputs, models)")
    p.add_argument("--heldout-args", default="", help="extra arguments for heldout_eval.py")
    p.add_argument(
        "--seed-from",
        type=int,
        default=0,
        help="write the guide cache of --rows from the cache of this many rows (a superset)",
    )
    p.add_argument(
        "--scale", type=int, default=0, help="also time the search alone: N queries x N corpus"
    )
    a = p.parse_args()

    from gist_ray.config import load_config
    from gist_ray.core import log

    log.configure(stream="stdout")
    a.dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        overrides=[
            f"data.max_examples={a.rows}",
            f"mine.k={a.k}",
            f"mine.perc={a.perc}",
            f"output_dir={a.dir}",
            f"mine.output={a.dir / 'gist-ray-mined.parquet'}",
        ]
    )
    res = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_start": os.getloadavg()[0],
        "rows": a.rows,
        "k": a.k,
        "perc": a.perc,
    }
    if a.seed_from:
        res["seeded_from"] = {"rows": a.seed_from, "caches": seed_from(cfg, a.seed_from)}
    res["ours"] = mine_ours(cfg)
    st_path = a.dir / "st-mined.parquet"
    res["st"] = mine_st(cfg, st_path)
    res["overlap"] = overlap(Path(cfg.mine.output), st_path, a.k)
    res["st"]["seeded_cache"] = seed_cache(cfg, st_path)
    res["load_after_mining"] = os.getloadavg()[0]
    if a.scale:
        res["scale"] = search_scale(a.scale, a.scale, 768, a.k)
    print(json.dumps(res, indent=2, default=str))
    if a.train:
        sources = {"a": "insuranceqa", "b": str(st_path), "c": cfg.mine.output}
        res["train"] = {n: train(n, s, a.dir, a.rows) for n, s in sources.items()}
        models = ["--model=base=minilm"] + [
            f"--model={n}={t['model']}" for n, t in res["train"].items()
        ]
        heldout = a.dir / "heldout.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "heldout_eval.py"), *models]
        subprocess.run([*cmd, "--out", str(heldout), *a.heldout_args.split()], check=True)
        res["heldout"] = json.loads(heldout.read_text())
    res["load_end"] = os.getloadavg()[0]
    (a.dir / "mine_compare.json").write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != "heldout"}, indent=2, default=str))


if __name__ == "__main__":
    main()
