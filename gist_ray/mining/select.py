"""Which retrieved candidates become an anchor's hard negatives.

A candidate is never one of the anchor's own positives (every positive of every row with the
same anchor text) nor the anchor's own text. Of the rest, a positive-aware threshold keeps those
scoring strictly below a limit derived from the positive's guide score ``p`` (the lowest one
when an anchor has several positives, as sentence-transformers' ``mine_hard_negatives``):

- ``perc_pos`` (NV-Retriever's TopK-PercPos): ``p - (1 - perc) * |p|``, i.e. ``perc * p`` for
  a positive ``p``, the ``relative_margin = 1 - perc`` of sentence-transformers;
- ``margin``: ``p - margin``;
- ``none``: no limit.

The ``range_min`` best survivors are skipped, the next ``k`` taken, best first. A row with fewer
than ``k`` over the whole corpus is short: with ``fill`` it is completed from the candidates just
above the chosen ones (first those ``range_min`` skipped, then those the threshold rejected,
least similar first), otherwise it is left short (the caller drops it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gist_ray.mining.search import Searcher


@dataclass(frozen=True)
class Rule:
    k: int = 5
    threshold: str = "perc_pos"
    perc: float = 0.95
    margin: float = 0.0
    range_min: int = 0
    fill: bool = False


@dataclass
class Mined:
    """Per row: the negatives' corpus ids and scores, best first (-1 / nan where short), how
    many passed the rule (``found``) and how many were filled in."""

    ids: torch.Tensor  # (rows, k) long
    scores: torch.Tensor  # (rows, k) float
    found: torch.Tensor  # (rows,) long
    filled: torch.Tensor  # (rows,) long


def limits(positive_scores: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Per row, the score a negative must stay strictly below."""
    if rule.threshold == "perc_pos":
        return positive_scores - (1 - rule.perc) * positive_scores.abs()
    if rule.threshold == "margin":
        return positive_scores - rule.margin
    return torch.full_like(positive_scores, float("inf"))


def mine_negatives(
    anchors: torch.Tensor,
    searcher: Searcher,
    excluded: list[list[int]],
    positive_scores: torch.Tensor,
    rule: Rule,
    max_candidates: int = 1 << 26,
) -> Mined:
    """Mine the rows of ``anchors`` (L2-normalised guide embeddings) against the searcher's
    corpus. ``excluded[r]``: corpus ids row r may never get (its positives, its own text).

    Exact over the whole corpus: each row retrieves its top-K, K doubling (for the rows still
    short) until ``range_min + k`` candidates pass the rule or K is the corpus size. Rows are
    searched in groups of at most ``max_candidates`` candidates in all, so a deep search of
    few rows holds no more than a shallow one of many."""
    rows, k, n = anchors.shape[0], rule.k, len(searcher)
    out = Mined(
        torch.full((rows, k), -1, dtype=torch.long),
        torch.full((rows, k), float("nan")),
        torch.zeros(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.long),
    )
    limit = limits(positive_scores.float(), rule)
    width = max((len(e) for e in excluded), default=0)
    excl = torch.full((rows, max(width, 1)), -1, dtype=torch.long)
    for r, e in enumerate(excluded):
        excl[r, : len(e)] = torch.tensor(e, dtype=torch.long)
    want = rule.range_min + k
    pending = torch.arange(rows)
    top = min(n, 2 * want + width + 8)  # a first guess; short rows search again, deeper
    while len(pending):
        short = []
        for group in pending.split(max(1, max_candidates // top)):
            scores, ids = searcher.top_k(anchors[group], top)
            scores, ids = scores.cpu(), ids.cpu()
            allowed = ~(ids[:, :, None] == excl[group][:, None, :]).any(-1)
            passing = allowed & (scores < limit[group, None])
            rank = passing.cumsum(1)  # 1-based rank among the candidates that pass
            done = (rank[:, -1] >= want) | (top >= n)
            for j in torch.nonzero(done).flatten().tolist():
                _take(out, int(group[j]), scores[j], ids[j], allowed[j], passing[j], rank[j], rule)
            short.append(group[~done])
        pending = torch.cat(short)
        top = min(n, 2 * top)
    return out


def _take(out: Mined, row: int, scores, ids, allowed, passing, rank, rule: Rule) -> None:
    chosen = passing & (rank > rule.range_min) & (rank <= rule.range_min + rule.k)
    got = int(chosen.sum())
    out.found[row] = got
    out.ids[row, :got], out.scores[row, :got] = ids[chosen], scores[chosen]
    if got == rule.k or not rule.fill:
        return
    # The row saw the whole corpus: every candidate not chosen scores above the chosen ones.
    pool = torch.nonzero(allowed & ~chosen).flatten().flip(0)[: rule.k - got]  # least similar
    if len(pool) < rule.k - got:
        return  # the corpus cannot fill it: left short
    chosen_ids = torch.cat([ids[chosen], ids[pool]])
    chosen_scores = torch.cat([scores[chosen], scores[pool]])
    order = torch.sort(chosen_scores, descending=True, stable=True).indices
    out.ids[row], out.scores[row] = chosen_ids[order], chosen_scores[order]
    out.filled[row] = rule.k - got
