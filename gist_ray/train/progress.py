"""Progress: what rank 0 reports, and how the driver shows it.

On the worker, :class:`StepLog` reports each training step: a console line every
``train.log_every`` steps (and at the last one), and the same metrics for MLflow, held in
``TrainState.pending`` until a committed checkpoint covers them (then :meth:`StepLog.committed`
logs them); :func:`guide_cache_line` words the guide-cache build's progress.

On the driver, :class:`Relay` shows those lines as they arrive from the workers: on a terminal
as one live bar (step, loss, samples/s, mask fraction, ETA), elsewhere (a file, a pipe, a Ray
job's log) one line per report, the guide cache's every 10%.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from typing import TYPE_CHECKING

from gist_ray.core import log as console_log
from gist_ray.core.distributed import rank
from gist_ray.core.log import fmt_eta

if TYPE_CHECKING:
    from gist_ray.config import Config
    from gist_ray.train.checkpoint import TrainState

log = logging.getLogger(__name__)

# The step line is also what the driver parses: keep the two together.
STEP_LINE = "step %d/%d loss %.4f lr %.2e %.1f samples/s mask %.3f ETA %s"
_STEP = re.compile(r"step (\d+)/(\d+) loss (\S+) lr \S+ (\S+) samples/s mask (\S+) ETA (\S+)")
GUIDE_LINE = "guide cache: %d%% of this worker's %d texts, ETA %s"
GUIDE_REPORT_EVERY_S = 5.0  # at most this long between guide-cache lines (and one every 10%)
_GUIDE = re.compile(r"guide cache: (\d+)% of this worker's (\d+) texts, ETA (\S+)")


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
            STEP_LINE,
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

    def tags(self, tags: dict[str, str]) -> None:
        """Facts of the run that are no metric (e.g. the loss's dtype and backend) as MLflow
        tags (rank 0; no-op without a run)."""
        if self.mlflow:
            self.mlflow.set_tags(tags)

    def committed(self, state: TrainState) -> None:
        """A checkpoint covering every pending step is committed: log them to MLflow."""
        if self.mlflow and state.pending:
            self.mlflow.log_steps(state.pending)
        state.pending = []


def guide_cache_line(done: int, total: int, elapsed: float) -> str:
    """The guide-cache build's progress, as rank 0 logs it (and the driver parses it)."""
    eta = elapsed / done * (total - done) if done else 0.0
    return GUIDE_LINE % (100 * done // total, total, fmt_eta(eta))


class Relay:
    """Shows the workers' gist-ray lines on the driver's console: progress as one live bar on a
    terminal, one line per report elsewhere (the guide cache's every 10%); any other line as
    it is."""

    def __init__(self, console: console_log.Console | None = None) -> None:
        self.console = console or console_log.console
        self._decile: int | None = None

    def show(self, message: str, stream: str = "stdout") -> None:
        """``message``: a worker's line without the ``[gist-ray]`` prefix."""
        step = _STEP.fullmatch(message)
        guide = None if step else _GUIDE.fullmatch(message)
        if step is None and guide is None:
            self.console.line(console_log.PREFIX + message, stream)
            return
        if guide is not None:
            done, total = int(guide.group(1)), 100
        else:
            done, total = int(step.group(1)), int(step.group(2))
        if not self.console.is_terminal():
            if guide is not None:
                decile = done // 10
                if decile == self._decile:
                    return
                self._decile = decile
            self.console.line(console_log.PREFIX + message)
            return
        if guide is not None:
            label = "guide cache"
            tail = f"{done}% of {guide.group(2)} texts per worker  ETA {guide.group(3)}"
        else:
            label = "training"
            loss, sps, mask, eta = step.group(3, 4, 5, 6)
            tail = f"{done}/{total}  loss {loss}  {sps} samples/s  mask {mask}  ETA {eta}"
        self.console.status(self._bar(label, done / total, tail))
        if done >= total:
            self.console.end_status()
            self._decile = None

    def _bar(self, label: str, frac: float, tail: str) -> str:
        width = shutil.get_terminal_size((100, 24)).columns
        head = f"{console_log.PREFIX}{label} "
        cells = max(10, min(30, width - len(head) - len(tail) - 3))
        full, empty = ("█", "░") if self._can_encode("█░") else ("#", "-")
        n = round(frac * cells)
        text = f"{head}{full * n}{empty * (cells - n)} {tail}"
        return text[: width - 1]

    def _can_encode(self, chars: str) -> bool:
        encoding = getattr(self.console.stream("stdout"), "encoding", None) or "ascii"
        try:
            chars.encode(encoding)
        except (UnicodeEncodeError, LookupError):
            return False
        return True
