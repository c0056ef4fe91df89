"""Quality parity (issue 24): at the same rows and budget, is gist-ray's model as good as
sentence-transformers' GISTEmbedLoss's? Over training seeds, on InsuranceQA's validation split.

    python benchmarks/quality.py                                  # everything (resumable)
    python benchmarks/quality.py --seeds 1 --questions 50         # a quick try
    python benchmarks/quality.py --methods base,st-gist,gr-1w --seeds 2

Every method starts from all-MiniLM-L6-v2 and trains on the same 1,024 rows: the default run's
(``gist-ray train``'s default config draws them with ``train.seed`` 42; they are written once to
``<work>/rows.parquet`` and every method, every seed, trains on that file, so a seed changes the
order of the rows, the dropout draws and the like, never the rows). Same budget everywhere:
global batch 32, 1 epoch, lr 3e-5 with 10 % linear warm-up then linear decay, weight decay 0.01,
gradient clipping 1.0, temperature 0.01 (sentence-transformers' scale 100), training length 64
tokens, no text twice in a batch (sentence-transformers: its NO_DUPLICATES batch sampler).

methods (``--methods``, comma-separated):
  base        all-MiniLM-L6-v2 untrained (no seed)
  st-mnrl     sentence-transformers MultipleNegativesRankingLoss (scale 100), its own trainer
  st-gist     sentence-transformers GISTEmbedLoss, guide all-mpnet-base-v2 live, its own trainer
  gr-1w       ``gist-ray train`` (the CLI, a subprocess) with 1 Ray worker
  gr-2w       the same with 2 workers (the default run's layout)
  gr-noguide  gist-ray with 1 worker and the guide off: ``train.guide_warmup_steps`` past the
              last step, i.e. plain InfoNCE (no guide mask) for the whole run (the config has no
              "no guide" switch; the guide's cache is still read, unused)
  gr-1w-f32   (not in the default set) gr-1w with ``data.guide_cache_dtype=float32``

Each training runs in its own subprocess; each trained model is then loaded as a user loads it,
``SentenceTransformer(path)`` (its own max length, 256), in another, and scored on InsuranceQA's
validation split (never test), per question:
  pools        each question against its positives and ``--pool`` of its own 200 candidate
               answers (a fixed random subset; the full 200 for 200 questions is 40k texts to
               encode per model, too slow here), nDCG@10
  distractors  the same questions against every other answer encoded for the benchmark: the
               other questions' positives and pool candidates, and ``--distractors`` answers
               drawn at random from the whole answer pool (all fixed per benchmark); a
               question's own pool candidates are left out (they are the pools task), nDCG@10.
               Reusing the pools' answers makes this task nearly free: with the defaults
               (200 questions, pools of 15, 300 random answers) ~3,600 distractors
Each unique text is encoded once per model.

Statistics: per method the mean over seeds of the per-seed mean over questions, with the spread
(std, min, max) of the per-seed means; paired differences A - B with a two-level bootstrap
(resample seeds, then questions; seed k of A paired with seed k of B, the same questions) and its
95 % percentile interval. With one seed the interval only reflects the questions.

Time, measured on this project's 2-core CPU machine (2026-12-08): per seed the five trainings
take about 21 min and the five evaluations (3,284 texts at 256 tokens each) about 11 min on a
quiet machine, about 40 min together under other jobs' load, so the default 5 seeds take about
3 h; ``--seeds 1 --questions 50`` about 32 min. The trainings alone (25 x 32 steps) are 1.8 h.

Resumable: finished trainings stay in ``--work`` (``<method>-s<seed>/model``) and every finished
evaluation's per-question scores in the output JSON (``--json``, written atomically after every
run), keyed by the eval set and the training settings; a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDENT, GUIDE = "all-MiniLM-L6-v2", "all-mpnet-base-v2"
ROWS_SEED, ROWS = 42, 1024  # the default run's train.seed and data.max_examples
BUDGET = {"batch": 32, "epochs": 1, "lr": 3e-5, "warmup": 0.1, "weight_decay": 0.01,
          "max_grad_norm": 1.0, "temperature": 0.01, "max_seq_length": 64}  # fmt: skip
SEEDS = (42, 43, 44, 45, 46)  # seed 42 is the default run's

# method -> (label, kind, extra settings). gist-ray's settings are config overrides.
METHODS: dict[str, tuple[str, str, dict]] = {
    "base": ("base (untrained)", "base", {}),
    "st-mnrl": ("ST MultipleNegativesRankingLoss", "st", {"loss": "mnrl"}),
    "st-gist": ("ST GISTEmbedLoss", "st", {"loss": "gist"}),
    "gr-1w": ("gist-ray, 1 worker", "gist-ray", {"ray.num_workers": 1}),
    "gr-2w": ("gist-ray, 2 workers", "gist-ray", {"ray.num_workers": 2}),
    "gr-noguide": (
        "gist-ray, guide off, 1 worker",
        "gist-ray",
        {"ray.num_workers": 1, "train.guide_warmup_steps": 1_000_000},
    ),
    "gr-1w-f32": (
        "gist-ray, 1 worker, float32 guide cache",
        "gist-ray",
        {"ray.num_workers": 1, "data.guide_cache_dtype": "float32"},
    ),
}
DEFAULT_METHODS = ("base", "st-mnrl", "st-gist", "gr-1w", "gr-2w", "gr-noguide")
# (A, B): the paired differences A - B reported
COMPARISONS = (
    ("gr-1w", "st-gist"),
    ("gr-2w", "st-gist"),
    ("gr-1w-f32", "st-gist"),
    ("gr-2w", "gr-1w"),
    ("gr-1w-f32", "gr-1w"),
    ("gr-1w", "st-mnrl"),
    ("gr-2w", "st-mnrl"),
    ("st-gist", "st-mnrl"),
    ("gr-1w", "gr-noguide"),
    ("gr-noguide", "st-mnrl"),
    ("st-gist", "base"),
    ("gr-1w", "base"),
)
TASKS = ("pools", "distractors")


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- statistics


def seed_means(scores: list[list[float]]) -> list[float]:
    """Per seed, the mean over questions."""
    return [sum(s) / len(s) for s in scores]


def spread(scores: list[list[float]]) -> dict[str, float]:
    """Mean, std (n - 1; 0 with one seed), min and max over seeds of the per-seed means."""
    m = seed_means(scores)
    mean = sum(m) / len(m)
    var = sum((x - mean) ** 2 for x in m) / (len(m) - 1) if len(m) > 1 else 0.0
    return {"mean": mean, "std": var**0.5, "min": min(m), "max": max(m), "seeds": len(m)}


def paired_interval(
    a: list[list[float]], b: list[list[float]], reps: int = 4000, seed: int = 0
) -> dict[str, float]:
    """A - B: the mean difference and its 95 % two-level bootstrap interval.

    ``a`` and ``b`` are [seed][question] scores, seed k of ``a`` paired with seed k of ``b`` and
    question j with question j; ``b`` may have one row (an untrained model: no seed), paired with
    every seed of ``a``. Each replicate resamples the seeds with replacement, then the questions
    with replacement, and averages the paired differences over both, so the interval reflects
    both the seed-to-seed and the question-to-question variation."""
    import numpy as np

    A, B = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if B.shape[0] == 1:
        B = np.repeat(B, A.shape[0], axis=0)
    if A.shape != B.shape:
        raise ValueError(f"unpaired scores: {A.shape} vs {B.shape}")
    d = A - B
    s, q = d.shape
    rng = np.random.default_rng(seed)
    # per replicate: seed draws [reps, s], question draws [reps, q]; mean of d[seeds][:, questions]
    si = rng.integers(0, s, size=(reps, s))
    qi = rng.integers(0, q, size=(reps, q))
    boot = np.empty(reps)
    for r in range(reps):
        boot[r] = d[si[r]][:, qi[r]].mean()
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "seeds": s, "questions": q}


# ----------------------------------------------------------------------------- bookkeeping


def run_key(method: str, seed: int | None) -> str:
    return method if seed is None else f"{method}/s{seed}"


def planned(methods: list[str], seeds: list[int]) -> list[tuple[str, int | None]]:
    """(method, seed) in the order they run: base once, then seed by seed every method, so a
    partial run has every method at its first seeds (paired comparisons need both)."""
    out: list[tuple[str, int | None]] = [("base", None)] if "base" in methods else []
    for s in seeds:
        out += [(m, s) for m in methods if m != "base"]
    return out


def train_settings(method: str, seed: int | None, rows_key: str) -> dict:
    """What a trained model depends on (its folder is reused while this stays equal)."""
    label, kind, extra = METHODS[method]
    return {"kind": kind, "extra": extra, "seed": seed, "rows": rows_key, **BUDGET}


def pending(
    plan: list[tuple[str, int | None]], done: dict[str, dict], eval_key: str, rows_key: str
) -> list[tuple[str, int | None]]:
    """The runs of ``plan`` without a finished evaluation under these eval and train settings."""
    out = []
    for m, s in plan:
        r = done.get(run_key(m, s))
        fresh = r and r.get("eval_key") == eval_key
        if not (fresh and r.get("train_key") == digest(train_settings(m, s, rows_key))):
            out.append((m, s))
    return out


def load_done(path: Path) -> dict[str, dict]:
    """The finished runs of an earlier output JSON (none if it is missing or unreadable)."""
    try:
        return json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ----------------------------------------------------------------------------- inputs


def write_rows(work: Path) -> tuple[Path, str]:
    """The default run's 1,024 rows (as ``gist-ray train`` draws them) as a parquet file."""
    from gist_ray.core.fileio import atomic_file
    from gist_ray.data.training import load_pairs

    ds = load_pairs("insuranceqa", max_examples=ROWS, seed=ROWS_SEED)
    key = digest(ds.to_dict())
    path = work / f"rows-seed{ROWS_SEED}-{ROWS}.parquet"
    if not path.exists():
        with atomic_file(path) as tmp:
            ds.to_parquet(str(tmp))
    return path, key


def build_evalset(questions: int, pool: int, distractors: int, seed: int = 0) -> dict:
    """The validation questions, their capped candidate pools and the random distractors, as
    answer ids and one list of unique texts (fixed by the arguments and ``seed``)."""
    from gist_ray.data import insuranceqa

    valid, answers = insuranceqa.questions("valid"), insuranceqa.answers()
    rng = random.Random(seed)
    qids = sorted(rng.sample(sorted(valid, key=int), questions), key=int)
    qs = []
    for q in qids:
        text, pos, cands = valid[q]
        qs.append({"qid": q, "text": text, "pos": list(pos),
                   "pool": sorted(rng.sample(list(cands), min(pool, len(cands))))})  # fmt: skip
    relevant = {a for x in qs for a in x["pos"]}
    others = sorted(set(answers) - relevant, key=int)
    dis = sorted(rng.sample(others, distractors), key=int)
    needed = sorted(relevant | {a for x in qs for a in x["pool"]} | set(dis), key=int)
    return {"questions": qs, "distractors": dis, "answers": {a: answers[a] for a in needed}}


# ----------------------------------------------------------------------------- children


def child_st(a: dict) -> dict:
    """sentence-transformers' own trainer, MNRL or GISTEmbedLoss (live guide)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        GISTEmbedLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from gist_ray.core.assets import resolve_model_path
    from gist_ray.core.fileio import atomic_dir

    rows = Dataset.from_parquet(a["rows"])
    model = SentenceTransformer(resolve_model_path(STUDENT), device="cpu")
    own = model.max_seq_length  # what the saved model keeps (256), as gist-ray's export does
    model.max_seq_length = BUDGET["max_seq_length"]
    if a["extra"]["loss"] == "gist":
        guide = SentenceTransformer(resolve_model_path(GUIDE), device="cpu")
        guide.max_seq_length = BUDGET["max_seq_length"]  # gist-ray: the training truncation
        loss = GISTEmbedLoss(model, guide, temperature=BUDGET["temperature"])
    else:
        loss = MultipleNegativesRankingLoss(model, scale=1 / BUDGET["temperature"])
    out = Path(a["out"])
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        num_train_epochs=BUDGET["epochs"],
        per_device_train_batch_size=BUDGET["batch"],
        learning_rate=BUDGET["lr"],
        warmup_steps=BUDGET["warmup"],  # a float < 1: a ratio (transformers 5)
        lr_scheduler_type="linear",
        weight_decay=BUDGET["weight_decay"],
        max_grad_norm=BUDGET["max_grad_norm"],
        seed=a["seed"],
        data_seed=a["seed"],
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=rows, loss=loss)
    t0 = time.perf_counter()
    trainer.train()
    steps = trainer.state.global_step
    model.max_seq_length = own
    with atomic_dir(out / "model") as tmp:
        model.save(str(tmp))
    return {"train_loop_s": time.perf_counter() - t0, "steps": steps}


def child_eval(a: dict) -> dict:
    """Per-question nDCG@10 of the model at ``a["model"]``, loaded as a user loads it."""
    import torch
    from sentence_transformers import SentenceTransformer

    from gist_ray.eval.metrics import ndcg_at_k, rank

    ev = json.loads(Path(a["evalset"]).read_text())
    model = SentenceTransformer(a["model"], device="cpu")
    ids = list(ev["answers"])
    texts = [x["text"] for x in ev["questions"]] + [ev["answers"][i] for i in ids]
    t0 = time.perf_counter()
    emb = model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    encode_s = time.perf_counter() - t0
    nq = len(ev["questions"])
    q_emb, a_emb = emb[:nq].float(), emb[nq:].float()
    row = {a_id: i for i, a_id in enumerate(ids)}

    pools, dis = [], []
    for qi, x in enumerate(ev["questions"]):
        docs = sorted(set(x["pos"]) | set(x["pool"]))  # sorted: rank() breaks ties by id
        d_emb = a_emb[torch.tensor([row[d] for d in docs])]
        ranked = rank(q_emb[qi : qi + 1], d_emb, docs, 10)[0]
        pools.append(ndcg_at_k({"q": ranked}, {"q": dict.fromkeys(x["pos"], 1)}, 10))
    # distractors: every encoded answer but the question's own pool candidates (sorted ids,
    # a stable sort: ties go to the smaller id as in rank())
    corpus = sorted(ids, key=int)
    c_emb = a_emb[torch.tensor([row[d] for d in corpus])]
    col = {d: i for i, d in enumerate(corpus)}
    scores = q_emb @ c_emb.T
    for qi, x in enumerate(ev["questions"]):
        scores[qi, [col[d] for d in x["pool"]]] = float("-inf")
        top = torch.sort(scores[qi], descending=True, stable=True).indices[:10].tolist()
        dis.append(
            ndcg_at_k({"q": [corpus[j] for j in top]}, {"q": dict.fromkeys(x["pos"], 1)}, 10)
        )
    return {"pools": pools, "distractors": dis, "max_seq_length": model.max_seq_length,
            "encoded_texts": len(texts), "encode_s": encode_s}  # fmt: skip


def child(spec: str) -> None:
    import torch

    a = json.loads(spec)
    torch.set_num_threads(a["threads"])
    res = {"st": child_st, "eval": child_eval}[a["kind"]](a)
    from gist_ray.core.fileio import write_json

    write_json(a["result"], res)


# ----------------------------------------------------------------------------- driver


def _env(threads: int) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _call(cmd: list[str], env: dict, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))


def train(method: str, seed: int, args, rows: Path, env: dict, folder: Path) -> Path:
    """Train (in a subprocess) unless ``folder`` already holds this run's finished model."""
    label, kind, extra = METHODS[method]
    model = folder / ("out/model" if kind == "gist-ray" else "model")
    if (folder / "trained.json").exists():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if kind == "st":
        spec = {"kind": "st", "rows": str(rows), "extra": extra, "seed": seed, "out": str(folder)}
        spec.update(threads=args.threads, result=str(folder / "st.json"))
        _call([sys.executable, __file__, "--child", json.dumps(spec)], env, folder / "log.txt")
    else:
        sets = {
            "data.train": str(rows),
            "data.max_examples": ROWS,
            "data.guide_cache_dir": str(args.work / "guide-cache"),
            "train.seed": seed,
            "eval.source": "",
            "train.checkpoint_every": 100_000,  # only the final checkpoint
            "output_dir": str(folder / "out"),
            "mlflow.tracking_uri": f"sqlite:///{args.work / 'mlflow.db'}",
            "mlflow.experiment": "quality-bench",
            **extra,
        }
        cmd = [sys.executable, "-m", "gist_ray.cli", "train", "--fresh"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        _call(cmd, env, folder / "log.txt")
    from gist_ray.core.fileio import write_json

    write_json(folder / "trained.json", {"train_s": time.perf_counter() - t0})
    return model


def evaluate(model: str, args, env: dict, evalset: Path, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"kind": "eval", "model": model, "evalset": str(evalset), "threads": args.threads,
            "result": str(folder / "eval.json")}  # fmt: skip
    _call([sys.executable, __file__, "--child", json.dumps(spec)], env, folder / "log.txt")
    return json.loads((folder / "eval.json").read_text())


def summarize(runs: dict[str, dict], methods: list[str]) -> dict:
    """Per method its spread over seeds; the paired comparisons both sides of which ran."""
    per, scores = {}, {}
    for m in methods:
        rs = sorted((r for r in runs.values() if r["method"] == m), key=lambda r: r["seed"] or 0)
        if not rs:
            continue
        scores[m] = {t: {r["seed"]: r[t] for r in rs} for t in TASKS}
        per[m] = {t: spread([r[t] for r in rs]) for t in TASKS}
        per[m]["seeds"] = [r["seed"] for r in rs]
        per[m]["train_s"] = [r.get("train_s") for r in rs]
        per[m]["eval_s"] = [r.get("eval_s") for r in rs]
    comps = []
    for a, b in COMPARISONS:
        if a not in scores or b not in scores:
            continue
        row = {"a": a, "b": b}
        for t in TASKS:
            sa, sb = scores[a][t], scores[b][t]
            if None in sb:  # base: one row, paired with every seed
                pairs = sorted(sa)
                row[t] = paired_interval([sa[s] for s in pairs], [sb[None]])
            else:
                pairs = sorted(set(sa) & set(sb))
                if not pairs:
                    break
                row[t] = paired_interval([sa[s] for s in pairs], [sb[s] for s in pairs])
        else:
            comps.append(row)
    return {"methods": per, "comparisons": comps}


def _f(x: float, spec: str = ".3f") -> str:
    return format(x, spec)


def table(summary: dict) -> str:
    head = (
        "| method | seeds | pools nDCG@10, mean ± std [min, max] "
        "| distractors nDCG@10, mean ± std [min, max] |\n|---|---:|---:|---:|"
    )
    lines = [head]
    for m, s in summary["methods"].items():
        cells = [
            f"{_f(s[t]['mean'])} ± {_f(s[t]['std'])} [{_f(s[t]['min'])}, {_f(s[t]['max'])}]"
            for t in TASKS
        ]
        n = "-" if s["seeds"] == [None] else len(s["seeds"])
        lines.append(f"| {METHODS[m][0]} | {n} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "| difference (paired: seeds and questions) | pools Δ [95 % interval] "
        "| distractors Δ [95 % interval] |",
        "|---|---:|---:|",
    ]
    for c in summary["comparisons"]:
        cells = [
            f"{_f(c[t]['diff'], '+.3f')} [{_f(c[t]['lo'], '+.3f')}, {_f(c[t]['hi'], '+.3f')}]"
            for t in TASKS
        ]
        n = c["pools"]["seeds"]
        lines.append(
            f"| {METHODS[c['a']][0]} − {METHODS[c['b']][0]} ({n} seed{'s' * (n > 1)}) "
            f"| {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)


def run_all(todo, args, done, meta, env, rows, rows_key, evalset, eval_key, errors) -> None:
    """Train and evaluate every pending run, writing the JSON after each."""
    from gist_ray.core.fileio import write_json

    for m, s in todo:
        folder = args.work / (run_key(m, s).replace("/", "-"))
        t0 = time.perf_counter()
        print(f"[quality] {run_key(m, s)}: {METHODS[m][0]} ...", flush=True)
        try:
            if METHODS[m][1] == "base":
                from gist_ray.core.assets import resolve_model_path

                model, train_s = resolve_model_path(STUDENT), 0.0
            else:
                model = str(train(m, s, args, rows, env, folder))
                train_s = json.loads((folder / "trained.json").read_text())["train_s"]
            t1 = time.perf_counter()
            res = evaluate(model, args, env, evalset, folder / f"eval-{eval_key}")
        except RuntimeError as e:
            print(f"[quality]   failed: {e}", file=sys.stderr, flush=True)
            errors.append(f"{run_key(m, s)}: {e}")
            continue
        done[run_key(m, s)] = {
            "method": m, "seed": s, "eval_key": eval_key,
            "train_key": digest(train_settings(m, s, rows_key)),
            "train_s": train_s, "eval_s": time.perf_counter() - t1, **res,
        }  # fmt: skip
        write_json(args.json, {**meta, "runs": done})
        print(f"[quality]   pools {sum(res['pools']) / len(res['pools']):.4f}, distractors "
              f"{sum(res['distractors']) / len(res['distractors']):.4f} "
              f"(train {train_s:.0f} s, eval {time.perf_counter() - t1:.0f} s, this call "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--seeds", type=int, default=len(SEEDS), help=f"the first N of {SEEDS}")
    p.add_argument("--questions", type=int, default=200, help="validation questions (>= 200)")
    p.add_argument("--pool", type=int, default=15, help="candidates per question's pool")
    p.add_argument("--distractors", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/gist-ray-quality"))
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "quality.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(
            f"--methods: unknown {', '.join(bad)}; allowed: {', '.join(METHODS)}", file=sys.stderr
        )
        return 2
    if not 1 <= args.seeds <= len(SEEDS):
        print(f"--seeds must be 1..{len(SEEDS)}", file=sys.stderr)
        return 2
    from gist_ray.core.fileio import write_json

    sys.path.insert(0, str(ROOT))
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, rows_key = write_rows(args.work)
    ev = build_evalset(args.questions, args.pool, args.distractors)
    eval_key = digest(ev)
    evalset = args.work / f"evalset-{eval_key}.json"
    if not evalset.exists():
        write_json(evalset, ev)
    env = _env(args.threads)
    plan = planned(methods, list(SEEDS[: args.seeds]))
    done = load_done(args.json)
    todo = pending(plan, done, eval_key, rows_key)
    print(f"[quality] {len(plan)} runs, {len(plan) - len(todo)} already done; eval: "
          f"{args.questions} questions, pools of {args.pool}, {args.distractors} distractors "
          f"({len(ev['answers']) + args.questions} texts per model)", flush=True)  # fmt: skip
    started = time.time()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or ''}",
        "command": " ".join(
            ["python benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "eval": {
            "split": "valid",
            "questions": args.questions,
            "pool": args.pool,
            "distractors": args.distractors,
            "key": eval_key,
        },  # fmt: skip
        "rows": {"seed": ROWS_SEED, "rows": ROWS, "key": rows_key},
        "budget": BUDGET,
    }
    errors = []
    try:
        run_all(todo, args, done, meta, env, rows, rows_key, evalset, eval_key, errors)
    except KeyboardInterrupt:
        print("\n[quality] interrupted: finished runs are in the JSON; rerun to resume", flush=True)
        return 130
    current = {run_key(m, s): done[run_key(m, s)] for m, s in plan if run_key(m, s) in done}
    current = {k: r for k, r in current.items() if r["eval_key"] == eval_key}
    summary = summarize(current, list(METHODS))
    wall = time.time() - started
    write_json(args.json, {**meta, "wall_s_this_call": wall, "errors": errors,
                           "summary": summary, "runs": done})  # fmt: skip
    print(table(summary))
    print(f"\n[quality] this call: {wall / 60:.1f} min; JSON: {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
