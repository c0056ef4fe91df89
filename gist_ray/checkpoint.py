"""Training checkpoints: the student (sentence-transformers folder), optimizer, scheduler, step,
RNG states, unflushed metrics and the MLflow run id. Written under a temporary name and renamed
when complete.

``meta.json`` is a small manifest (format, step, MLflow run id, the config that fixes the
training trajectory, and the size of every file): the driver checks a checkpoint in remote
storage from it without downloading the weights, and a truncated file is caught by its size.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gist_ray.config import Config
from gist_ray.errors import GistRayError

STATE_FILE = "state.pt"
MODEL_DIR = "model"
META_FILE = "meta.json"
FORMAT_VERSION = 1

# Config keys a resumed run may change: they do not alter the training trajectory.
OPERATIONAL_KEYS = frozenset(
    {
        "data.guide_cache",
        "train.mini_batch_size",
        "train.checkpoint_every",
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
    """Write ``directory`` atomically: build it beside the target, then rename.

    ``state`` must hold ``step``, ``identity`` and ``mlflow_run_id`` (copied into meta.json)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        student.save(tmp / MODEL_DIR)
        torch.save({"format": FORMAT_VERSION, **state}, tmp / STATE_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "step": state["step"],
            "mlflow_run_id": state.get("mlflow_run_id"),
            "identity": state["identity"],
            "files": _file_sizes(tmp),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def parse_meta(text: str | bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise GistRayError(
            f"checkpoint {where} is corrupt: {META_FILE} is not valid JSON; "
            "delete the checkpoint or use another mlflow.run_name"
        ) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise GistRayError(
            f"checkpoint {where} has an unknown format (not written by this version of gist-ray); "
            "delete it or use another mlflow.run_name"
        )
    return meta


def check_meta(
    meta: dict[str, Any], expect: dict[str, Any], sizes: dict[str, int], where: str
) -> None:
    """Refuse a checkpoint of another config, or one whose files are missing or truncated."""
    written = meta.get("identity", {})
    for key, want in expect.items():
        got = written.get(key)
        if got != want:
            raise GistRayError(
                f"checkpoint {where} is incompatible: it was written with {key} = {got!r}, "
                f"this run has {want!r}; use another mlflow.run_name (or ray.storage_path), "
                "or rerun with the original config"
            )
    for name, size in meta.get("files", {}).items():
        if sizes.get(name) != size:
            found = "missing" if name not in sizes else f"{sizes[name]} bytes, expected {size}"
            raise GistRayError(
                f"checkpoint {where} is corrupt or truncated: {name} is {found}; "
                "delete it or use another mlflow.run_name"
            )


def read_meta(directory: str | Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Validate a local checkpoint folder from its manifest; returns the manifest."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise GistRayError(
            f"checkpoint {directory} is incomplete: {META_FILE} is missing; "
            "delete it or use another mlflow.run_name"
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
            "delete it or use another mlflow.run_name"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise GistRayError(
            f"checkpoint {state_path} has an unknown format; it was not written by "
            "this version of gist-ray"
        )
    return directory / MODEL_DIR, state
