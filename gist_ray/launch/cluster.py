"""The Ray cluster: connect to one (``ray.address`` / ``RAY_ADDRESS``, e.g. inside ``ray job
submit``) or start a local one, relay the workers' output to the driver's console and log, and
shut it down."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any
from urllib.parse import urlparse

from gist_ray.config import Config
from gist_ray.core.errors import GistRayError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
_STARTED: list[str] = []  # temporary folders of the local Ray clusters this process started
_STEP_AT = re.compile(r"step (\d+)/\d+\b")  # rank 0's step line (gist_ray.train.progress)
_LAST_STEP: list[int] = []  # the last training step a worker reported to this driver


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (the GCS, the Ray Client
# server) answers with its own SETTINGS frame (type 0x4) at once.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_grpc(host: str, port: int, timeout: float) -> bool:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(_H2_PREFACE)
        head = b""
        try:
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except TimeoutError:  # connected, but silent
            return False
    return len(head) == 9 and head[3] == 4


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail in bounded time when no Ray cluster answers at an address (ray.init would retry for
    a minute or more against a black hole or a port that accepts and stays silent)."""
    key = f"ray.address = {address!r}"
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise GistRayError(
            f"{key} is a dashboard (Jobs API) address: pass it to `ray job submit --address`, "
            "and give gist-ray the cluster's GCS address (HOST:6379) or leave it unset in a job"
        )
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if parsed.scheme != "ray" or not parsed.hostname or parsed.port is None:
        raise GistRayError(f"{key}: expected HOST:PORT (e.g. 10.0.0.1:6379) or ray://HOST:PORT")
    host, port = parsed.hostname, parsed.port
    try:
        # With TLS the plain-text handshake cannot work: only check that the port is open.
        ok = (
            _speaks_grpc(host, port, timeout)
            if os.environ.get("RAY_USE_TLS") in (None, "0")
            else True
        )
        if not ok:
            raise OSError(f"the port is open but does not speak gRPC within {timeout:g}s")
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise GistRayError(
            f"{key}: no Ray cluster answers at {host}:{port} ({why}); start the cluster "
            "(`ray up cluster.yaml`, `ray start --head`) or fix ray.address / RAY_ADDRESS"
        ) from e


def connect(cfg: Config) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, or start a local cluster; then relay the
    workers' output (see :func:`_relay_worker_output`)."""
    import ray

    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _connect(cfg)
    finally:
        # Ray's core installs a crash handler for SIGTERM (a stack trace, then abort) over the
        # one the process had: keep the process's (gist-ray's: an interrupt, exit 143).
        if callable(on_sigterm):
            signal.signal(signal.SIGTERM, on_sigterm)


def _connect(cfg: Config) -> None:
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as e:  # noqa: BLE001 - connection errors come in several types
            raise GistRayError(
                f"ray.address = {address!r}: cannot connect to a Ray cluster "
                f"there ({str(e).splitlines()[0][:160]})"
            ) from e
        _relay_worker_output()
        log.info("joined the Ray cluster at %s", _gcs_address())
        return
    log.info(
        "starting a local Ray cluster (%s CPUs)",
        cfg.ray.num_cpus if cfg.ray.num_cpus is not None else os.cpu_count(),
    )
    _settle_auth_mode()
    # A fresh temp dir: a stale ray_current_cluster file from an earlier `ray stop` confuses init.
    tmp = tempfile.mkdtemp(prefix="gist-ray-ray-")
    _STARTED.append(tmp)  # removed by shutdown(): the cluster is ours
    ray.init(num_cpus=cfg.ray.num_cpus, _temp_dir=tmp, log_to_driver=True)
    _relay_worker_output()


def _settle_auth_mode() -> None:
    """The local cluster we start uses token authentication (Ray's default for a new cluster,
    which it announces with a warning unless ``RAY_AUTH_MODE`` says so): say so, the way Ray's
    own routine does, so that a Ray already imported in this process sees it too. The user's
    ``RAY_AUTH_MODE`` wins."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # another Ray version: the variable alone (read when Ray starts)
        os.environ["RAY_AUTH_MODE"] = "token"
        return
    _enable_token_auth()


def _gcs_address() -> str:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only for a log line
        return "?"


class WorkerOutput:
    """Where a batch of lines that Ray relays from a worker, an actor or the raylet goes: a
    worker's gist-ray line is shown as ours (progress as a live bar, :class:`progress.Relay`)
    and copied to the log file; every other line goes, with Ray's ``(Actor pid=...)`` prefix,
    to stderr, which is the log file while one is open (``--verbose`` shows it live)."""

    def __init__(self, print_worker_logs) -> None:
        from gist_ray.train.progress import Relay

        self._print = print_worker_logs  # Ray's formatter: prefix, colour, tqdm_ray handling
        self.relay = Relay()

    def __call__(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        from gist_ray.core import log as console_log

        others = []
        from_worker = data.get("pid") not in ("raylet", "autoscaler")
        name = data.get("actor_name") or data.get("task_name") or "worker"
        for line in data.get("lines") or ():
            if from_worker and line.startswith(console_log.PREFIX):
                console_log.to_file(f"({name} pid={data.get('pid')}) {line}")
                step = _STEP_AT.match(line[len(console_log.PREFIX) :])
                if step is not None:
                    _LAST_STEP[:] = [int(step.group(1))]
                stream = "stderr" if data.get("is_err") else "stdout"
                self.relay.show(line[len(console_log.PREFIX) :], stream)
            else:
                others.append(line)
        if others:
            self._print({**data, "lines": others}, sys.stderr, ignore_prefix)


def _relay_worker_output() -> None:
    """Ray prints every line its workers and actors write (Ray Train's INFO lines, C++ core
    messages, libraries' progress bars) on the driver's stdout/stderr; route them through
    :class:`WorkerOutput` instead. Hooks the dispatcher Ray feeds worker output to
    (``ray.init(log_to_driver=True)``) and the function it prints the raylet's messages (a dead
    worker, an OOM kill) with; leaves Ray as it is where those are missing."""
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if not hasattr(ray_worker, "print_worker_logs"):
        return
    from gist_ray.core import log as console_log

    if console_log.log_file() is not None:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in the log file
    route = WorkerOutput(ray_worker.print_worker_logs)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", route)
    ray_worker.print_to_stdstream = route


def shutdown() -> None:
    """Disconnect from Ray (stopping the local cluster we started), so its last words land in
    the log file before it closes; then remove that cluster's temporary folder (sessions, logs,
    sockets: Ray's own lines are already in <output_dir>/gist-ray.log)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    while _STARTED:
        shutil.rmtree(_STARTED.pop(), ignore_errors=True)


def last_reported_step() -> int | None:
    """The last training step rank 0 reported (its step line), None before the first."""
    return _LAST_STEP[0] if _LAST_STEP else None


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
