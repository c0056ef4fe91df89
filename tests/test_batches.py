"""Global batches: a pure function of the step, no text twice in a global batch, one dataset per
batch with proportional or round-robin sampling, every worker slicing the same global batch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from gist_ray.core.errors import ConfigError, DataError
from gist_ray.data.batches import GlobalBatches, ListSource, Permutation, duplicates, text_ids
from tests.conftest import make_sentences


def _faq(n: int, seed: int) -> list[list[str]]:
    """FAQ-like rows: every question has two answers (two rows), negatives come from a small
    shared pool, so an unconstrained batch repeats texts across rows and columns."""
    questions = make_sentences(n // 2, seed)
    answers = make_sentences(n, seed + 1)
    pool = make_sentences(60, seed + 2)
    rng = np.random.default_rng(seed)
    anchor = [q for q in questions for _ in range(2)]
    return [anchor, answers, [pool[i] for i in rng.integers(0, len(pool), n)]]


def _batches(texts, batch=16, **kw) -> GlobalBatches:
    names = kw.pop("names", [f"d{i}" for i in range(len(texts))])
    sources = [ListSource(n, cols) for n, cols in zip(names, texts)]
    return GlobalBatches(sources, batch, seed=kw.pop("seed", 7), **kw)


def _dups(gb: GlobalBatches, texts, epoch: int = 0) -> list[int]:
    ids = [text_ids(cols) for cols in texts]
    return [duplicates(ids[b.dataset][list(b.rows)]) for b in gb.plan(epoch)]


def test_a_pure_function_of_the_step():
    texts = [_faq(96, 1)]
    a, b = _batches(texts), _batches(texts)
    steps = range(3 * a.steps_per_epoch)
    assert [a.batch(s) for s in steps] == [b.batch(s) for s in reversed(steps)][::-1]
    assert a.plan(0) != a.plan(1), "each epoch is reshuffled"
    assert a.batch(a.steps_per_epoch) == b.plan(1)[0]


def test_no_text_twice_in_a_global_batch():
    texts = [_faq(96, 1)]
    plain = _batches(texts, no_duplicates=False)
    assert sum(_dups(plain, texts)) > 0, "the data must have duplicates for the test to mean it"
    nodup = _batches(texts)
    assert nodup.steps_per_epoch == plain.steps_per_epoch == 96 // 16
    for epoch in range(3):
        assert _dups(nodup, texts, epoch) == [0] * nodup.steps_per_epoch


def test_distinct_texts_every_row_once_per_epoch():
    """Rows are swapped only when they repeat a text; with no repeated texts an epoch is a
    permutation of the rows."""
    texts = [[make_sentences(64, 1), [f"answer {i}" for i in range(64)]]]
    gb = _batches(texts)
    rows = [r for b in gb.plan(0) for r in b.rows]
    assert sorted(rows) == list(range(64))
    assert rows != [r for b in gb.plan(1) for r in b.rows]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection_fixed_by_its_key(n):
    perm = Permutation(n, 7, 0, 0)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    np.testing.assert_array_equal(perm, Permutation(n, 7, 0, 0)(np.arange(n)))
    if n > 5:
        assert not np.array_equal(perm, Permutation(n, 7, 1, 0)(np.arange(n)))
        assert not np.array_equal(perm, np.arange(n)), "a shuffled order"


def test_a_step_costs_the_batch_not_the_dataset():
    """100 million rows: the rows of any step come from the batch alone (no index of every
    row), each step's rows are distinct and in range."""

    class Huge:
        name, rows = "huge", 100_000_000

        def texts_at(self, rows):
            return [[f"q{r}" for r in rows], [f"a{r}" for r in rows]]

    gb = GlobalBatches([Huge()], 4096, seed=3)
    assert gb.steps_per_epoch == 100_000_000 // 4096
    for step in (0, 1, gb.steps_per_epoch - 1, gb.steps_per_epoch):
        rows = gb.batch(step).rows
        assert len(set(rows)) == 4096 and 0 <= min(rows) and max(rows) < 100_000_000
    assert gb.batch(0).rows != gb.batch(gb.steps_per_epoch).rows, "epoch 1 is reshuffled"


def test_workers_slice_the_same_global_batch():
    texts = [_faq(96, 1)]
    gb = _batches(texts)
    for step in range(4):
        parts = [gb.local(step, r, 4) for r in range(4)]
        assert {d for d, _ in parts} == {gb.batch(step).dataset}
        assert sum((rows for _, rows in parts), []) == list(gb.batch(step).rows)


def test_proportional_sampling_one_dataset_per_batch():
    texts = [_faq(96, 1), _faq(32, 5)]
    gb = _batches(texts)
    plan = gb.plan(0)
    assert Counter(b.dataset for b in plan) == {0: 6, 1: 2}
    assert gb.steps_per_epoch == 8
    for b in plan:  # rows index into their own dataset
        assert max(b.rows) < len(texts[b.dataset][0])
    assert _dups(gb, texts) == [0] * 8
    orders = {tuple(b.dataset for b in gb.plan(e)) for e in range(6)}
    assert len(orders) > 1, "the dataset order is shuffled per epoch"


def test_round_robin_alternates_until_the_smallest_runs_out():
    texts = [_faq(96, 1), _faq(32, 5)]
    gb = _batches(texts, sampling="round_robin")
    assert [b.dataset for b in gb.plan(0)] == [0, 1, 0, 1]
    assert gb.steps_per_epoch == 4


def test_fewer_unique_texts_than_the_batch_is_one_line_error():
    few = [["same question"] * 40, [f"answer {i % 5}" for i in range(40)]]
    with pytest.raises(DataError) as e:
        _batches([few], batch=16, names=["faq"])
    msg = str(e.value)
    assert "dataset 'faq': cannot fill the global batch of epoch 0" in msg
    assert "train.batch_size = 16" in msg and "found 1 after" in msg
    assert "data.no_duplicates=false" in msg and "\n" not in msg
    _batches([few], batch=16, no_duplicates=False)  # allowed when asked


def test_batches_that_cannot_be_filled_without_repeats_are_an_error():
    # 40 distinct anchors but one shared positive: no two rows fit in one batch.
    rows = [make_sentences(40, 3), ["the one answer"] * 40]
    with pytest.raises(DataError, match="cannot fill the global batch of epoch 0 with"):
        _batches([rows], batch=8, names=["shared"])


def test_batch_larger_than_a_dataset():
    with pytest.raises(ConfigError, match="larger than the dataset 'small' \\(10 rows\\)"):
        _batches([_faq(96, 1), _faq(10, 2)], batch=16, names=["big", "small"])


def test_builtin_data_duplicate_rate_without_the_guarantee():
    """The built-in InsuranceQA rows repeat texts (questions with several answers): without the
    guarantee a global batch of 256 holds duplicates, with it none."""
    from gist_ray.data import insuranceqa

    rows = insuranceqa.train_rows(42, 4096)
    texts = [[rows["anchor"], rows["positive"], rows["negative_1"]]]
    assert sum(_dups(_batches(texts, 256, no_duplicates=False), texts)) > 0
    assert sum(_dups(_batches(texts, 256), texts)) == 0
