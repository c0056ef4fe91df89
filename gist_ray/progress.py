"""Rank 0's report of each training step: a console line every ``train.log_every`` steps (and at
the last one), and the same metrics for MLflow, held in ``TrainState.pending`` until a committed
checkpoint covers them (then :meth:`StepLog.committed` logs them)."""

from __future__ import annotations

import logging
import time

from gist_ray.checkpoint import TrainState
from gist_ray.config import Config
from gist_ray.distributed import rank

log = logging.getLogger(__name__)


def fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class StepLog:
    def __init__(self, cfg: Config, state: TrainState, total: int, tracking_uri: str | None):
        self.every, self.total = cfg.train.log_every, total
        self.t_start, self.first_step = time.perf_counter(), state.step
        self.mlflow = None
        if rank() == 0 and state.run_id and tracking_uri:
            from gist_ray.tracking.runs import StepLogger

            self.mlflow = StepLogger(tracking_uri, state.run_id)
            self.mlflow.log_unlogged(state.pending)  # committed before a crash, never logged
        state.pending = []

    def step(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Report the step ``state.step`` just finished (rank 0; no-op elsewhere)."""
        step = state.step
        if rank() != 0 or (step % self.every and step != self.total):
            return
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / (step - self.first_step) * (self.total - step)
        log.info(
            "step %d/%d loss %.4f lr %.2e %.1f samples/s mask %.3f ETA %s",
            step,
            self.total,
            metrics["loss"],
            metrics["lr"],
            metrics["samples_per_s"],
            metrics["mask_frac/all"],
            fmt_eta(eta),
        )
        if self.mlflow:
            state.pending.append((step, dict(metrics)))

    def add(self, state: TrainState, metrics: dict[str, float]) -> None:
        """More metrics of step ``state.step`` for MLflow (e.g. a periodic eval's)."""
        if self.mlflow:
            state.pending.append((state.step, dict(metrics)))

    def committed(self, state: TrainState) -> None:
        """A checkpoint covering every pending step is committed: log them to MLflow."""
        if self.mlflow and state.pending:
            self.mlflow.log_steps(state.pending)
        state.pending = []
