"""Which rows make up each global batch: a pure function of the step, so a resumed run (or a
restarted worker) sees exactly the batches the interrupted one would have.

Nothing here grows with the dataset: every worker computes the rows of a step from
``(train.seed, epoch, step)`` in O(batch) time and memory.

- The rows of a dataset are visited in the order of a keyed pseudo-random permutation of
  ``[0, rows)`` (:class:`Permutation`, a Feistel network with cycle-walking): the row at any
  position is computed on its own, so there is no index of every row (``randperm`` of 10^8 rows
  is 800 MB per worker). Global batch ``j`` of a dataset is positions ``[j*b, (j+1)*b)``.
- Every global batch comes from one dataset, so its in-batch negatives stay in-domain; with
  several datasets the batches are interleaved ``proportional`` to their sizes (a permutation of
  the epoch's batch slots, shuffled per epoch) or ``round_robin`` (until the smallest runs out),
  as sentence-transformers' multi-dataset samplers do.
- With ``data.no_duplicates`` no text appears twice in one *global* batch across the anchor,
  positive and negative columns (the guarantee of sentence-transformers'
  ``NoDuplicatesBatchSampler``, applied to the global batch rather than one device's): a repeated
  positive is a false negative the guide cannot mask. As sentence-transformers does, a row that
  repeats a text of the batch being filled waits for a later batch, but only within a window of
  ``WINDOW`` batches (their texts are read once per window), not the whole epoch, whose order
  would have to be held in memory; a batch the window cannot fill is topped up with random rows
  (keyed by the seed, epoch and batch) that repeat nothing, so a few rows are seen twice in an
  epoch and as many not at all (with no repeated texts an epoch is an exact permutation).

Each worker takes its contiguous slice of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gist_ray.config import Config
from gist_ray.core.errors import ConfigError, DataError

ORDER_STREAM = 1 << 20  # the key of the dataset order (datasets use 0, 1, ...)
SWAP_STREAM = 1 << 21  # the key of a batch's replacement rows
ROUNDS = 6  # Feistel rounds: enough for a well-mixed order, cheap to evaluate
MAX_DRAWS_PER_ROW = 64  # replacement rows tried per batch row before giving up
WINDOW = 8  # no-duplicates planning looks this many batches ahead: O(WINDOW x batch) per worker
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class RowSource(Protocol):
    """What batch planning reads of a dataset (``gist_ray.data.training.TrainingSet`` is one)."""

    name: str
    rows: int

    def texts_at(self, rows: Sequence[int]) -> list[list[str]]: ...


@dataclass
class ListSource:
    """In-memory columns as a :class:`RowSource` (tests and benchmarks)."""

    name: str
    columns: list[list[str]]

    @property
    def rows(self) -> int:
        return len(self.columns[0])

    def texts_at(self, rows: Sequence[int]) -> list[list[str]]:
        return [[col[i] for i in rows] for col in self.columns]


@dataclass(frozen=True)
class Batch:
    """One global batch: the dataset it comes from and its rows, in order."""

    dataset: int
    rows: tuple[int, ...]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    h = np.uint64(0)
    for p in parts:
        h = _mix(np.asarray(h ^ np.uint64(p % 2**64)))[()]
    return np.uint64(h)


class Permutation:
    """A keyed pseudo-random permutation of ``[0, n)`` in O(1) memory: a balanced Feistel
    network on the smallest even bit width covering ``n`` (a bijection of ``[0, 2^bits)``),
    cycle-walked into ``[0, n)`` (re-applied while the value falls outside; ``2^bits < 4n``, so
    under four rounds on average)."""

    def __init__(self, n: int, *key: int) -> None:
        bits = max(2, (max(n, 2) - 1).bit_length())
        bits += bits % 2
        self.n, self.half = n, np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [_key(*key, r) for r in range(ROUNDS)]

    def _once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """The values at ``positions`` (each in ``[0, n)``), as int64."""
        x = np.asarray(positions, dtype=np.uint64)
        x = self._once(x)
        out = x >= self.n
        while out.any():
            x[out] = self._once(x[out])
            out = x >= self.n
        return x.astype(np.int64)


def text_ids(columns: Sequence[Sequence[str]]) -> np.ndarray:
    """``[rows, columns]`` integer ids, equal ids for equal texts (across columns)."""
    index: dict[str, int] = {}
    ids = [[index.setdefault(t, len(index)) for t in col] for col in columns]
    return np.asarray(ids, dtype=np.int64).T.reshape(len(columns[0]), len(columns))


def duplicates(ids: np.ndarray) -> int:
    """Texts in a batch (``[rows, columns]`` ids) that repeat an earlier text of the batch."""
    return int(ids.size - np.unique(ids).size)


@dataclass
class GlobalBatches:
    """The global batches of every epoch, each computed from the seed, epoch and step alone."""

    sources: list[RowSource]
    batch_size: int
    seed: int
    sampling: str = "proportional"
    no_duplicates: bool = True
    _last: tuple[int, Batch] | None = field(default=None, init=False, repr=False)
    _window: tuple[tuple[int, int, int], list[list[int]]] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        for s in self.sources:
            if s.rows < self.batch_size:
                raise ConfigError(
                    f"train.batch_size = {self.batch_size} is larger than the dataset "
                    f"{s.name!r} ({s.rows} rows)"
                )
        for d in range(len(self.sources)):  # a batch the data cannot fill fails now, not later
            self._rows(0, d, 0, "of epoch 0")

    @classmethod
    def for_config(cls, cfg: Config, sets: Sequence[RowSource]) -> GlobalBatches:
        """The batches of ``cfg`` over the training sets (``data.training.TrainingSet``)."""
        return cls(
            list(sets),
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.data.sampling,
            cfg.data.no_duplicates,
        )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def sizes(self) -> list[int]:
        return [s.rows for s in self.sources]

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def _per_dataset(self) -> list[int]:
        per = [rows // self.batch_size for rows in self.sizes]
        return [min(per)] * len(per) if self.sampling == "round_robin" else per

    @property
    def steps_per_epoch(self) -> int:
        return sum(self._per_dataset())

    def total_steps(self, cfg: Config) -> int:
        """``train.max_steps`` when set, else ``train.epochs`` full epochs."""
        return cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

    def _slot(self, epoch: int, pos: int) -> tuple[int, int]:
        """(dataset, its batch index) of the epoch's ``pos``-th step."""
        per = self._per_dataset()
        if self.sampling == "round_robin":
            return pos % len(per), pos // len(per)
        if len(per) > 1:  # a shuffled interleaving, proportional to the datasets' batches
            pos = int(Permutation(self.steps_per_epoch, self.seed, epoch, ORDER_STREAM)([pos])[0])
        d = int(np.searchsorted(np.cumsum(per), pos, side="right"))
        return d, pos - sum(per[:d])

    def batch(self, step: int) -> Batch:
        """The global batch of ``step`` (the latest one is kept: every worker asks once)."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        epoch, pos = divmod(step, self.steps_per_epoch)
        d, j = self._slot(epoch, pos)
        found = Batch(d, tuple(self._rows(epoch, d, j, f"of step {step}")))
        self._last = (step, found)
        return found

    def _rows(self, epoch: int, d: int, j: int, which: str) -> list[int]:
        """Rows of dataset ``d``'s ``j``-th global batch of ``epoch``."""
        b = self.batch_size
        if not self.no_duplicates:
            perm = Permutation(self.sizes[d], self.seed, epoch, d)
            return perm(np.arange(j * b, (j + 1) * b)).tolist()
        w = j // WINDOW
        if self._window is None or self._window[0] != (epoch, d, w):
            self._window = ((epoch, d, w), self._plan_window(epoch, d, w, which))
        return self._window[1][j - w * WINDOW]

    def _plan_window(self, epoch: int, d: int, w: int, which: str) -> list[list[int]]:
        """The no-duplicates batches ``[w*WINDOW, (w+1)*WINDOW)`` of dataset ``d``: their rows
        (in permutation order) are placed greedily, a row that repeats a text of the batch being
        filled waits for a later batch of the window (sentence-transformers' deferral, bounded
        to the window); a batch the window's rows cannot fill is topped up with random rows that
        repeat nothing (drawn deterministically from the seed, epoch and batch)."""
        b, source = self.batch_size, self.sources[d]
        lo, hi = w * WINDOW, min((w + 1) * WINDOW, self._per_dataset()[d])
        rows = Permutation(self.sizes[d], self.seed, epoch, d)(np.arange(lo * b, hi * b)).tolist()
        texts = list(zip(*source.texts_at(rows)))
        pending, out = list(range(len(rows))), []
        for j in range(lo, hi):
            seen: set[str] = set()
            kept: list[int] = []
            waiting: list[int] = []
            for pos, i in enumerate(pending):
                if len(kept) == b:
                    waiting.extend(pending[pos:])
                    break
                if seen.isdisjoint(texts[i]):
                    kept.append(rows[i])
                    seen.update(texts[i])
                else:
                    waiting.append(i)
            pending = waiting
            if len(kept) < b:
                self._top_up(source, kept, seen, (self.seed, epoch, d, j), which)
            out.append(kept)
        return out

    def _top_up(self, source: RowSource, kept: list[int], seen: set[str], key: tuple,
                which: str) -> None:  # fmt: skip
        """Fill ``kept`` up to the batch size with random rows that repeat no text of it."""
        taken = set(kept)
        rng = np.random.Generator(np.random.Philox(key=[int(_key(*key, SWAP_STREAM)), 0]))
        draws, limit = 0, MAX_DRAWS_PER_ROW * self.batch_size
        while len(kept) < self.batch_size and draws < limit:
            n = min(limit - draws, max(16, 2 * (self.batch_size - len(kept))))
            candidates = rng.integers(0, source.rows, n).tolist()
            for row, texts in zip(candidates, zip(*source.texts_at(candidates))):
                if len(kept) < self.batch_size and row not in taken and seen.isdisjoint(texts):
                    kept.append(row)
                    taken.add(row)
                    seen.update(texts)
            draws += n
        if len(kept) < self.batch_size:
            raise DataError(
                f"dataset {source.name!r}: cannot fill the global batch {which} with "
                f"train.batch_size = {self.batch_size} rows without repeating a text (found "
                f"{len(kept)} after {draws} random rows); lower train.batch_size or set "
                "data.no_duplicates=false"
            )

    def plan(self, epoch: int) -> list[Batch]:
        """Every global batch of ``epoch``, in step order (tests and tools; training asks
        :meth:`batch` for one step at a time)."""
        start = epoch * self.steps_per_epoch
        return [self.batch(s) for s in range(start, start + self.steps_per_epoch)]

    def local(self, step: int, rank: int, world: int) -> tuple[int, list[int]]:
        """(dataset, this worker's rows) of the global batch of ``step``."""
        batch = self.batch(step)
        b = self.batch_size // world
        return batch.dataset, list(batch.rows[rank * b : (rank + 1) * b])
