"""Base student vs trained model on held-out InsuranceQA questions, each model loaded the way a
user loads it (``SentenceTransformer(path)``) and used at its own settings: its own max length,
``encode_query`` for questions and ``encode_document`` for answers.

The questions are test-split questions the training-time eval never sees (the default run's
eval samples ``eval.max_queries`` test questions with ``train.seed``; those are excluded), and
training uses the train split only. Two protocols:

(a) random distractors: each question's positive answers plus ``--distractors`` answers drawn
    at random from the 27,413-answer pool, one corpus for all questions;
(b) candidate pools: each question ranks its own 200 candidate answers plus its positives
    (InsuranceQA's own protocol; the candidates are topically close, so it is the harder one).

Usage:
  python benchmarks/heldout_eval.py --model base=minilm --model trained=gist-ray-output/model \\
      [--model trained@64=gist-ray-output/model@64] [--out FILE.json]
A ``@N`` suffix on a path reads that model at N tokens instead of its own max length.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def heldout_questions(n: int, pool_n: int, seed: int, eval_queries: int, eval_seed: int):
    """(questions for (a), questions for (b)): test questions outside the training-time eval."""
    from gist_ray.data import insuranceqa
    from gist_ray.eval.sets import load_eval

    used = set(load_eval("insuranceqa", "test", eval_queries, 1000, seed=eval_seed).queries)
    qids = sorted((q for q in insuranceqa.questions("test") if q not in used), key=int)
    random.Random(seed).shuffle(qids)
    return qids[:n], qids[:pool_n], len(used)


def encode(model, texts: list[str], query: bool) -> torch.Tensor:
    fn = model.encode_query if query else model.encode_document
    emb = fn(texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False)
    return F.normalize(emb.float().cpu(), dim=-1)


def metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    from gist_ray.eval.metrics import mrr_at_k, ndcg_at_k, recall_at_k

    return {
        "ndcg@10": ndcg_at_k(ranked, qrels, 10),
        "mrr@10": mrr_at_k(ranked, qrels, 10),
        "recall@1": recall_at_k(ranked, qrels, 1),
        "recall@10": recall_at_k(ranked, qrels, 10),
    }


def evaluate(model, qa, pools, distractor_ids, answers, questions) -> dict:
    from gist_ray.eval.metrics import rank

    needed = sorted(
        {a for q in pools for a in questions[q][1] + questions[q][2]}
        | {a for q in qa for a in questions[q][1]}
        | set(distractor_ids),
        key=int,
    )
    index = {a: i for i, a in enumerate(needed)}
    docs = encode(model, [answers[a] for a in needed], query=False)
    qs = sorted(set(qa) | set(pools), key=int)
    qemb = dict(zip(qs, encode(model, [questions[q][0] for q in qs], query=True)))
    qrels = {q: dict.fromkeys(questions[q][1], 1) for q in qs}

    corpus = sorted({a for q in qa for a in questions[q][1]} | set(distractor_ids), key=int)
    ranked = rank(torch.stack([qemb[q] for q in qa]), docs[[index[a] for a in corpus]], corpus, 10)
    random_distractors = metrics(dict(zip(qa, ranked)), qrels)

    pooled = {}
    for q in pools:
        cands = sorted(set(questions[q][1]) | set(questions[q][2]), key=int)
        pooled[q] = rank(qemb[q][None], docs[[index[a] for a in cands]], cands, 10)[0]
    return {
        "random_distractors": random_distractors,
        "candidate_pools": metrics(pooled, qrels),
        "texts_encoded": len(needed) + len(qs),
    }


def load(spec: str):
    """``path`` or ``path@N`` (read at N tokens); a user's load otherwise."""
    from sentence_transformers import SentenceTransformer

    from gist_ray.core.assets import resolve_model_path

    path, _, tokens = spec.partition("@")
    model = SentenceTransformer(resolve_model_path(path), device="cpu")
    if tokens:
        model.max_seq_length = int(tokens)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH[@N]")
    p.add_argument("--questions", type=int, default=200, help="questions for (a)")
    p.add_argument("--pool-questions", type=int, default=100, help="questions for (b)")
    p.add_argument("--distractors", type=int, default=3000, help="random answers for (a)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-queries", type=int, default=150, help="the training eval's sample")
    p.add_argument("--eval-seed", type=int, default=42, help="the training eval's seed")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.manual_seed(0)

    from gist_ray.data import insuranceqa

    t_start = time.perf_counter()
    qa, pools, excluded = heldout_questions(
        a.questions, a.pool_questions, a.seed, a.eval_queries, a.eval_seed
    )
    questions, answers = insuranceqa.questions("test"), insuranceqa.answers()
    positives = {x for q in qa for x in questions[q][1]}
    pool = sorted((x for x in answers if x not in positives), key=int)
    distractors = random.Random(a.seed + 1).sample(pool, a.distractors)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "protocol": {
            "split": "test",
            "excluded_training_eval_questions": excluded,
            "questions_random_distractors": len(qa),
            "random_distractors": a.distractors,
            "questions_candidate_pools": len(pools),
            "candidates_per_question": 200,
        },
        "models": {},
    }
    for item in a.model:
        name, _, spec = item.partition("=")
        t0 = time.perf_counter()
        model = load(spec)
        scores = evaluate(model, qa, pools, distractors, answers, questions)
        scores.update(path=spec, max_seq_length=model.max_seq_length)
        scores["seconds"] = round(time.perf_counter() - t0, 1)
        result["models"][name] = scores
        print(
            f"{name:<12} max_len {model.max_seq_length:>4}  "
            f"(a) nDCG@10 {scores['random_distractors']['ndcg@10']:.4f} "
            f"MRR@10 {scores['random_distractors']['mrr@10']:.4f}  "
            f"(b) nDCG@10 {scores['candidate_pools']['ndcg@10']:.4f} "
            f"MRR@10 {scores['candidate_pools']['mrr@10']:.4f}  {scores['seconds']:.0f}s",
            flush=True,
        )
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
