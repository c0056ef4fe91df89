"""The mining core against plain references: chunked top-k vs the full score matrix, faiss vs
torch, and the positive-aware rules vs a row-by-row loop over every corpus text."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gist_ray.mining.search import Searcher, chunked_top_k, faiss_available
from gist_ray.mining.select import Rule, limits, mine_negatives


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g), dim=-1)


def _problem(rows=40, n=300, dim=16, seed=0, positives=2):
    """Anchors, a corpus, and per row its positives (corpus ids) placed near the anchor."""
    anchors, corpus = _unit(rows, dim, seed), _unit(n, dim, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    excluded = [torch.randperm(n, generator=g)[:positives].tolist() for _ in range(rows)]
    for r, ids in enumerate(excluded):  # positives close to their anchor, as in real data
        corpus[ids] = F.normalize(anchors[r] + 0.3 * corpus[ids], dim=-1)
    pos = torch.stack([(corpus[ids] @ anchors[r]).min() for r, ids in enumerate(excluded)])
    return anchors, corpus, excluded, pos


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_top_k_equals_full_matrix_top_k(chunk):
    q, c = _unit(33, 24, 0), _unit(257, 24, 1)
    want_s, want_i = torch.topk(q @ c.T, 20, dim=1)
    got_s, got_i = chunked_top_k(q, c, 20, corpus_chunk=chunk)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s)


def test_chunked_top_k_k_larger_than_a_chunk_and_the_corpus():
    q, c = _unit(5, 8, 2), _unit(10, 8, 3)
    s, i = Searcher(c, "torch", corpus_chunk=3).top_k(q, 50)
    assert i.shape == (5, 10) and all(sorted(r) == list(range(10)) for r in i.tolist())
    assert torch.all(s[:, :-1] >= s[:, 1:])


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed (extra [mine])")
def test_faiss_and_torch_give_the_same_negatives():
    anchors, corpus, excluded, pos = _problem(rows=60, n=500, seed=4)
    s1, i1 = Searcher(corpus, "torch", corpus_chunk=64).top_k(anchors, 40)
    s2, i2 = Searcher(corpus, "faiss").top_k(anchors, 40)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=0)
    for rule in (Rule(k=5), Rule(k=5, threshold="margin", margin=0.05, range_min=3)):
        a = mine_negatives(anchors, Searcher(corpus, "torch", 50), excluded, pos, rule)
        b = mine_negatives(anchors, Searcher(corpus, "faiss"), excluded, pos, rule)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.found, b.found)


def reference(anchors, corpus, excluded, pos, rule: Rule):
    """Row by row over the full score matrix, the rule written out plainly."""
    out = []
    for r in range(anchors.shape[0]):
        scores = (corpus @ anchors[r]).tolist()
        p = float(pos[r])
        if rule.threshold == "perc_pos":
            limit = p - (1 - rule.perc) * abs(p)
        elif rule.threshold == "margin":
            limit = p - rule.margin
        else:
            limit = math.inf
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        allowed = [i for i in ranked if i not in excluded[r]]
        survivors = [i for i in allowed if scores[i] < limit]
        chosen = survivors[rule.range_min : rule.range_min + rule.k]
        if len(chosen) < rule.k and rule.fill:
            rest = [i for i in allowed if i not in chosen]  # all above the chosen ones
            extra = sorted(rest, key=lambda i: scores[i])[: rule.k - len(chosen)]
            chosen = (
                sorted(chosen + extra, key=lambda i: -scores[i])
                if len(extra) == (rule.k - len(chosen))
                else chosen
            )
        out.append(chosen)
    return out


RULES = [
    Rule(k=5),
    Rule(k=5, perc=0.8),
    Rule(k=3, threshold="margin", margin=0.1),
    Rule(k=4, threshold="none", range_min=6),
    Rule(k=6, perc=0.9, range_min=2),
    Rule(k=8, perc=0.5, range_min=4, fill=True),  # strict: many rows short, filled
    Rule(k=8, threshold="margin", margin=0.6),  # strict: short rows left short
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.threshold}-{r.k}-{r.range_min}")
def test_rules_match_the_reference(rule):
    anchors, corpus, excluded, pos = _problem(rows=50, n=120, seed=7)
    got = mine_negatives(anchors, Searcher(corpus, "torch", corpus_chunk=32), excluded, pos, rule)
    want = reference(anchors, corpus, excluded, pos, rule)
    for r, ids in enumerate(want):
        assert got.ids[r][got.ids[r] >= 0].tolist() == ids, f"row {r}"
        assert int(got.found[r] + got.filled[r]) == len(ids)
    if rule.threshold != "none":  # a passing negative scores below the row's limit
        lim = limits(pos, rule)
        for r in range(len(want)):
            found = got.scores[r, : int(got.found[r])]
            if not rule.fill:
                assert torch.all(found < lim[r])


def test_a_small_candidate_budget_gives_the_same_negatives():
    anchors, corpus, excluded, pos = _problem(rows=50, n=120, seed=7)
    rule = Rule(k=8, perc=0.5, range_min=4, fill=True)  # deep searches for short rows
    a = mine_negatives(anchors, Searcher(corpus), excluded, pos, rule)
    b = mine_negatives(anchors, Searcher(corpus), excluded, pos, rule, max_candidates=100)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.filled, b.filled)


def test_strict_rules_really_leave_rows_short_or_filled():
    anchors, corpus, excluded, pos = _problem(rows=50, n=120, seed=7)
    strict = Rule(k=8, perc=0.5, range_min=4)
    short = mine_negatives(anchors, Searcher(corpus), excluded, pos, strict)
    filled = mine_negatives(
        anchors, Searcher(corpus), excluded, pos, Rule(**{**strict.__dict__, "fill": True})
    )
    assert (short.found < 8).any() and (filled.filled > 0).any()
    assert torch.equal(short.found, filled.found)


def test_positives_and_the_anchor_text_are_never_negatives():
    anchors, corpus, excluded, pos = _problem(rows=30, n=60, seed=9, positives=3)
    for rule in (Rule(k=10, threshold="none"), Rule(k=10, perc=0.3, fill=True)):
        got = mine_negatives(anchors, Searcher(corpus, corpus_chunk=7), excluded, pos, rule)
        for r, ids in enumerate(got.ids.tolist()):
            assert not set(ids) & set(excluded[r])
            assert len({i for i in ids if i >= 0}) == len([i for i in ids if i >= 0])
