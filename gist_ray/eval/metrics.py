"""Retrieval metrics: pure functions on rankings and an end-to-end eval of an encoder on an
:class:`~gist_ray.eval.sets.EvalSet`.

Conventions (those of BEIR / pytrec_eval):
- a document is relevant when its qrels score is > 0; nDCG uses the score as a linear gain,
  `DCG@k = sum_{rank=1..k} rel / log2(rank + 1)`, normalised by the ideal DCG from the qrels;
- Recall@k = relevant found in the top k / all relevant; MRR@k = 1 / rank of the first relevant
  hit in the top k (0 if none); MAP@k = sum of precision@rank at relevant hits / all relevant;
- the mean is over the queries in `ranked` that have at least one relevant document; the others
  are skipped, never counted as zero, and their number is logged (and returned by
  `retrieval_metrics` as `skipped_queries`);
- equal scores are ordered by doc id (string order), so rankings are deterministic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gist_ray.config import EVAL_METRICS
from gist_ray.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from gist_ray.eval.sets import EvalSet
    from gist_ray.models.encoder import Encoder

log = logging.getLogger(__name__)

Ranked = dict[str, Sequence[str]]
Qrels = dict[str, dict[str, int]]


def judged_queries(ranked: Ranked, qrels: Qrels) -> tuple[list[str], list[str]]:
    """Split the ranked queries into those with a relevant document and those without."""
    kept, skipped = [], []
    for q in ranked:
        (kept if any(s > 0 for s in qrels.get(q, {}).values()) else skipped).append(q)
    return kept, skipped


def _mean(ranked: Ranked, qrels: Qrels, name: str, per_query: Callable, warn: bool) -> float:
    kept, skipped = judged_queries(ranked, qrels)
    if skipped and warn:
        log.warning(
            "%s: skipped %d of %d queries with no relevant document",
            name,
            len(skipped),
            len(ranked),
        )
    if not kept:
        return float("nan")  # nothing to average: NaN, never a silent 0
    return sum(per_query(list(ranked[q]), qrels[q]) for q in kept) / len(kept)


def ndcg_at_k(ranked: Ranked, qrels: Qrels, k: int, warn: bool = True) -> float:
    """Mean nDCG@k (linear gain, log2(rank + 1) discount, ideal DCG from the qrels)."""

    def one(docs: list[str], rel: dict[str, int]) -> float:
        dcg = sum(max(rel.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(docs[:k]))
        ideal = sorted((s for s in rel.values() if s > 0), reverse=True)[:k]
        return dcg / sum(s / math.log2(i + 2) for i, s in enumerate(ideal))

    return _mean(ranked, qrels, f"ndcg@{k}", one, warn)


def recall_at_k(ranked: Ranked, qrels: Qrels, k: int, warn: bool = True) -> float:
    """Mean Recall@k: share of each query's relevant documents found in its top k."""

    def one(docs: list[str], rel: dict[str, int]) -> float:
        relevant = {d for d, s in rel.items() if s > 0}
        return len(relevant.intersection(docs[:k])) / len(relevant)

    return _mean(ranked, qrels, f"recall@{k}", one, warn)


def mrr_at_k(ranked: Ranked, qrels: Qrels, k: int, warn: bool = True) -> float:
    """Mean reciprocal rank of the first relevant document within the top k (0 if none)."""

    def one(docs: list[str], rel: dict[str, int]) -> float:
        return next((1 / (i + 1) for i, d in enumerate(docs[:k]) if rel.get(d, 0) > 0), 0.0)

    return _mean(ranked, qrels, f"mrr@{k}", one, warn)


def map_at_k(ranked: Ranked, qrels: Qrels, k: int, warn: bool = True) -> float:
    """Mean average precision@k, divided by all relevant documents (TREC map_cut)."""

    def one(docs: list[str], rel: dict[str, int]) -> float:
        hits, total = 0, 0.0
        for i, d in enumerate(docs[:k]):
            if rel.get(d, 0) > 0:
                hits += 1
                total += hits / (i + 1)
        return total / sum(1 for s in rel.values() if s > 0)

    return _mean(ranked, qrels, f"map@{k}", one, warn)


METRICS = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k, "map": map_at_k}
K_VALUES = (1, 10, 100)
REPORTED = EVAL_METRICS  # the metrics gist-ray reports, selects the best step by and plots


def encode_all(
    encode_fn: Callable[[list[str]], torch.Tensor],
    texts: list[str],
    batch_size: int = 64,
    desc: str = "",
    show_progress: bool = False,
) -> torch.Tensor:
    """Encode in batches; returns L2-normalised float32 CPU embeddings [n, d]."""
    if not texts:
        raise DataError(f"nothing to encode{f' ({desc})' if desc else ''}: no texts")
    # Batches of similar length pad less: encode in length order, then restore the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(texts), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    out = []
    with torch.inference_mode():
        for i in starts:
            emb = encode_fn([texts[j] for j in order[i : i + batch_size]])
            out.append(emb.detach().float().cpu())
    cat = torch.cat(out)
    emb = torch.empty_like(cat)
    emb[torch.tensor(order)] = cat
    # normalise again: cheap, and a caller that forgot would otherwise get dot products
    return F.normalize(emb, dim=-1)


def rank(
    query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_ids: list[str], k: int, chunk: int = 0
) -> list[list[str]]:
    """Top-k doc ids per query by cosine; ties go to the smaller doc id.

    `doc_ids` must be sorted: a stable descending sort then keeps equal scores in id order.
    Queries are scored in chunks so memory stays at `chunk * n_docs` floats.
    """
    n_docs = doc_emb.shape[0]
    chunk = chunk or max(1, (1 << 22) // max(n_docs, 1))
    k = min(k, n_docs)
    out = []
    for i in range(0, query_emb.shape[0], chunk):
        scores = query_emb[i : i + chunk] @ doc_emb.T
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        out.extend([doc_ids[j] for j in row] for row in order.tolist())
    return out


def retrieval_metrics(
    encode_fn: Callable[[list[str]], torch.Tensor],
    evalset: EvalSet,
    k_values: Sequence[int] = K_VALUES,
    batch_size: int = 64,
    show_progress: bool = False,
    encode_query_fn: Callable[[list[str]], torch.Tensor] | None = None,
    dims: Sequence[int] = (),
) -> dict[str, float]:
    """Encode corpus and queries, rank by cosine, and return metrics at every k.

    `encode_fn` embeds the documents, and the queries unless `encode_query_fn` is given (models
    with a query prompt). Both run under `torch.inference_mode()`; put the model in eval mode.

    Keys: `ndcg@k`, `recall@k`, `mrr@k`, `map@k` for each k in `k_values` (with the defaults this
    includes ndcg@10, recall@1/10/100, mrr@10, map@100), `num_queries` (evaluated) and
    `skipped_queries` (no relevant document; not averaged in). For each Matryoshka width `w`
    in `dims` also `dim_<w>/<metric>@k`: the same embeddings truncated to their first `w`
    dimensions and re-normalised.
    """
    if not evalset.queries or not evalset.corpus:
        raise DataError(
            f"eval set {evalset.name or ''} is empty: no queries or no documents".strip()
        )
    doc_ids = sorted(evalset.corpus)
    qids = list(evalset.queries)
    docs = encode_all(
        encode_fn, [evalset.corpus[d] for d in doc_ids], batch_size, "corpus", show_progress
    )
    queries = encode_all(
        encode_query_fn or encode_fn,
        [evalset.queries[q] for q in qids],
        batch_size,
        "queries",
        show_progress,
    )
    result = _score(queries, docs, doc_ids, qids, evalset, k_values, warn=True)
    for w in dims:  # Matryoshka: the same embeddings, truncated and re-normalised
        if not 0 < w <= docs.shape[1]:
            raise ConfigError(f"Matryoshka width {w} is not in 1..{docs.shape[1]} (the model's)")
        part = _score(F.normalize(queries[:, :w], dim=-1), F.normalize(docs[:, :w], dim=-1),
                      doc_ids, qids, evalset, k_values, warn=False)  # fmt: skip
        result.update({f"dim_{w}/{k}": v for k, v in part.items() if "@" in k})
    return result


def _score(
    queries: torch.Tensor,
    docs: torch.Tensor,
    doc_ids: list[str],
    qids: list[str],
    evalset: EvalSet,
    k_values: Sequence[int],
    warn: bool,
) -> dict[str, float]:
    ranked = dict(zip(qids, rank(queries, docs, doc_ids, max(k_values))))
    kept, skipped = judged_queries(ranked, evalset.qrels)
    if skipped and warn:
        log.warning(
            "eval %s: skipped %d of %d queries with no relevant document",
            evalset.name,
            len(skipped),
            len(qids),
        )
    result = {
        f"{name}@{k}": fn(ranked, evalset.qrels, k, warn=False)
        for name, fn in METRICS.items()
        for k in k_values
    }
    result.update(num_queries=len(kept), skipped_queries=len(skipped))
    return result


def evaluate_model(model: Encoder, evalset: EvalSet, dims: Sequence[int] = ()) -> dict[str, float]:
    """Retrieval metrics of a model (an Encoder) at its own settings: its max length,
    ``encode_query`` for queries and ``encode_document`` for documents (its own prompts); also
    at each Matryoshka width of ``dims``."""
    encode_query, encode_document = model.retrieval_encoders()
    return retrieval_metrics(encode_document, evalset, encode_query_fn=encode_query, dims=dims)
