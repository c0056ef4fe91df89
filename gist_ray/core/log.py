"""gist-ray's console and log file.

Every module logs to a child of the ``gist_ray`` logger (``logging.getLogger(__name__)``);
:func:`configure` gives that logger its console handlers. Lines read ``[gist-ray] message``;
warnings and errors say so. Only rank 0 speaks, so W workers do not print every line W times; a
record logged with ``extra=ALL_RANKS`` is printed by every rank. A command's *result* (a metrics
table, the final summary) is not a log message: it is printed to stdout.

The terminal belongs to gist-ray: :func:`start_log_file` opens ``<output_dir>/gist-ray.log``
and turns this process's stderr (file descriptor 2, so C++ and child-process output too) into
that file, where the output of Ray, MLflow, transformers, datasets and warnings lands; our own
lines go on to the terminal, and into the file with timestamps. ``verbose`` shows the captured
output live as well. :data:`console` writes to the terminal and keeps at most one live status
line (a progress bar) below the lines it prints.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

ROOT = "gist_ray"
PREFIX = "[gist-ray] "
LOG_NAME = "gist-ray.log"
_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
ALL_RANKS = {"all_ranks": True}  # extra= for a record every rank should print
# Progress bars of the libraries we call: noise in a log file, and in a Ray worker nobody
# sees them live. Set before those libraries are imported (they read them at import time).
QUIET_BARS = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights", hub downloads
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' "Generating train split", "Map"
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts"
}


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            return True
        if "torch.distributed" not in sys.modules:  # not even imported: not distributed
            return True
        from gist_ray.core.distributed import rank

        return rank() == 0


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{PREFIX}{level}{record.getMessage()}"


class Console:
    """The terminal: gist-ray's lines, and at most one live status line below them.

    Writes go to ``sys.stdout`` / ``sys.stderr`` as they are at the time (so redirections made
    later, such as pytest's capture, are honoured), except that stderr means the real terminal
    while a log file has taken over file descriptor 2."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._status = ""  # shown on stdout, a terminal, below the last line
        self.stderr_override: TextIO | None = None
        self.shared = False  # others' output is shown live too (--verbose): no status line

    def stream(self, name: str) -> TextIO:
        if name == "stderr" and self.stderr_override is not None:
            return self.stderr_override
        return getattr(sys, name)

    def is_terminal(self) -> bool:
        """Whether a live status line can be drawn: stdout is a terminal nobody else writes to."""
        if self.shared:
            return False
        try:
            return self.stream("stdout").isatty()
        except (AttributeError, ValueError):
            return False

    def line(self, text: str, stream: str = "stdout") -> None:
        """Print one line, keeping the status line (if any) below it."""
        with self._lock:
            self._clear_status()
            out = self.stream(stream)
            out.write(text + "\n")
            out.flush()
            self._draw_status()

    def status(self, text: str) -> None:
        """Show (or replace) the live status line; only on a terminal."""
        with self._lock:
            self._status = text
            self._draw_status()

    def end_status(self) -> None:
        """Leave the status line as it is, as an ordinary line."""
        with self._lock:
            if self._status:
                out = self.stream("stdout")
                out.write("\n")
                out.flush()
            self._status = ""

    def _clear_status(self) -> None:
        if self._status:
            out = self.stream("stdout")
            out.write("\r\x1b[K")
            out.flush()

    def _draw_status(self) -> None:
        if self._status:
            out = self.stream("stdout")
            out.write("\r" + self._status + "\x1b[K")
            out.flush()


console = Console()


class _ConsoleHandler(logging.Handler):
    def __init__(self, stream_name: str) -> None:
        super().__init__()
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.line(self.format(record), self.stream_name)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure(
    stream: str = "stdout", level: int = logging.INFO, propagate: bool | None = None
) -> None:
    """Give the ``gist_ray`` logger its console handlers (idempotent: a second call only
    updates the stream and level). Progress goes to ``stream`` ("stdout" or "stderr"),
    warnings and errors to stderr. ``propagate=True`` also passes records to the root logger
    (tests' log capture); the first configuration turns it off unless told otherwise, later
    ones leave it."""
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


def quiet_progress_bars() -> None:
    """Turn the libraries' progress bars off in this process (and the processes it starts),
    unless the user set the variables; for libraries already imported, through their APIs."""
    for key, value in QUIET_BARS.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
        import datasets

        datasets.disable_progress_bars()


# ----------------------------------------------------------------------------- the log file


class _LogFile:
    """The open log file and the capture of file descriptor 2 into it."""

    def __init__(self, path: Path, verbose: bool) -> None:
        self.path, self.verbose = path, verbose
        self._lock = threading.Lock()
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in stop()
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        self.terminal = os.fdopen(
            os.dup(self._saved_fd),
            "w",
            buffering=1,
            encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
            errors="replace",
        )
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._pump = threading.Thread(
            target=self._copy, args=(read_fd,), name="gist-ray-log", daemon=True
        )
        self._pump.start()
        self.handler = _FileHandler(self)
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )

    def write(self, data: bytes) -> None:
        with self._lock:
            self._file.write(data)

    def _copy(self, read_fd: int) -> None:
        """Everything written to fd 2: to the file (a line rewritten with carriage returns,
        like a progress bar, keeps its last state), and to the terminal when verbose."""
        pending = b""
        while True:
            try:
                chunk = os.read(read_fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            if self.verbose:
                try:
                    os.write(self._saved_fd, chunk)
                except OSError:
                    pass
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if lines:
                self.write(b"".join(_last_state(line) + b"\n" for line in lines))
        if pending:
            self.write(_last_state(pending) + b"\n")
        os.close(read_fd)

    def stop(self) -> None:
        """Give fd 2 back to the terminal, drain the pipe into the file and close it."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self._saved_fd, 2)  # closes our end of the pipe: the copier sees EOF
        self._pump.join(timeout=5.0)
        self.terminal.close()
        os.close(self._saved_fd)
        with self._lock:
            self._file.close()


def _last_state(line: bytes) -> bytes:
    """A line as the file keeps it: the final text of a line rewritten in place with carriage
    returns (a progress bar), without terminal colour codes."""
    return _ANSI.sub(b"", line.rstrip(b"\r").rsplit(b"\r", 1)[-1])


class _FileHandler(logging.Handler):
    def __init__(self, target: _LogFile) -> None:
        super().__init__(logging.DEBUG)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target.write((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_active: _LogFile | None = None
# A log whose output_dir is a URI: (the URI, the local temporary folder the file is written in)
_remote: tuple[str, Path] | None = None


def start_log_file(output_dir: str | Path, verbose: bool = False, title: str = "") -> Path:
    """Capture this process's stderr into ``<output_dir>/gist-ray.log`` (appended: a resumed
    run keeps its history) and log our own records there too; returns the file's path.
    Without ``verbose`` the libraries' progress bars are turned off as well. An ``output_dir``
    on object storage (``s3://...``): the file is written in a local temporary folder (the
    stored log downloaded into it first) and uploaded by :func:`stop_log_file`."""
    global _active, _remote
    if _active is not None:
        return _active.path
    from gist_ray.core import storage

    if storage.is_remote(str(output_dir)):
        import tempfile

        uri = storage.join(str(output_dir), LOG_NAME)
        tmp = Path(tempfile.mkdtemp(prefix="gist-ray-log-"))
        path = tmp / LOG_NAME
        try:
            if storage.kind(uri) == "file":
                storage.download(uri, path)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _remote = (uri, tmp)
    else:
        path = Path(output_dir).expanduser().resolve() / LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
    if not verbose:
        quiet_progress_bars()
    _active = _LogFile(path, verbose)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    _active.write(f"===== {stamp} {title or 'gist-ray'} (pid {os.getpid()})\n".encode())
    logging.getLogger(ROOT).addHandler(_active.handler)
    console.stderr_override, console.shared = _active.terminal, verbose
    return path


def stop_log_file() -> None:
    """Undo :func:`start_log_file` (idempotent); a log of a remote output_dir is uploaded and
    its local copy removed (an upload that fails is said in one line on the terminal)."""
    global _active, _remote
    if _active is None:
        return
    logging.getLogger(ROOT).removeHandler(_active.handler)
    console.stderr_override, console.shared = None, False
    active, _active = _active, None
    active.stop()
    if _remote is not None:
        import shutil

        from gist_ray.core import storage
        from gist_ray.core.errors import GistRayError

        (uri, tmp), _remote = _remote, None
        try:
            storage.upload(active.path, uri)
        except GistRayError as e:
            console.line(f"gist-ray: warning: the log was not uploaded to {uri}: {e}", "stderr")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def log_file() -> Path | None:
    """The log file of this process, while one is open."""
    return _active.path if _active is not None else None


def log_location() -> str | None:
    """Where the log of this process ends up, while one is open: its path, or the URI it is
    uploaded to when the command ends."""
    if _active is None:
        return None
    return _remote[0] if _remote is not None else str(_active.path)


def to_file(text: str) -> None:
    """Write ``text`` (e.g. a traceback) to the log file only; nothing without one."""
    if _active is not None:
        _active.write(text.encode("utf-8", "replace") + (b"" if text.endswith("\n") else b"\n"))


def fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def fmt_change(value: float, width: int = 10, digits: int = 4) -> str:
    """A signed difference for a table, right-aligned: ``+0.0123``; one that rounds to zero is
    ``+0.0000`` whatever its sign (``-0.0000`` reads as a loss that is not there)."""
    text = f"{value:+.{digits}f}"
    if text.startswith("-") and float(text) == 0:
        text = "+" + text[1:]
    return f"{text:>{width}}"
