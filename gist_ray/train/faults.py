"""Fault injection for the fault-tolerance tests: ``GIST_RAY_FAULT_INJECT="RANK@STEP[,...]"``
makes that rank SIGKILL its own process right after that optimizer step (before any later
checkpoint), once: a marker under ``<output_dir>/.faults`` stops the replayed step from dying
again. The variable is read once, where a Ray worker starts (the launcher forwards it to the
workers), and becomes a step hook of the training loop; unset, there is no hook at all."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from gist_ray.core import storage
from gist_ray.core.log import ALL_RANKS, ROOT

log = logging.getLogger(__name__)

ENV = "GIST_RAY_FAULT_INJECT"


def from_env(output_dir: str | Path, rank: int) -> Callable[[int, dict[str, float]], None] | None:
    """The step hook that kills this rank at the steps ``GIST_RAY_FAULT_INJECT`` names for it,
    or None when it names none."""
    steps = set()
    for item in os.environ.get(ENV, "").split(","):
        who, _, step = item.strip().partition("@")
        if who == str(rank) and step.isdigit():
            steps.add(int(step))
    if not steps:
        return None

    def hook(step: int, _metrics: dict[str, float]) -> None:
        if step in steps:
            _fail_once(str(output_dir), rank, step)

    return hook


def _fail_once(output_dir: str, rank: int, step: int) -> None:
    marker = storage.join(output_dir, ".faults", f"rank{rank}-step{step}")  # maybe on s3://
    if storage.exists(marker):
        return
    storage.write_text(marker, str(os.getpid()))
    log.info("fault injection: rank %d kills itself after step %d", rank, step, extra=ALL_RANKS)
    for handler in logging.getLogger(ROOT).handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
