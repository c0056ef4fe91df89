"""Evaluation during training, one path: every ``eval.every`` steps the loop writes a checkpoint
marked for validation, and the reporter has its model evaluated on the eval set at the model's
own settings (:func:`evaluate_checkpoint`), ``eval/<metric>`` logged once on the checkpoint's
step. Under Ray that is Ray Train's validation task (:func:`validate_checkpoint`), which ranks
the checkpoints for the best model; without Ray (``torchrun``, one process) the
:class:`LocalReporter`'s validator (:class:`TrainingEval`) does the same on rank 0 and keeps the
best model so far in ``<output_dir>/best-model`` as it goes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_ray.eval.metrics import evaluate_model
from gist_ray.models.best import copy_from, read_best, save_best
from gist_ray.train.checkpoint import CHECKPOINT_MODEL_DIR, META_FILE

if TYPE_CHECKING:
    from gist_ray.config import Config
    from gist_ray.eval.sets import EvalSet

log = logging.getLogger(__name__)


def eval_due(cfg: Config, step: int, total: int) -> bool:
    """Whether the training loop validates after ``step`` (the same answer on every rank).

    The final step is left to the driver, which evaluates the exported model anyway."""
    ev = cfg.eval
    return bool(ev.source) and ev.every > 0 and step % ev.every == 0 and step < total


def score_key(cfg: Config) -> str:
    """The metric validated checkpoints are ranked by."""
    return f"eval/{cfg.eval.metric}"


def evaluate_checkpoint(
    folder: str | Path, cfg: Config, evalset: EvalSet | None = None
) -> tuple[int, dict[str, float]]:
    """The step of a checkpoint folder and the retrieval metrics of its model, loaded as a user
    loads it (its own max length and prompts; at each Matryoshka width too)."""
    from gist_ray.eval.sets import load_eval_for
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import user_spec

    folder = Path(folder)
    step = int(json.loads((folder / META_FILE).read_text())["step"])
    model = load_encoder(user_spec(cfg, str(folder / CHECKPOINT_MODEL_DIR)), frozen=True)
    evalset = evalset if evalset is not None else load_eval_for(cfg)
    return step, evaluate_model(model, evalset, cfg.loss.matryoshka_dims)


def _log_metrics(run_id: str | None, tracking_uri: str | None, metrics: dict, step: int) -> None:
    if run_id and tracking_uri:
        from gist_ray.tracking.runs import log_once

        log_once(tracking_uri, run_id, {f"eval/{k}": v for k, v in metrics.items()}, step)


class TrainingEval:
    """The validator of a run without Ray: evaluates a checkpoint folder, logs its metrics once
    on its step, and keeps the best model so far (a resumed run keeps its best, from
    ``best-model.json``). Returns the metrics."""

    def __init__(
        self, cfg: Config, run_id: str | None = None, tracking_uri: str | None = None
    ) -> None:
        from gist_ray.eval.sets import load_eval_for

        self.cfg, self.run_id, self.tracking_uri = cfg, run_id, tracking_uri
        self.evalset = load_eval_for(cfg)
        self.metric = cfg.eval.metric
        self.output_dir = cfg.output_dir  # a path or a URI
        self.best = read_best(self.output_dir, run_id)

    def __call__(self, folder: str | Path) -> dict[str, float]:
        step, metrics = evaluate_checkpoint(folder, self.cfg, self.evalset)
        _log_metrics(self.run_id, self.tracking_uri, metrics, step)
        value = metrics[self.metric]
        improved = math.isfinite(value) and (self.best is None or value > self.best["value"])
        if improved:
            self.best = {"step": step, "metric": self.metric, "value": value}
            info = {**self.best, "run_id": self.run_id}
            save_best(self.output_dir, info, copy_from(Path(folder) / CHECKPOINT_MODEL_DIR))
        note = "best so far, saved" if improved else ""
        if not improved and self.best is not None:
            note = f"best {self.best['value']:.4f} at step {self.best['step']}"
        log.info("eval step %d: %s %.4f%s", step, self.metric, value, f" ({note})" if note else "")
        return metrics


def validate_checkpoint(
    checkpoint: Any, config: dict[str, Any], run_id: str, tracking_uri: str
) -> dict[str, float]:
    """Ray Train's validation function (a task beside the training workers): the metrics of a
    checkpoint's model, logged to MLflow on the checkpoint's step unless that step already holds
    them (a validation repeated after a restart logs nothing twice). Returns
    ``{"eval/<metric>": value}``, which Ray attaches to the checkpoint and ranks it by."""
    from gist_ray.config import load_config_dict
    from gist_ray.core import log as console_log

    console_log.configure()
    cfg = load_config_dict(config)
    with checkpoint.as_directory() as folder:
        step, found = evaluate_checkpoint(folder, cfg)
    _log_metrics(run_id, tracking_uri, found, step)
    metrics = {f"eval/{k}": v for k, v in found.items()}
    log.info("eval step %d: %s %.4f", step, cfg.eval.metric, metrics[score_key(cfg)])
    return metrics
