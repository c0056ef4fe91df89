"""The best model of a run by ``eval.metric``: ``<output_dir>/best-model`` (a sentence-transformers
folder) and its record ``best-model.json`` beside it (``{"step", "metric", "value",
"run_id"}``). The one place that writes them, whoever found the best step: rank 0's eval during
training, Ray Train's checkpoint scoring, or the driver when the exported model is the best."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gist_ray.core import fileio

BEST_DIR = "best-model"
BEST_INFO = "best-model.json"


def best_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / BEST_DIR


def read_best(output_dir: str | Path, run_id: str | None) -> dict[str, Any] | None:
    """The best-model record of this run, or None (no record, or another run's)."""
    try:
        info = json.loads((Path(output_dir) / BEST_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("run_id") == run_id else None


def save_best(output_dir: str | Path, info: dict[str, Any], write: Callable[[Path], Any]) -> Path:
    """Write the best model with ``write(folder)`` into a temporary folder that then replaces
    ``best-model/``, and only then its record: a record never names a half-written model."""
    with fileio.atomic_dir(best_dir(output_dir)) as tmp:
        write(tmp)
    fileio.write_json(Path(output_dir) / BEST_INFO, info)
    return best_dir(output_dir)


def copy_from(folder: str | Path) -> Callable[[Path], Any]:
    """A ``write`` for :func:`save_best` that copies a saved model folder."""
    import shutil

    return lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True)
