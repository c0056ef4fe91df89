"""The best model of a run by ``eval.metric``: ``<output_dir>/best-model`` (a sentence-transformers
folder) and its record ``best-model.json`` beside it (``{"step", "metric", "value",
"run_id"}``). The one place that writes them, whoever found the best step: rank 0's eval during
training, Ray Train's checkpoint scoring, or the driver when the exported model is the best.
``output_dir`` may be a URI (``s3://…``): the model is then written in a local temporary folder
and uploaded at each update."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gist_ray.core import fileio, storage

BEST_DIR = "best-model"
BEST_INFO = "best-model.json"


def best_dir(output_dir: str | Path) -> str:
    """Where the best model is: a path, or a URI."""
    return storage.join(str(output_dir), BEST_DIR)


def read_best(output_dir: str | Path, run_id: str | None) -> dict[str, Any] | None:
    """The best-model record of this run, or None (no record, or another run's)."""
    where = storage.join(str(output_dir), BEST_INFO)
    try:
        if storage.kind(where) != "file":
            return None
        info = json.loads(storage.read_text(where))
    except (OSError, ValueError, storage.StorageError):
        return None
    return info if isinstance(info, dict) and info.get("run_id") == run_id else None


def save_best(output_dir: str | Path, info: dict[str, Any], write: Callable[[Path], Any]) -> str:
    """Write the best model with ``write(folder)`` into a temporary folder that then replaces
    ``best-model/``, and only then its record: a record never names a half-written model (on
    object storage the old record goes first, then the old model, then the new model is
    uploaded and the new record written)."""
    output_dir = str(output_dir)
    target = best_dir(output_dir)
    record = storage.join(output_dir, BEST_INFO)
    if not storage.is_remote(output_dir):
        with fileio.atomic_dir(storage.local_path(target)) as tmp:
            write(tmp)
        storage.write_json(record, info)
        return target
    with tempfile.TemporaryDirectory(prefix="gist-ray-best-") as tmp:
        write(Path(tmp))
        storage.remove(record)
        storage.remove(target)
        storage.upload(tmp, target)
    storage.write_json(record, info)
    return target


def copy_from(folder: str | Path) -> Callable[[Path], Any]:
    """A ``write`` for :func:`save_best` that copies a saved model folder."""
    import shutil

    return lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True)
