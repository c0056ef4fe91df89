"""Test-only fault injection: ``GIST_RAY_FAULT_INJECT="RANK@STEP[,RANK@STEP...]"`` makes that
rank SIGKILL its own process right after that optimizer step (before any later checkpoint), once:
a marker under ``<output_dir>/.faults`` stops the replayed step from dying again. Unset in normal
use; the launcher forwards the variable to Ray workers."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from gist_ray.core.log import ALL_RANKS, ROOT

log = logging.getLogger(__name__)

ENV = "GIST_RAY_FAULT_INJECT"


def maybe_fail(output_dir: str | Path, rank: int, step: int) -> None:
    spec = os.environ.get(ENV, "")
    if f"{rank}@{step}" not in {s.strip() for s in spec.split(",")}:
        return
    marker = Path(output_dir) / ".faults" / f"rank{rank}-step{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    log.info("fault injection: rank %d kills itself after step %d", rank, step, extra=ALL_RANKS)
    for handler in logging.getLogger(ROOT).handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
