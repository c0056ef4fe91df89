"""Progress: what rank 0 reports, and how the driver shows it.

On the worker, :class:`StepLog` reports each training step: a console line every
``train.log_every`` steps (and at the last one) with the step's loss and a smoothed loss (an
exponential moving average, :class:`LossEMA`), and the step's metrics for MLflow, held in
``TrainState.pending`` until a committed checkpoint covers them (then :meth:`StepLog.committed`
logs them); :func:`guide_cache_line` words the guide-cache build's progress.

On the driver, :class:`Relay` shows those lines as they arrive from the workers: on a terminal
as one live bar (step, smoothed loss, samples/s, share of candidates masked, ETA), elsewhere
(a file, a pipe, a Ray job's log) one line per report, the guide cache's every 10%.
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

# The step line is also what the driver parses: keep the two together (and use step_line).
STEP_LINE = "step %d/%d loss %s smoothed %s lr %.2e %.1f samples/s masked %s ETA %s"
_STEP = re.compile(
    r"step (\d+)/(\d+) loss (\S+) smoothed (\S+) lr \S+ (\S+) samples/s masked (.+?) ETA (\S+)"
)
EMA_BETA = 0.9  # the smoothed loss: an EMA over roughly the last 1 / (1 - beta) = 10 steps
GUIDE_LINE = "guide cache: %d%% of this worker's %d texts, ETA %s"
GUIDE_REPORT_EVERY_S = 5.0  # at most this long between guide-cache lines (and one every 10%)
_GUIDE = re.compile(r"guide cache: (\d+)% of this worker's (\d+) texts, ETA (\S+)")


def fmt_loss(value: float) -> str:
    """A loss for the screen: 4 decimals, 3 significant digits below 0.001 (a loss that small
    still moves). The GIST loss is never below 0 (the positive is always a candidate): a
    negative value is float rounding of 0, shown as 0, never as ``-0.0000``."""
    value = 0.0 if value <= 0 else value  # -0.0 too
    return f"{value:.2e}" if 0 < value < 1e-3 else f"{value:.4f}"


def fmt_masked(frac: float) -> str:
    """The share of candidates the guide masked, as a percentage (``3.1 %``, ``<0.1 %``)."""
    pct = 100 * frac
    return "<0.1 %" if 0 < pct < 0.05 else f"{pct:.1f} %"


def step_line(
    step: int,
    total: int,
    loss: float,
    smoothed: float,
    lr: float,
    samples_per_s: float,
    masked: float,
    eta: str,
) -> str:
    """One step's console line, as rank 0 logs it and the driver parses it."""
    loss_text, smoothed_text, masked_text = fmt_loss(loss), fmt_loss(smoothed), fmt_masked(masked)
    return STEP_LINE % (step, total, loss_text, smoothed_text, lr, samples_per_s, masked_text, eta)


class LossEMA:
    """The smoothed loss on screen: an exponential moving average of the step losses
    (``beta`` = 0.9, so about the last 10 steps count), bias-corrected as Adam's moments are, so
    the first steps are not pulled toward 0. Restarts with the process (a resumed run)."""

    def __init__(self, beta: float = EMA_BETA) -> None:
        self.beta, self._avg, self._n = beta, 0.0, 0

    def update(self, loss: float) -> float:
        self._n += 1
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        return self.value

    @property
    def value(self) -> float:
        return self._avg / (1 - self.beta**self._n) if self._n else float("nan")


class StepLog:
    def __init__(self, cfg: Config, state: TrainState, total: int, tracking_uri: str | None):
        self.every, self.total = cfg.train.log_every, total
        self.t_start, self.first_step = time.perf_counter(), state.step
        self.mlflow = None
        self.smoothed = LossEMA()
        if rank() == 0 and state.run_id and tracking_uri:
            from gist_ray.tracking.runs import StepLogger

            self.mlflow = StepLogger(tracking_uri, state.run_id)
            self.mlflow.log_unlogged(state.pending)  # committed before a crash, never logged
        state.pending = []

    def step(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Report the step ``state.step`` just finished (rank 0; no-op elsewhere)."""
        step = state.step
        smoothed = self.smoothed.update(metrics["loss"])  # every step, logged or not
        if rank() != 0 or (step % self.every and step != self.total):
            return
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / (step - self.first_step) * (self.total - step)
        log.info(
            "%s",
            step_line(
                step,
                self.total,
                metrics["loss"],
                smoothed,
                metrics["lr"],
                metrics["samples_per_s"],
                metrics["mask_frac/all"],
                fmt_eta(eta),
            ),
        )
        if self.mlflow:  # the step's own loss, not the smoothed one
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
            smoothed, sps, masked, eta = step.group(4, 5, 6, 7)
            tail = (
                f"{done}/{total}  smoothed loss {smoothed}  {sps} samples/s  masked {masked}  "
                f"ETA {eta}"
            )
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
