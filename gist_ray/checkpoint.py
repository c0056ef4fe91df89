"""Training checkpoints: the student (sentence-transformers folder) plus optimizer, scheduler,
step, RNG states and the MLflow run id. Written under a temporary name, renamed when complete."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gist_ray.errors import GistRayError

STATE_FILE = "state.pt"
MODEL_DIR = "model"
FORMAT_VERSION = 1


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


def save_checkpoint(directory: str | Path, student, state: dict[str, Any]) -> Path:
    """Write ``directory`` atomically: build it beside the target, then rename."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        student.save(tmp / MODEL_DIR)
        torch.save({"format": FORMAT_VERSION, **state}, tmp / STATE_FILE)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | Path, expect: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Read and check a checkpoint; ``expect`` holds identity fields (student, guide, ...) that
    must match. Returns the model folder and the state dict."""
    directory = Path(directory)
    state_path, model_dir = directory / STATE_FILE, directory / MODEL_DIR
    if not state_path.is_file() or not model_dir.is_dir():
        raise GistRayError(
            f"checkpoint {directory} is incomplete: missing {STATE_FILE} or {MODEL_DIR}/"
        )
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated or foreign files raise many types
        raise GistRayError(
            f"checkpoint {state_path} is corrupt or truncated ({type(e).__name__}); "
            "delete it or point to another checkpoint"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise GistRayError(
            f"checkpoint {state_path} has an unknown format; it was not written by "
            f"this version of gist-ray"
        )
    for key, want in expect.items():
        got = state.get("identity", {}).get(key)
        if got != want:
            raise GistRayError(
                f"checkpoint {directory} is incompatible: it was written with {key} = {got!r}, "
                f"this run has {want!r}; use another output_dir or run name"
            )
    return model_dir, state
