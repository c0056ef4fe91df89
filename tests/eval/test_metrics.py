"""Retrieval metrics against hand-computed cases, and an end-to-end eval on a hashing encoder."""

import logging
import math
import zlib

import pytest
import torch

from gist_ray.core.errors import ConfigError, DataError
from gist_ray.eval.metrics import (
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    rank,
    recall_at_k,
    retrieval_metrics,
)
from gist_ray.eval.sets import EvalSet

L3, L5 = math.log2(3), math.log2(5)

# q1: relevant at ranks 2 and 4 (binary); q2: graded; q3: no relevant document (skipped)
RANKED = {"q1": ["d1", "d2", "d3", "d4"], "q2": ["a", "b"], "q3": ["d1", "d2"]}
QRELS = {"q1": {"d2": 1, "d4": 1}, "q2": {"a": 2, "b": 1, "c": 3}, "q3": {"d1": 0}}


def test_ndcg_binary_and_graded():
    q1 = (1 / L3 + 1 / L5) / (1 + 1 / L3)
    q2 = (2 + 1 / L3) / (3 + 2 / L3)  # ideal order from the qrels: c(3), a(2)
    assert ndcg_at_k({"q1": RANKED["q1"]}, QRELS, 4) == pytest.approx(q1)
    assert ndcg_at_k({"q2": RANKED["q2"]}, QRELS, 2) == pytest.approx(q2)
    assert ndcg_at_k(RANKED, QRELS, 10) == pytest.approx(
        (q1 + (2 + 1 / L3) / (3 + 2 / L3 + 1 / 2)) / 2
    )


def test_recall_mrr_map_several_relevant():
    one = {"q1": RANKED["q1"]}
    assert recall_at_k(one, QRELS, 1) == 0.0
    assert recall_at_k(one, QRELS, 2) == 0.5
    assert recall_at_k(one, QRELS, 4) == 1.0
    assert mrr_at_k(one, QRELS, 1) == 0.0
    assert mrr_at_k(one, QRELS, 4) == 0.5
    assert map_at_k(one, QRELS, 4) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert map_at_k(one, QRELS, 2) == pytest.approx((1 / 2) / 2)  # divided by all relevant
    # q2 has 3 relevant docs, 2 of them ranked
    assert recall_at_k({"q2": ["a", "b"]}, QRELS, 10) == pytest.approx(2 / 3)
    assert map_at_k({"q2": ["a", "b"]}, QRELS, 10) == pytest.approx((1 + 1) / 3)


def test_queries_without_relevant_docs_are_skipped_and_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="gist_ray.eval.metrics"):
        both = recall_at_k(RANKED, QRELS, 4)
    assert both == pytest.approx((1.0 + 2 / 3) / 2)  # q3 is not averaged in as a zero
    assert "skipped 1 of 3 queries" in caplog.text
    assert math.isnan(mrr_at_k({"q3": ["d1"]}, QRELS, 10))  # nothing judged: NaN, not 0


def test_rank_breaks_ties_by_doc_id_and_chunks_agree():
    docs = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [1, 1.0]]))
    ids = ["a", "b", "c", "d"]  # a and c are identical: c must follow a
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    out = rank(q, docs, ids, k=4)
    assert out[0] == ["a", "c", "d", "b"]
    assert out[1] == ["b", "d", "a", "c"]
    assert rank(q, docs, ids, k=2, chunk=1) == [r[:2] for r in out]


def hashing_encoder(calls=None, dim=128):
    """Bag-of-words hashing embedding: texts sharing words are close."""

    def encode(texts):
        if calls is not None:
            calls.append(len(texts))
        out = torch.zeros(len(texts), dim)
        for i, t in enumerate(texts):
            for w in t.lower().replace("?", "").replace(".", "").split():
                out[i, zlib.crc32(w.encode()) % dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)

    return encode


def test_retrieval_metrics_end_to_end():
    corpus = {
        "d1": "cats purr and sleep all day",
        "d2": "the stock market fell sharply",
        "d3": "guitars have six strings",
        "d4": "rain falls in autumn",
        "d5": "a kitten is a young cat that purr",
    }
    queries = {
        "q1": "why do cats purr",
        "q2": "stock market news",
        "q3": "how many strings on guitars",
        "q4": "unjudged question",
    }
    qrels = {"q1": {"d1": 1, "d5": 1}, "q2": {"d2": 1}, "q3": {"d3": 2}, "q4": {}}
    calls = []
    m = retrieval_metrics(
        hashing_encoder(calls), EvalSet(queries, corpus, qrels), k_values=(1, 10, 100), batch_size=2
    )
    assert max(calls) <= 2 and sum(calls) == 9
    assert m["num_queries"] == 3 and m["skipped_queries"] == 1
    for key in ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "map@100"):
        assert key in m
    assert m["recall@10"] == 1.0 and m["recall@100"] == 1.0 and m["mrr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1.0)
    assert m["recall@1"] == pytest.approx((0.5 + 1 + 1) / 3)  # q1 has two relevant docs


def test_retrieval_metrics_matches_pure_functions():
    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(30)]

    def text():
        return " ".join(words[j] for j in torch.randint(0, 30, (6,), generator=gen).tolist())

    corpus = {f"d{i:02d}": text() for i in range(40)}
    queries = {f"q{i}": text() for i in range(12)}
    qrels = {
        q: {f"d{(3 * i) % 40:02d}": 1, f"d{(7 * i + 1) % 40:02d}": 2} for i, q in enumerate(queries)
    }
    enc = hashing_encoder()
    m = retrieval_metrics(enc, EvalSet(queries, corpus, qrels), k_values=(5,), batch_size=7)
    ids = sorted(corpus)
    ranked = dict(
        zip(queries, rank(enc(list(queries.values())), enc([corpus[d] for d in ids]), ids, 5))
    )
    assert m["ndcg@5"] == pytest.approx(ndcg_at_k(ranked, qrels, 5))
    assert m["map@5"] == pytest.approx(map_at_k(ranked, qrels, 5))


def test_empty_eval_set_is_an_error():
    with pytest.raises(DataError, match="empty"):
        retrieval_metrics(hashing_encoder(), EvalSet({}, {"d": "x"}, {}, name="tiny"))


def test_matryoshka_widths_rank_the_truncated_embeddings():
    """``dims``: metrics of the same embeddings truncated to each width and re-normalised, equal
    to evaluating an encoder that truncates itself; the full width is unchanged."""
    gen = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(40)]

    def text():
        return " ".join(words[j] for j in torch.randint(0, 40, (5,), generator=gen).tolist())

    corpus = {f"d{i:02d}": text() for i in range(30)}
    queries = {f"q{i}": text() for i in range(10)}
    qrels = {q: {f"d{(3 * i) % 30:02d}": 1} for i, q in enumerate(queries)}
    evalset = EvalSet(queries, corpus, qrels)
    enc = hashing_encoder(dim=64)
    m = retrieval_metrics(enc, evalset, k_values=(10,), dims=[32, 8])
    assert m["ndcg@10"] == retrieval_metrics(enc, evalset, k_values=(10,))["ndcg@10"]
    for w in (32, 8):
        cut = retrieval_metrics(lambda t, w=w: enc(t)[:, :w], evalset, k_values=(10,))
        assert m[f"dim_{w}/ndcg@10"] == pytest.approx(cut["ndcg@10"])
        assert m[f"dim_{w}/recall@10"] == pytest.approx(cut["recall@10"])
    assert m["dim_8/ndcg@10"] != m["ndcg@10"]  # a real truncation, not the full embeddings
    with pytest.raises(ConfigError, match="Matryoshka width 128 is not in 1..64"):
        retrieval_metrics(enc, evalset, dims=[128])
