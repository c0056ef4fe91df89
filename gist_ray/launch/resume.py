"""Checkpoints on storage: which run an output folder holds (``run.json``), the checkpoint a rerun
resumes from, and the models copied out of the last and the best checkpoint.

A run's identity is its output folder, as Hugging Face's Trainer resumes from its ``output_dir``:
``<output_dir>/run.json`` names the run's folder under ``ray.storage_path`` and its MLflow run,
so rerunning the same command finds the run and resumes it from its latest checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gist_ray.config import Config
from gist_ray.core import fileio
from gist_ray.core.errors import GistRayError
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
    path = Path(cfg.output_dir) / RECORD
    try:
        raw = json.loads(path.read_text())
        return RunRecord(str(raw["ray_name"]), str(raw["mlflow_run_id"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GistRayError(
            f"{path} is unreadable ({type(e).__name__}); rerun with --fresh to start over"
        ) from e


def write_record(cfg: Config, record: RunRecord) -> None:
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    fileio.write_json(Path(cfg.output_dir) / RECORD, asdict(record))


def run_dir(cfg: Config, name: str) -> str:
    return f"{storage_path(cfg).rstrip('/')}/{name}"


def discard(cfg: Config, record: RunRecord | None) -> None:
    """``--fresh``: remove the checkpoints of the run in this output folder (or of the named
    run), say what goes and what stays."""
    names = {n for n in (record.ray_name if record else None, cfg.mlflow.run_name) if n}
    for name in sorted(names):
        where = run_dir(cfg, name)
        local = Path(where) if "://" not in where else None
        if local is not None and local.is_dir():
            size = du(local)
            shutil.rmtree(local)
            log.info("--fresh: removed the earlier checkpoints %s (%s)", where, human_size(size))
        elif local is None:
            log.warning("--fresh: the checkpoints in %s stay (remote storage); delete them", where)
    (Path(cfg.output_dir) / RECORD).unlink(missing_ok=True)
    if record is not None:
        log.info(
            "--fresh: training from step 0 as a new MLflow run; MLflow run %s stays, and the "
            "model in %s is replaced at the end",
            record.mlflow_run_id,
            cfg.output_dir,
        )


def du(path: str | Path) -> int:
    """Bytes in the files under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


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

    run_dir = f"{storage_path(cfg).rstrip('/')}/{name}"
    if "://" not in run_dir and not Path(run_dir).is_dir():
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
    where = f"{run_dir}/{Path(root).name}"
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
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="gist-ray-final-") as tmp:
        checkpoint.to_directory(tmp)
        yield Path(tmp)


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
    with tempfile.TemporaryDirectory(prefix="gist-ray-best-") as tmp:
        best.to_directory(tmp)
        folder = save_best(
            cfg.output_dir,
            {**info, "run_id": run_id},
            copy_from(Path(tmp) / ckpt.CHECKPOINT_MODEL_DIR),
        )
    log.info(
        "best checkpoint: step %d, %s %.4f -> %s",
        info["step"],
        cfg.eval.metric,
        info["value"],
        folder,
    )
