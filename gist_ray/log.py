"""gist-ray's progress messages: every module logs to a child of the ``gist_ray`` logger
(``logging.getLogger(__name__)``); :func:`configure` gives that logger its one console handler.

The CLI configures it once per process, and so does each Ray worker (its stdout reaches the
driver's terminal through Ray). Lines read ``[gist-ray] message``; warnings and errors say so.
Only rank 0 speaks, so W workers do not print every line W times; a record logged with
``extra=ALL_RANKS`` is printed by every rank. A command's *result* (a metrics table, the final
summary) is not a log message: it is printed to stdout.
"""

from __future__ import annotations

import logging
import sys

ROOT = "gist_ray"
ALL_RANKS = {"all_ranks": True}  # extra= for a record every rank should print


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            return True
        from gist_ray.distributed import rank

        return rank() == 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[gist-ray] {level}{record.getMessage()}"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the time of the record (so
    redirections made after configuration, such as pytest's capture, are honoured)."""

    def __init__(self, stream_name: str) -> None:
        super().__init__()
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)


def configure(
    stream: str = "stdout", level: int = logging.INFO, propagate: bool | None = None
) -> None:
    """Give the ``gist_ray`` logger its console handler (idempotent: a second call only updates
    the stream and level). Progress goes to ``stream`` ("stdout" or "stderr"), warnings and errors
    to stderr. ``propagate=True`` also passes records to the root logger (tests' log capture);
    the first configuration turns it off unless told otherwise, later ones leave it."""
    log = logging.getLogger(ROOT)
    log.setLevel(level)
    mine = [h for h in log.handlers if isinstance(h, _ConsoleHandler)]
    if propagate is not None or not mine:
        log.propagate = bool(propagate)
    if mine:
        mine[0].stream_name = stream
        return
    info = _ConsoleHandler(stream)
    info.addFilter(lambda r: r.levelno < logging.WARNING)
    problems = _ConsoleHandler("stderr")
    problems.setLevel(logging.WARNING)
    for handler in (info, problems):
        handler.setFormatter(_Formatter())
        handler.addFilter(_RankZero())
        log.addHandler(handler)
