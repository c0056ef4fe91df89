"""The built-in InsuranceQA data (package ``insuranceqa-data==1.0``, loaded offline): training
pairs for ``data.train: insuranceqa`` and the held-out retrieval sets for ``eval.source``.

Questions have ids, English texts, positive answer ids and a pool of 200 candidate answer ids;
answers come from a shared pool of 27,413. Texts are whitespace-normalised (the package has
doubled and non-breaking spaces).
"""

from __future__ import annotations

import functools
import random

from gist_ray.core.errors import DataError

NAME = "insuranceqa"

Question = tuple[str, tuple[str, ...], tuple[str, ...]]  # text, positive ids, candidate ids


def _norm(s: str) -> str:
    return " ".join(s.split())


def _package():
    try:
        import insuranceqa_data
    except ImportError as e:
        raise DataError(
            f"built-in source '{NAME}' needs the package insuranceqa-data==1.0 "
            "(pip install insuranceqa-data==1.0)"
        ) from e
    return insuranceqa_data


@functools.cache
def questions(split: str) -> dict[str, Question]:
    """Question id -> (question, positive answer ids, candidate ids) of a split (cached)."""
    iqa = _package()
    data = {"train": iqa.load_train, "test": iqa.load_test, "valid": iqa.load_valid}[split]()
    return {
        q: (_norm(v["en"]), tuple(v["answers"]), tuple(v["negatives"])) for q, v in data.items()
    }


@functools.cache
def answers() -> dict[str, str]:
    """Answer id -> text, the whole pool."""
    return {a: _norm(v["en"]) for a, v in _package().load_answers().items()}


def train_rows(seed: int, max_examples: int | None) -> dict[str, list[str]]:
    """One row per (question, positive answer) of the train split; ``negative_1`` is one of the
    question's candidate answers (not a positive), drawn with ``seed``. Rows are shuffled after
    the negatives are drawn, so a row's content does not depend on ``max_examples``."""
    qs, pool_texts = questions("train"), answers()
    rng = random.Random(seed)
    rows = []
    for qid in sorted(qs, key=int):
        text, positives, candidates = qs[qid]
        pool = [a for a in candidates if a not in positives]
        rows.extend((text, pool_texts[a], pool_texts[rng.choice(pool)]) for a in positives)
    rng.shuffle(rows)
    anchor, positive, negative = (list(c) for c in zip(*rows[:max_examples]))
    return {"anchor": anchor, "positive": positive, "negative_1": negative}


def eval_split(split: str):
    """(queries, corpus, qrels, pool) of a held-out split; ``pool(qids)`` is the union of those
    queries' candidate answers (distractors that are hard, yet cheap to encode)."""
    split = "valid" if split == "validation" else split
    if split not in ("test", "valid"):
        raise DataError(f"built-in '{NAME}' eval split {split!r} is not one of: test, valid")
    data = questions(split)
    queries = {q: v[0] for q, v in data.items()}
    qrels = {q: dict.fromkeys(v[1], 1) for q, v in data.items()}

    def pool(qids: list[str]) -> set[str]:
        return {a for q in qids for a in data[q][2]}

    return queries, dict(answers()), qrels, pool
