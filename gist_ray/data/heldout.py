"""A held-out set for the user's own data: rows split off by anchor, so no anchor text is in both
halves (a query the model trained on would flatter the eval). ``gist-ray init`` writes the
held-out rows as a BEIR eval folder and trains on the rest."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

DEFAULT_FRACTION = 0.1  # of the distinct anchors; small data keeps most of its rows for training
MIN_ANCHORS = 20  # fewer distinct anchors: too few to both train and measure; no split
MAX_QUERIES = 1000  # held-out anchors at most, however large the data (eval cost, rows kept)
MAX_FRACTION = 0.5


@dataclass
class Split:
    """Row indices of each half, and how many distinct anchors each holds. ``skipped`` says why
    nothing was held out (then every row is in ``train_rows``)."""

    train_rows: list[int]
    eval_rows: list[int] = field(default_factory=list)
    anchors: int = 0  # distinct anchors in the data
    eval_anchors: int = 0
    skipped: str = ""


def anchor_key(text: object) -> str:
    """Anchors are the same query when their words are: whitespace is not a difference."""
    return " ".join(str(text).split())


def split_by_anchor(
    anchors: Sequence[object],
    fraction: float = DEFAULT_FRACTION,
    seed: int = 0,
    max_queries: int = MAX_QUERIES,
    min_anchors: int = MIN_ANCHORS,
) -> Split:
    """Hold out ``fraction`` of the distinct anchors (at least 1, at most ``max_queries``) with
    every row of each, chosen with ``seed`` (the same data and seed give the same split)."""
    if not 0 <= fraction <= MAX_FRACTION:
        raise ValueError(f"fraction must be in [0, {MAX_FRACTION}], got {fraction}")
    keys = [anchor_key(a) for a in anchors]
    distinct = list(dict.fromkeys(keys))  # first-appearance order: deterministic
    everything = list(range(len(keys)))
    if fraction == 0:
        return Split(everything, anchors=len(distinct), skipped="--eval-fraction 0")
    if len(distinct) < min_anchors:
        return Split(
            everything,
            anchors=len(distinct),
            skipped=f"only {len(distinct)} distinct anchors (at least {min_anchors} are needed "
            "to hold some out and still train)",
        )
    n = min(max_queries, max(1, round(fraction * len(distinct))))
    held = set(random.Random(seed).sample(distinct, n))
    return Split(
        train_rows=[i for i, k in enumerate(keys) if k not in held],
        eval_rows=[i for i, k in enumerate(keys) if k in held],
        anchors=len(distinct),
        eval_anchors=n,
    )
