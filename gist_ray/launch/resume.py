"""Checkpoints on storage: the run folder a rerun resumes from, and the models copied out of the
last and the best checkpoint."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gist_ray.config import Config
from gist_ray.core import fileio
from gist_ray.core.errors import GistRayError
from gist_ray.launch.resources import storage_path
from gist_ray.train import checkpoint as ckpt

log = logging.getLogger(__name__)

NOT_VALIDATED = -1.0  # the score of a checkpoint no validation ranked (metrics are in [0, 1])


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
