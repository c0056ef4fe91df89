"""Checkpoints on storage: which run an output folder holds (``run.json``), the checkpoint a rerun
resumes from, and the models copied out of the last and the best checkpoint.

A run's identity is its output folder, as Hugging Face's Trainer resumes from its ``output_dir``:
``<output_dir>/run.json`` names the run's folder under ``ray.storage_path`` and its MLflow run,
so rerunning the same command finds the run and resumes it from its latest checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gist_ray.config import Config
from gist_ray.core import outputs, storage
from gist_ray.core.errors import GistRayError
from gist_ray.core.storage import StorageError
from gist_ray.launch.resources import storage_path
from gist_ray.train import checkpoint as ckpt

log = logging.getLogger(__name__)

NOT_VALIDATED = -1.0  # the score of a checkpoint no validation ranked (metrics are in [0, 1])


RECORD = "run.json"  # in output_dir: the run this folder holds


def run_dir_name(cfg: Config, run_id: str) -> str:
    """A new run's folder under the storage path: the MLflow run name when there is one."""
    return cfg.mlflow.run_name or f"gist-ray-{run_id[:8]}"


def new_run_dir_name(cfg: Config) -> str:
    """A new run's folder name before its MLflow run exists."""
    return cfg.mlflow.run_name or f"gist-ray-{uuid.uuid4().hex[:8]}"


@dataclass
class RunRecord:
    """What ``<output_dir>/run.json`` says about the run the folder holds."""

    ray_name: str  # the run's folder under ray.storage_path
    mlflow_run_id: str


def read_record(cfg: Config) -> RunRecord | None:
    where = storage.join(cfg.output_dir, RECORD)
    try:
        if storage.kind(where) == "missing":
            return None
        raw = json.loads(storage.read_text(where))
        return RunRecord(str(raw["ray_name"]), str(raw["mlflow_run_id"]))
    except StorageError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GistRayError(
            f"{where} is unreadable ({type(e).__name__}); rerun with --fresh to start over"
        ) from e


def write_record(cfg: Config, record: RunRecord) -> None:
    """``run.json``, written whole (atomically on a disk, one upload to a URI) at once: a rerun
    after a crash must find it."""
    storage.write_json(storage.join(cfg.output_dir, RECORD), asdict(record))


def run_dir(cfg: Config, name: str) -> str:
    return storage.join(storage_path(cfg), name)


def discard(cfg: Config, record: RunRecord | None) -> None:
    """``--fresh``: remove the checkpoints of the run in this output folder (or of the named
    run), say what goes and what stays."""
    names = {n for n in (record.ray_name if record else None, cfg.mlflow.run_name) if n}
    for name in sorted(names):
        where = run_dir(cfg, name)
        if storage.kind(where) == "dir":
            size = du(where)
            storage.remove(where)
            log.info("--fresh: removed the earlier checkpoints %s (%s)", where, human_size(size))
    storage.remove(storage.join(cfg.output_dir, RECORD))
    if record is not None:
        log.info(
            "--fresh: training from step 0 as a new MLflow run; MLflow run %s stays, and the "
            "model in %s is replaced at the end",
            record.mlflow_run_id,
            cfg.output_dir,
        )


def du(location: str | Path) -> int:
    """Bytes in the files under ``location``, a path or a URI (0 if it does not exist)."""
    return outputs.size(location)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


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

    run_dir = storage.join(storage_path(cfg), name)
    if not storage.is_remote(run_dir) and not storage.local_path(run_dir).is_dir():
        return None
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
    where = storage.join(run_dir, posixpath.basename(root))
    try:
        with fs.open_input_stream(f"{root}/{ckpt.META_FILE}") as f:
            meta = ckpt.parse_meta(f.read(), where)
    except (FileNotFoundError, OSError) as e:
        raise GistRayError(
            f"checkpoint {where} is incomplete: {ckpt.META_FILE} is missing; "
            "rerun with --fresh to start over"
        ) from e
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    sizes = {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}
    ckpt.check_meta(meta, ckpt.identity(cfg), sizes, where)
    return FoundCheckpoint(found, int(meta["step"]), meta.get("mlflow_run_id"), where)


@contextlib.contextmanager
def local_checkpoint(checkpoint) -> Iterator[Path]:
    """The folder of a checkpoint on this machine: where it lies when the storage is local (no
    second copy on disk), else a temporary download removed afterwards."""
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def export_best(cfg: Config, run_id: str, scored: list, score: str) -> None:
    """Copy the model of the best validated checkpoint (Ray's scoring) to
    ``<output_dir>/best-model``, with its record in ``best-model.json``."""
    from gist_ray.models.best import copy_from, save_best

    validated = [(c, m) for c, m in scored or [] if m.get(score, NOT_VALIDATED) > NOT_VALIDATED]
    if not validated:
        log.warning("no checkpoint was validated; there is no best model")
        return
    best, metrics = max(validated, key=lambda cm: (cm[1][score], -int(cm[1].get("step", 0))))
    info = {"step": int(metrics["step"]), "metric": cfg.eval.metric, "value": metrics[score]}
    with local_checkpoint(best) as folder:
        where = save_best(
            cfg.output_dir,
            {**info, "run_id": run_id},
            copy_from(folder / ckpt.CHECKPOINT_MODEL_DIR),
        )
    log.info(
        "best checkpoint: step %d, %s %.4f -> %s",
        info["step"],
        cfg.eval.metric,
        info["value"],
        where,
    )
