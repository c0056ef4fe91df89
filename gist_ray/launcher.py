"""Ray Train launcher: the only module that knows about Ray.

It connects to a Ray cluster (``ray.address`` / ``RAY_ADDRESS``, e.g. inside ``ray job submit``)
or starts a local one, checks resources and storage, builds the guide cache as a Ray Data job,
finds the checkpoint a rerun resumes from, runs :func:`gist_ray.train.train_worker` on
``ray.num_workers`` TorchTrainer workers (with Ray Train's validation of the ``eval.every``
checkpoints), and copies the final and the best model out of the checkpoints.

Fault tolerance is Ray Train V2's: ``FailureConfig(max_failures)`` restarts the worker group
after a worker or node dies and ``ray.train.get_checkpoint()`` hands the restarted workers the
latest committed checkpoint; a new ``fit()`` with the same ``RunConfig(name, storage_path)``
reloads the run's checkpoint list from storage, so rerunning a command resumes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gist_ray import checkpoint as ckpt
from gist_ray import fileio
from gist_ray.config import Config
from gist_ray.errors import GistRayError
from gist_ray.log import QUIET_BARS

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
# Mount types every node can share (prefix match; "fuse." = gcsfuse, s3fs, juicefs, ...); a local
# path on any other file system is node-local.
SHARED_FS_TYPES = (
    "nfs",
    "cifs",
    "smb",
    "lustre",
    "gpfs",
    "beegfs",
    "gluster",
    "ceph",
    "weka",
    "fuse.",
)
NOT_VALIDATED = -1.0  # the score of a checkpoint no validation ranked (metrics are in [0, 1])
# Test-only fault injection (gist_ray.faults) must reach the workers' processes.
FORWARDED_ENV = ("GIST_RAY_FAULT_INJECT",)


class RayReporter:
    """Reporter backed by ``ray.train.report`` / ``ray.train.get_checkpoint``. With
    ``score_key`` (eval during training) checkpoints reported with ``validate`` are evaluated
    by Ray Train's validation task while training goes on, and ranked by that metric."""

    def __init__(self, score_key: str | None = None) -> None:
        self.score_key = score_key
        self.validates = score_key is not None

    def report(
        self, metrics: dict[str, float], checkpoint_dir: str | None, validate: bool = False
    ) -> None:
        """Returns once the checkpoint is committed: uploaded and recorded in the run's snapshot
        in storage, i.e. what a restart would resume from."""
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        if self.score_key:  # ranked below every validated one until (unless) validated
            metrics = {self.score_key: NOT_VALIDATED, **metrics}
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
            checkpoint_dir_name=Path(checkpoint_dir).name,
            validation=validate and self.validates,
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Ray has copied it to storage
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )

    def latest_checkpoint(self) -> str | None:
        """A local folder with the checkpoint to resume from (downloaded if remote)."""
        import pyarrow.fs
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            return None
        if isinstance(found.filesystem, pyarrow.fs.LocalFileSystem):
            return found.path
        return found.to_directory(tempfile.mkdtemp(prefix="gist-ray-resume-"))


def _ray_entry(payload: dict[str, Any]) -> None:
    """Runs on each Ray worker: rebuild the config and hand over to plain torch code."""
    from gist_ray import log
    from gist_ray.config import load_config_dict
    from gist_ray.train import train_worker

    log.configure()

    train_worker(
        load_config_dict(payload["config"]),
        RayReporter(payload.get("score_key")),
        payload["run_id"],
        payload["tracking_uri"],
        guide_caches=payload.get("guide_caches"),
    )


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
        from gist_ray.progress import Relay

        self._print = print_worker_logs  # Ray's formatter: prefix, colour, tqdm_ray handling
        self.relay = Relay()

    def __call__(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        from gist_ray import log as console_log

        others = []
        from_worker = data.get("pid") not in ("raylet", "autoscaler")
        name = data.get("actor_name") or data.get("task_name") or "worker"
        for line in data.get("lines") or ():
            if from_worker and line.startswith(console_log.PREFIX):
                console_log.to_file(f"({name} pid={data.get('pid')}) {line}")
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
    from gist_ray import log as console_log

    if console_log.log_file() is not None:
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in the log file
    route = WorkerOutput(ray_worker.print_worker_logs)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", route)
    ray_worker.print_to_stdstream = route


def shutdown() -> None:
    """Disconnect from Ray (stopping the local cluster we started), so its last words land in
    the log file before it closes."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _shortfall(cfg: Config, total: dict[str, float]) -> str | None:
    n = cfg.ray.num_workers
    if cfg.ray.use_gpu and total.get("GPU", 0) < n:
        return (
            f"ray.num_workers = {n} with ray.use_gpu = true needs {n} GPUs but the cluster has "
            f"{int(total.get('GPU', 0))}; lower ray.num_workers, set ray.use_gpu=false, or on "
            "an autoscaling cluster set ray.resource_wait_s so GPU nodes can join"
        )
    if not cfg.ray.use_gpu and total.get("CPU", 0) < n:
        return (
            f"ray.num_workers = {n} needs {n} CPUs but the cluster has "
            f"{int(total.get('CPU', 0))}; lower ray.num_workers or add nodes"
        )
    return None


def _wait_for_resources(cfg: Config) -> None:
    """Ask the autoscaler for the workers' resources and wait up to ``ray.resource_wait_s``."""
    import ray
    from ray.autoscaler.sdk import request_resources

    bundle = {"GPU": 1} if cfg.ray.use_gpu else {"CPU": 1}
    request_resources(bundles=[bundle] * cfg.ray.num_workers)
    try:
        deadline = time.monotonic() + cfg.ray.resource_wait_s
        while _shortfall(cfg, ray.cluster_resources()) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(5.0, deadline - time.monotonic())))
    finally:
        request_resources(bundles=[])  # the placement group keeps the demand from here on


def storage_path(cfg: Config) -> str:
    """``ray.storage_path`` (absolute when local), else ``<output_dir>/ray``."""
    path = cfg.ray.storage_path or str(Path(cfg.output_dir) / "ray")
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _mount_type(path: str) -> str:
    """File system type of the mount holding ``path`` (longest mount-point prefix)."""
    best, fstype = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    real = os.path.realpath(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) > len(best):
            best, fstype = mnt, parts[2]
    return fstype


def is_shared_storage(path: str) -> bool:
    scheme = urlparse(path).scheme if "://" in path else ""
    if scheme and scheme != "file":
        return True  # s3://, gs://, abfs://, hdfs://, ...
    local = path[len("file://") :] if scheme == "file" else path
    return _mount_type(local).startswith(SHARED_FS_TYPES)


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_writable(path: str, key: str) -> None:
    """A local ``path`` must be a folder this process can create files in."""
    if "://" in path:
        return  # object stores: Ray Train reports its own errors
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise GistRayError(
            f"{key} = {path!r} is not writable ({type(e).__name__}: {e.strerror or e}); set "
            f"{key} to a writable folder (shared storage on a multi-node cluster)"
        ) from e


def check_storage(cfg: Config, alive_nodes: int) -> None:
    """Checkpoints of a multi-node run must land where every node (and the driver) can read."""
    path = storage_path(cfg)
    check_writable(path, "ray.storage_path")
    if alive_nodes > 1 and not (cfg.ray.shared_storage or is_shared_storage(path)):
        raise GistRayError(
            f"ray.storage_path = {path!r} is node-local but the cluster has {alive_nodes} nodes: "
            "workers on other nodes cannot write or restore checkpoints there; set "
            "ray.storage_path to shared storage (s3://BUCKET/PATH, gs://..., or an NFS mount), "
            "or ray.shared_storage=true if that path is a mount every node shares"
        )


def check_resources(cfg: Config) -> None:
    """Enough GPUs/CPUs for the workers (waiting for an autoscaler when asked), and storage
    that every node shares when the cluster has several."""
    import ray

    if cfg.ray.resource_wait_s and _shortfall(cfg, ray.cluster_resources()):
        _wait_for_resources(cfg)
    problem = _shortfall(cfg, ray.cluster_resources())
    if problem:
        raise GistRayError(problem)
    check_storage(cfg, alive_nodes())


def run_dir_name(cfg: Config, run_id: str) -> str:
    """The run's folder under the storage path: the MLflow run name, so a rerun finds it."""
    return cfg.mlflow.run_name or f"gist-ray-{run_id[:8]}"


@dataclass
class FoundCheckpoint:
    """The checkpoint Ray Train will restore a run from."""

    checkpoint: Any  # ray.train.Checkpoint
    step: int
    mlflow_run_id: str | None
    where: str


def find_checkpoint(cfg: Config, name: str) -> FoundCheckpoint | None:
    """The latest committed checkpoint of run ``name`` in storage, checked against this config
    (identity and file sizes) without downloading it; None if the run has none."""
    import pyarrow.fs
    import ray.train

    run_dir = f"{storage_path(cfg).rstrip('/')}/{name}"
    try:
        result = ray.train.Result.from_path(run_dir)
    except RuntimeError:  # no such folder, or no checkpoint snapshot in it: a fresh run
        return None
    except Exception as e:  # noqa: BLE001 - an unreadable snapshot, storage without access, ...
        raise GistRayError(
            f"cannot read the checkpoints of run {name!r} under {run_dir} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); fix "
            "access to ray.storage_path, or delete that folder / use another mlflow.run_name"
        ) from e
    found = result.checkpoint
    if found is None:
        return None
    fs, root = found.filesystem, found.path.rstrip("/")
    where = f"{run_dir}/{Path(root).name}"
    try:
        with fs.open_input_stream(f"{root}/{ckpt.META_FILE}") as f:
            meta = ckpt.parse_meta(f.read(), where)
    except (FileNotFoundError, OSError) as e:
        raise GistRayError(
            f"checkpoint {where} is incomplete: {ckpt.META_FILE} is missing; "
            "delete it or use another mlflow.run_name"
        ) from e
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    sizes = {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}
    ckpt.check_meta(meta, ckpt.identity(cfg), sizes, where)
    return FoundCheckpoint(found, int(meta["step"]), meta.get("mlflow_run_id"), where)


def export_checkpoint(cfg: Config, checkpoint) -> Path:
    """Copy a (possibly remote) checkpoint to ``<output_dir>/final-checkpoint``."""
    local = Path(cfg.output_dir) / "final-checkpoint"
    with fileio.atomic_dir(local) as tmp:
        checkpoint.to_directory(str(tmp))
    return local


def _trainer(cfg: Config, entry, payload: dict[str, Any], validation=None, **run_config: Any):
    """A TorchTrainer running ``entry(payload)`` on ``ray.num_workers`` workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # V2's print patch echoes every line twice
    env.update(QUIET_BARS)  # a worker's progress bars are noise in the driver's log
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    return TorchTrainer(
        entry,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu
        ),
        run_config=ray.train.RunConfig(
            storage_path=storage_path(cfg), worker_runtime_env={"env_vars": env}, **run_config
        ),
        validation_config=validation,
    )


def _validation(cfg: Config, run_id: str, tracking_uri: str):
    """Ray Train's validation of the checkpoints written every ``eval.every`` steps (None when
    there is no eval during training): :func:`gist_ray.training_eval.validate_checkpoint` as a
    task with ``eval.num_cpus`` / ``eval.num_gpus``."""
    if not (cfg.eval.source and cfg.eval.every):
        return None
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    from gist_ray.training_eval import validate_checkpoint

    kwargs = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri}
    env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **QUIET_BARS}}
    return ValidationConfig(
        fn=validate_checkpoint,
        task_config=ValidationTaskConfig(fn_kwargs=kwargs),
        ray_remote_kwargs={
            "num_cpus": cfg.eval.num_cpus,
            "num_gpus": cfg.eval.num_gpus,
            "runtime_env": env,
        },
    )


def run_training(
    cfg: Config, run_id: str, tracking_uri: str, guide_caches: list[str] | None = None
) -> Path:
    """Fit on the cluster (resuming the run's latest checkpoint if it has one); return the final
    checkpoint's directory (local copy). ``guide_caches``: the datasets' guide cache folders,
    built before (:func:`prepare_guide_cache`)."""
    import ray.train

    from gist_ray.training_eval import score_key

    validation = _validation(cfg, run_id, tracking_uri)
    score = score_key(cfg) if validation else None
    payload = {
        "config": cfg.to_dict(),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "guide_caches": guide_caches,
        "score_key": score,
    }
    # With validation Ray keeps the 2 best-scored checkpoints (besides the latest, which a
    # restart resumes from, and any still being validated), all on the run's storage.
    keep = ray.train.CheckpointConfig(
        num_to_keep=2, checkpoint_score_attribute=score, checkpoint_score_order="max"
    )
    trainer = _trainer(
        cfg,
        _ray_entry,
        payload,
        validation,
        name=run_dir_name(cfg, run_id),
        checkpoint_config=keep,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - TrainingFailedError wraps the worker's error
        _resume_hint(cfg, run_dir_name(cfg, run_id))
        raise _unwrap(e) from e
    if result.checkpoint is None:
        raise GistRayError("training finished without a checkpoint")
    if score:
        export_best(cfg, run_id, result.best_checkpoints, score)
    return export_checkpoint(cfg, result.checkpoint)


def export_best(cfg: Config, run_id: str, scored: list, score: str) -> None:
    """Copy the model of the best validated checkpoint (Ray's scoring) to
    ``<output_dir>/best-model``, with its record in ``best-model.json``."""
    from gist_ray.best_model import copy_from, save_best

    validated = [(c, m) for c, m in scored or [] if m.get(score, NOT_VALIDATED) > NOT_VALIDATED]
    if not validated:
        log.warning("no checkpoint was validated; there is no best model")
        return
    best, metrics = max(validated, key=lambda cm: (cm[1][score], -int(cm[1].get("step", 0))))
    info = {"step": int(metrics["step"]), "metric": cfg.eval.metric, "value": metrics[score]}
    with tempfile.TemporaryDirectory(prefix="gist-ray-best-") as tmp:
        best.to_directory(tmp)
        folder = save_best(
            cfg.output_dir, {**info, "run_id": run_id}, copy_from(Path(tmp) / ckpt.MODEL_DIR)
        )
    log.info(
        "best checkpoint: step %d, %s %.4f -> %s",
        info["step"],
        cfg.eval.metric,
        info["value"],
        folder,
    )


def _resume_hint(cfg: Config, name: str) -> None:
    """After a failed fit, say where a rerun would resume (only named runs resume)."""
    if not cfg.mlflow.run_name:
        return
    try:
        found = find_checkpoint(cfg, name)
    except GistRayError:
        return
    if found is not None:
        log.warning(
            "training failed after the checkpoint at step %d: rerun the same command to resume "
            "from it",
            found.step,
        )


def _unwrap(e: BaseException) -> BaseException:
    """The error a worker raised, rather than Ray's wrapper around it: a user error
    (:class:`GistRayError`) from any worker, else the lowest failing rank's (or the Train
    controller's); the latter gets a ``gist_ray_origin`` attribute ("Ray worker rank 1") for the
    CLI's one-line message. Ray's exception is returned when it wraps no such error."""
    found: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()

    def walk(cur: BaseException | None, origin: str | None) -> None:
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            failures = getattr(cur, "worker_failures", None) or getattr(cur, "errors", None)
            if isinstance(failures, dict) and failures:
                for rank in sorted(failures, key=str):
                    walk(failures[rank], f"Ray worker rank {rank}")
                return
            controller = getattr(cur, "controller_failure", None)
            if isinstance(controller, BaseException):
                walk(controller, "the Ray Train controller")
                return
            # Ray Train's wrapper of the worker's exception; Ray core's (RayTaskError)
            inner = getattr(cur, "_base_exc", None) or getattr(cur, "cause", None)
            if not isinstance(inner, BaseException):
                found.append((cur, origin))
                inner = cur.__cause__ or cur.__context__
            cur = inner

    walk(e, None)
    for err, _ in found:
        if isinstance(err, GistRayError):
            return err
    for line in str(e).splitlines():  # a user error whose class did not survive the trip
        if "Error:" in line and "gist_ray.errors" in line:
            return GistRayError(line.split("Error:", 1)[1].strip())
    workers = [(err, origin) for err, origin in found if origin is not None]
    if not workers:
        return e
    err, origin = workers[0]
    try:
        err.gist_ray_origin = origin  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__
        pass
    return err


def prepare_guide_cache(cfg: Config, sets: list) -> list[str] | None:
    """Load or build every dataset's guide cache on the cluster (None when ``data.guide_cache``
    is off): checks its folder (writable; shared when the cluster has several nodes), then runs
    the missing shards as a Ray Data job (:func:`run_guide_job`)."""
    from gist_ray import guide_cache
    from gist_ray.prompts import guide_prompts

    if not cfg.data.guide_cache:
        return None
    nodes = alive_nodes()
    for s in sets:
        root, chosen = guide_cache.cache_root(cfg, s.spec.source)
        shared = cfg.ray.shared_storage or is_shared_storage(str(root))
        guide_cache.check_root(root, chosen, nodes, shared)
    return guide_cache.ensure(
        cfg, sets, guide_prompts(cfg, sets), run_guide_job, cfg.ray.num_workers
    )


def run_guide_job(cfg: Config, folder: Path, shards: list[int]):
    """Embed ``shards`` of a guide cache folder with a Ray Data job: ``map_batches`` runs
    :class:`gist_ray.guide_embed.ShardEmbedder` (the guide, loaded once per actor) on up to
    ``ray.num_workers`` actors, one GPU each with ``ray.use_gpu`` (else one CPU); each task
    writes its shard to the folder. Yields each finished shard's text count."""
    import ray.data

    from gist_ray.guide_embed import ShardEmbedder

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver logs its own progress, with an ETA
    ctx.execution_options.preserve_order = False
    gpu = {"num_gpus": 1} if cfg.ray.use_gpu else {"num_cpus": 1}
    out = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=len(shards))
    out = out.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={"config": cfg.to_dict(), "folder": str(folder)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.ray.num_workers, len(shards))),
        **gpu,
    )
    try:
        for row in out.iter_rows():
            yield int(row["texts"])
    except Exception as e:  # noqa: BLE001 - Ray Data wraps the task's error
        raise _unwrap(e) from e
