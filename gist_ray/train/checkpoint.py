"""Training checkpoints: the format, and the :class:`Checkpointer` that saves and restores a
:class:`TrainState` through a :class:`Reporter` (Ray Train's, or a local folder).

A checkpoint holds the student (sentence-transformers folder), optimizer, scheduler, step, every
rank's RNG state, the metrics not yet logged to MLflow and the MLflow run id. It is written under
a temporary name and renamed when complete.

``meta.json`` is a small manifest (format, step, MLflow run id, the config that fixes the
training trajectory, and the size of every file): the driver checks a checkpoint in remote
storage from it without downloading the weights, and a truncated file is caught by its size.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from gist_ray.config import Config
from gist_ray.core import fileio, storage
from gist_ray.core.distributed import is_distributed, rank, world_size
from gist_ray.core.errors import GistRayError

log = logging.getLogger(__name__)

STAGING = "checkpoints-staging"  # rank 0 builds checkpoints here before reporting them


def staging_dir(output_dir: str) -> Path:
    """Where rank 0 builds checkpoints before reporting them: ``<output_dir>/checkpoints-staging``,
    or for an output_dir on object storage a node-local folder named after it (the same for a
    rerun, which clears what a killed worker left there)."""
    if not storage.is_remote(output_dir):
        return storage.local_path(output_dir) / STAGING
    import hashlib
    import tempfile

    digest = hashlib.sha256(output_dir.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"gist-ray-{STAGING}-{digest}"


STATE_FILE = "state.pt"
CHECKPOINT_MODEL_DIR = "model"  # <checkpoint>/model: the student as saved at that step
META_FILE = "meta.json"
FORMAT_VERSION = 1

# Config keys a resumed run may change: they do not alter the training trajectory.
OPERATIONAL_KEYS = frozenset(
    {
        "data.guide_cache",
        "data.guide_cache_dir",
        "data.guide_cache_dtype",
        "train.mini_batch_size",
        "train.gradient_checkpointing",  # recomputes activations with the same dropout masks
        "model.lora_export",
        "train.checkpoint_every",
        "train.checkpoint_minutes",
        "train.log_every",
        "train.max_failures",
        "loss.backend",
    }
)


def identity(cfg: Config) -> dict[str, Any]:
    """The config that fixes the trajectory: a checkpoint only resumes a run that matches it."""
    return {
        k: v
        for k, v in cfg.flat().items()
        if k.split(".")[0] in ("model", "data", "train", "loss") and k not in OPERATIONAL_KEYS
    }


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != META_FILE
    }


def save_checkpoint(directory: str | Path, student, state: dict[str, Any]) -> Path:
    """Write ``directory`` atomically (see :func:`gist_ray.core.fileio.atomic_dir`).

    ``state`` must hold ``step``, ``identity`` and ``mlflow_run_id`` (copied into meta.json)."""
    with fileio.atomic_dir(directory) as tmp:
        student.save(tmp / CHECKPOINT_MODEL_DIR)
        torch.save({"format": FORMAT_VERSION, **state}, tmp / STATE_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "step": state["step"],
            "mlflow_run_id": state.get("mlflow_run_id"),
            "identity": state["identity"],
            "files": _file_sizes(tmp),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return Path(directory)


def parse_meta(text: str | bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise GistRayError(
            f"checkpoint {where} is corrupt: {META_FILE} is not valid JSON; "
            "rerun with --fresh to start over"
        ) from e
    _check_format(meta, where)
    return meta


def _check_format(obj: Any, where: str) -> None:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION:
        raise GistRayError(
            f"checkpoint {where} has an unknown format (not written by this version of gist-ray); "
            "rerun with --fresh to start over"
        )


def check_meta(
    meta: dict[str, Any], expect: dict[str, Any], sizes: dict[str, int], where: str
) -> None:
    """Refuse a checkpoint of another config, or one whose files are missing or truncated."""
    written = meta.get("identity", {})
    changed = [key for key, want in expect.items() if written.get(key) != want]
    if changed:
        shown = ", ".join(
            f"{key} ({_short(written.get(key))} -> {_short(expect[key])})" for key in changed
        )
        raise GistRayError(
            f"checkpoint {where} belongs to a run with another config, so it cannot be resumed: "
            f"{shown}; rerun with --fresh to start over, or restore "
            f"{'that key' if len(changed) == 1 else 'those keys'}"
        )
    for name, size in meta.get("files", {}).items():
        if sizes.get(name) != size:
            found = "missing" if name not in sizes else f"{sizes[name]} bytes, expected {size}"
            raise GistRayError(
                f"checkpoint {where} is corrupt or truncated: {name} is {found}; "
                "rerun with --fresh to start over"
            )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_meta(directory: str | Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Validate a local checkpoint folder from its manifest; returns the manifest."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise GistRayError(
            f"checkpoint {directory} is incomplete: {META_FILE} is missing; "
            "rerun with --fresh to start over"
        )
    meta = parse_meta(meta_path.read_bytes(), str(directory))
    check_meta(meta, expect, _file_sizes(directory), str(directory))
    return meta


def load_checkpoint(directory: str | Path, expect: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Read and check a checkpoint; ``expect`` is :func:`identity` of this run.
    Returns the model folder and the state dict."""
    directory = Path(directory)
    read_meta(directory, expect)
    state_path = directory / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        raise GistRayError(
            f"checkpoint {state_path} is corrupt or truncated ({type(e).__name__}); "
            "rerun with --fresh to start over"
        ) from e
    _check_format(state, str(state_path))
    return directory / CHECKPOINT_MODEL_DIR, state


# ----------------------------------------------------------------------------- during training


class Reporter(Protocol):
    """Where a worker sends metrics and checkpoints (Ray Train, or a local folder). A checkpoint
    reported with ``validate`` is evaluated by the reporter's validation (eval during
    training); the loop itself never evaluates."""

    def report(
        self, metrics: dict[str, float], checkpoint_dir: str | None, validate: bool = False
    ) -> None: ...

    def latest_checkpoint(self) -> AbstractContextManager[str | None]:
        """A context giving the local folder of the checkpoint to resume from (None: none);
        a folder downloaded for it is removed when the context ends."""
        ...


class LocalReporter:
    """Keeps checkpoints under ``<output_dir>/checkpoints`` (runs without Ray). With a
    ``validator`` (e.g. :class:`gist_ray.train.evaluation.TrainingEval`), rank 0 has each
    checkpoint reported with ``validate`` evaluated, as Ray Train's validation task does."""

    def __init__(
        self, output_dir: str | Path, validator: Callable[[Path], object] | None = None
    ) -> None:
        if storage.is_remote(str(output_dir)):  # Path() would make a local folder named s3:
            raise GistRayError(
                f"output_dir = {str(output_dir)!r}: a run without Ray keeps its checkpoints on "
                "a local disk; give a local output_dir (Ray Train writes them to object storage)"
            )
        self.root = Path(output_dir) / "checkpoints"
        self.validator = validator

    def report(
        self, metrics: dict[str, float], checkpoint_dir: str | None, validate: bool = False
    ) -> None:
        if checkpoint_dir and rank() == 0:
            target = self.root / Path(checkpoint_dir).name
            if Path(checkpoint_dir).resolve() != target.resolve():
                fileio.move_dir(checkpoint_dir, target)  # no second copy left in staging
            if validate and self.validator is not None:
                self.validator(target)

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        found = sorted(self.root.glob("checkpoint-*")) if self.root.is_dir() else []
        yield str(found[-1]) if found else None


@dataclass
class TrainState:
    """Everything that moves during training besides the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    run_id: str | None  # the MLflow run the steps are logged to
    step: int = 0  # optimizer steps taken; also fixes the data position
    # Rank 0: (step, metrics) of steps not yet logged to MLflow. They are logged only once a
    # checkpoint covering them is committed, so a replayed step is never logged twice.
    pending: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    # Other trained state with state_dict/load_state_dict (the EMA self-guide), by name
    parts: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """Saves and restores the student and a :class:`TrainState` through a Reporter. ``save`` is
    collective (every rank calls it); rank 0 writes."""

    def __init__(self, cfg: Config, reporter: Reporter) -> None:
        self.cfg, self.reporter = cfg, reporter
        self.identity = identity(cfg)
        self.staging = staging_dir(cfg.output_dir)
        if rank() == 0:  # a worker killed mid-save leaves a half-written folder here
            shutil.rmtree(self.staging, ignore_errors=True)
        self._saved_at = time.monotonic()

    def close(self) -> None:
        """After the last step: the staging folder goes once it is empty (every checkpoint
        reported has left it)."""
        if rank() == 0:
            try:
                self.staging.rmdir()
            except OSError:  # absent, or still holding something
                pass

    def due(self, step: int, total: int) -> bool:
        """Every ``train.checkpoint_every`` steps, at the end, and once ``train.checkpoint_minutes``
        have passed since the last save. Collective: every rank calls it after every step."""
        if step % self.cfg.train.checkpoint_every == 0 or step == total:
            return True
        minutes = self.cfg.train.checkpoint_minutes
        if minutes <= 0:
            return False
        late = time.monotonic() - self._saved_at >= minutes * 60
        if is_distributed():  # the save is collective: rank 0's clock decides for every rank
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([int(late)], device=device)
            dist.broadcast(flag, src=0)
            late = bool(flag.item())
        return late

    def restore(self, state: TrainState, student) -> bool:
        """Load the latest checkpoint into ``state`` and ``student``; False when there is none."""
        with self.reporter.latest_checkpoint() as latest:  # a download is removed after
            if not latest:
                return False
            model_dir, saved = load_checkpoint(latest, self.identity)
            student.load_weights(model_dir)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.step = saved["step"]
        state.run_id = state.run_id or saved.get("mlflow_run_id")
        state.pending = saved.get("pending_metrics", [])
        for name, part in state.parts.items():
            part.load_state_dict(saved["parts"][name])
        rngs, world = saved["rng"], world_size()
        if len(rngs) != world:
            log.warning(
                "checkpoint has %d RNG states for %d workers; dropout will not replay exactly",
                len(rngs),
                world,
            )
        set_rng_state(rngs[rank() % len(rngs)])  # each rank continues its own dropout stream
        log.info("resumed from %s at step %d", latest, state.step)
        return True

    def save(
        self, state: TrainState, student, metrics: dict[str, float], validate: bool = False
    ) -> None:
        """Checkpoint ``state``; returns once the checkpoint is committed (a restart would resume
        from it). ``validate``: the reporter evaluates it beside training."""
        rngs: list[Any] = [None] * world_size()  # every rank's, so dropout replays on resume
        if is_distributed():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        path = None
        if rank() == 0:
            path = save_checkpoint(
                self.staging / f"checkpoint-{state.step:07d}",
                student,
                {
                    "optimizer": state.optimizer.state_dict(),
                    "scheduler": state.scheduler.state_dict(),
                    "step": state.step,
                    "rng": rngs,
                    "mlflow_run_id": state.run_id,
                    "pending_metrics": state.pending,
                    "parts": {name: part.state_dict() for name, part in state.parts.items()},
                    "identity": self.identity,
                    "config": self.cfg.to_dict(),
                },
            )
        self.reporter.report(metrics, str(path) if path else None, validate)
        self._saved_at = time.monotonic()
