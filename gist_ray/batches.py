"""Which rows make up each global batch: a pure function of the step, so a resumed run (or a
restarted worker) sees exactly the batches the interrupted one would have."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gist_ray.config import Config
from gist_ray.errors import ConfigError


@dataclass
class GlobalBatches:
    """A seeded permutation of the rows per epoch, cut into global batches; each worker takes
    its contiguous slice of the batch."""

    num_rows: int
    batch_size: int
    seed: int
    _perm: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_config(cls, cfg: Config, num_rows: int) -> GlobalBatches:
        """The batches of ``cfg``; a global batch larger than the data is a ConfigError."""
        if num_rows < cfg.train.batch_size:
            raise ConfigError(
                f"train.batch_size = {cfg.train.batch_size} is larger than the dataset "
                f"{cfg.data.train!r} ({num_rows} rows)"
            )
        return cls(num_rows, cfg.train.batch_size, cfg.train.seed)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def total_steps(self, cfg: Config) -> int:
        """``train.max_steps`` when set, else ``train.epochs`` full epochs."""
        return cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

    def local_indices(self, step: int, rank: int, world: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:  # one epoch's permutation is kept
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.num_rows, generator=g))
        rows = self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size]
        b = self.batch_size // world
        return rows[rank * b : (rank + 1) * b].tolist()
