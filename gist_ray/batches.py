"""Which rows make up each global batch: a pure function of the step, so a resumed run (or a
restarted worker) sees exactly the batches the interrupted one would have.

Each epoch is planned from ``(train.seed, epoch)`` alone:

- every global batch comes from one dataset, so its in-batch negatives stay in-domain; with
  several datasets the batches are interleaved ``proportional`` to their sizes (shuffled) or
  ``round_robin`` (until the smallest runs out), as sentence-transformers' multi-dataset
  samplers do;
- with ``data.no_duplicates`` no text appears twice in one *global* batch across the anchor,
  positive and negative columns (sentence-transformers' ``NoDuplicatesBatchSampler``, applied to
  the global batch rather than one device's): a repeated positive would be a false negative the
  guide cannot mask (its guide similarity equals the threshold, and masking needs ``>``).

Each worker takes its contiguous slice of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gist_ray.config import Config
from gist_ray.errors import ConfigError, DataError

EXTRA_PASSES = 3  # reshuffles a no-duplicates epoch may use to fill its batches
ORDER_STREAM = 1 << 20  # the random stream of the dataset order (datasets use 0, 1, ...)


@dataclass(frozen=True)
class Batch:
    """One global batch: the dataset it comes from and its rows, in order."""

    dataset: int
    rows: tuple[int, ...]


def _generator(*key: int) -> torch.Generator:
    entropy = [k % 2**32 for k in key]  # SeedSequence takes non-negative ints
    seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def text_ids(columns: Sequence[Sequence[str]]) -> np.ndarray:
    """``[rows, columns]`` integer ids, equal ids for equal texts (across columns)."""
    index: dict[str, int] = {}
    ids = [[index.setdefault(t, len(index)) for t in col] for col in columns]
    return np.asarray(ids, dtype=np.int64).T.reshape(len(columns[0]), len(columns))


def duplicates(ids: np.ndarray) -> int:
    """Texts in a batch (``[rows, columns]`` ids) that repeat an earlier text of the batch."""
    return int(ids.size - np.unique(ids).size)


def no_duplicate_batches(
    ids: np.ndarray, batch_size: int, count: int, generator: torch.Generator
) -> list[tuple[int, ...]] | None:
    """``count`` full batches with no id twice in one batch, greedily in a shuffled order
    (conflicting rows wait for a later batch), reshuffling up to EXTRA_PASSES times when a pass
    falls short, as sentence-transformers does; None if even that cannot fill them."""
    rows_texts = ids.tolist()
    out: list[tuple[int, ...]] = []
    for _ in range(1 + EXTRA_PASSES):
        pending = torch.randperm(len(ids), generator=generator).tolist()
        while pending and len(out) < count:
            seen: set[int] = set()
            batch: list[int] = []
            waiting: list[int] = []
            for pos, row in enumerate(pending):
                texts = rows_texts[row]
                if seen.isdisjoint(texts):
                    batch.append(row)
                    seen.update(texts)
                    if len(batch) == batch_size:
                        waiting.extend(pending[pos + 1 :])
                        break
                else:
                    waiting.append(row)
            if len(batch) < batch_size:
                break  # the rest of this pass cannot fill a batch
            out.append(tuple(batch))
            pending = waiting
        if len(out) == count:
            return out
    return None


@dataclass
class GlobalBatches:
    """The global batches of every epoch, planned from the seed and the epoch only."""

    texts: list[list[list[str]]]  # per dataset: its columns' texts, in loss order
    names: list[str]
    batch_size: int
    seed: int
    sampling: str = "proportional"
    no_duplicates: bool = True
    _ids: list[np.ndarray | None] = field(default_factory=list, init=False, repr=False)
    _plan: tuple[int, list[Batch]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = [text_ids(cols) if self.no_duplicates else None for cols in self.texts]
        for name, rows in zip(self.names, self.sizes):
            if rows < self.batch_size:
                raise ConfigError(
                    f"train.batch_size = {self.batch_size} is larger than the dataset "
                    f"{name!r} ({rows} rows)"
                )
        for name, ids in zip(self.names, self._ids):
            if ids is not None and len(np.unique(ids)) < self.batch_size:
                raise DataError(
                    f"dataset {name!r} has {len(np.unique(ids))} unique texts, fewer than "
                    f"train.batch_size = {self.batch_size}: no global batch can be filled without "
                    "repeating one; lower train.batch_size or set data.no_duplicates=false"
                )
        self.plan(0)  # a batch size the data cannot fill fails now, not at the next epoch

    @classmethod
    def for_config(cls, cfg: Config, sets: Sequence) -> GlobalBatches:
        """The batches of ``cfg`` over the training sets (``gist_ray.data.TrainingSet``)."""
        return cls(
            [list(s.texts.values()) for s in sets],
            [s.name for s in sets],
            cfg.train.batch_size,
            cfg.train.seed,
            cfg.data.sampling,
            cfg.data.no_duplicates,
        )

    @property
    def sizes(self) -> list[int]:
        return [len(cols[0]) for cols in self.texts]

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    def _per_dataset(self) -> list[int]:
        return [rows // self.batch_size for rows in self.sizes]

    @property
    def steps_per_epoch(self) -> int:
        per = self._per_dataset()
        return min(per) * len(per) if self.sampling == "round_robin" else sum(per)

    def total_steps(self, cfg: Config) -> int:
        """``train.max_steps`` when set, else ``train.epochs`` full epochs."""
        return cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

    def _dataset_batches(self, d: int, epoch: int, count: int) -> list[tuple[int, ...]]:
        g = _generator(self.seed, epoch, d)
        ids = self._ids[d]
        if ids is None:
            perm = torch.randperm(self.sizes[d], generator=g).tolist()
            return [
                tuple(perm[i * self.batch_size : (i + 1) * self.batch_size]) for i in range(count)
            ]
        found = no_duplicate_batches(ids, self.batch_size, count, g)
        if found is None:
            raise DataError(
                f"dataset {self.names[d]!r}: cannot fill {count} global batches of "
                f"{self.batch_size} rows without repeating a text ({len(np.unique(ids))} unique "
                "texts); lower train.batch_size or set data.no_duplicates=false"
            )
        return found

    def plan(self, epoch: int) -> list[Batch]:
        """Every global batch of ``epoch``, in step order (the latest epoch's plan is kept)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        per = self._per_dataset()
        if self.sampling == "round_robin":
            per = [min(per)] * len(per)
            order = [d for _ in range(per[0]) for d in range(len(per))]
        else:
            order = [d for d, n in enumerate(per) for _ in range(n)]
            if len(per) > 1:
                g = _generator(self.seed, epoch, ORDER_STREAM)
                shuffle = torch.randperm(len(order), generator=g)
                order = [order[i] for i in shuffle.tolist()]
        queues = [iter(self._dataset_batches(d, epoch, n)) for d, n in enumerate(per)]
        batches = [Batch(d, next(queues[d])) for d in order]
        self._plan = (epoch, batches)
        return batches

    def batch(self, step: int) -> Batch:
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.plan(epoch)[pos]

    def local(self, step: int, rank: int, world: int) -> tuple[int, list[int]]:
        """(dataset, this worker's rows) of the global batch of ``step``."""
        batch = self.batch(step)
        b = self.batch_size // world
        return batch.dataset, list(batch.rows[rank * b : (rank + 1) * b])
