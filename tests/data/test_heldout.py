"""split_by_anchor: held-out anchors with all their rows, none in both halves, seeded."""

from __future__ import annotations

import pytest

from gist_ray.data.heldout import MIN_ANCHORS, split_by_anchor


def _anchors(n: int, repeats: int = 3) -> list[str]:
    """n distinct anchors, each on ``repeats`` rows (spaced apart, whitespace varied)."""
    return [
        f"question  {i}" if r % 2 else f"question {i}" for r in range(repeats) for i in range(n)
    ]


def test_no_anchor_in_both_halves_and_every_row_placed_once():
    anchors = _anchors(50)
    split = split_by_anchor(anchors, 0.1, seed=3)
    norm = [" ".join(a.split()) for a in anchors]
    held = {norm[i] for i in split.eval_rows}
    trained = {norm[i] for i in split.train_rows}
    assert len(held) == split.eval_anchors == 5 and split.anchors == 50
    assert not held & trained  # "question  7" and "question 7" are one anchor
    assert sorted(split.eval_rows + split.train_rows) == list(range(len(anchors)))
    assert len(split.eval_rows) == 15  # every row of each held-out anchor


def test_the_split_is_a_function_of_the_data_and_the_seed():
    anchors = _anchors(200, repeats=1)
    one, again = split_by_anchor(anchors, 0.2, seed=7), split_by_anchor(anchors, 0.2, seed=7)
    assert one.eval_rows == again.eval_rows and len(one.eval_rows) == 40
    assert split_by_anchor(anchors, 0.2, seed=8).eval_rows != one.eval_rows


def test_small_data_and_caps():
    assert split_by_anchor(_anchors(MIN_ANCHORS - 1), 0.1).eval_rows == []
    assert "19 distinct anchors" in split_by_anchor(_anchors(19), 0.1).skipped
    assert split_by_anchor(_anchors(MIN_ANCHORS), 0.01).eval_anchors == 1  # at least one
    assert split_by_anchor(_anchors(30_000, repeats=1), 0.5).eval_anchors == 1000  # at most
    off = split_by_anchor(_anchors(50), 0.0)
    assert off.eval_rows == [] and len(off.train_rows) == 150
    with pytest.raises(ValueError):
        split_by_anchor(_anchors(50), 0.9)
