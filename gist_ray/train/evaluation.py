"""Evaluation during training: every ``eval.every`` steps rank 0 measures retrieval on the eval
set, logs ``eval/<metric>`` on the step axis and keeps the best model so far in
``<output_dir>/best-model`` (a sentence-transformers folder) with ``best-model.json`` beside it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_ray.eval.metrics import evaluate_model
from gist_ray.models.best import read_best, save_best

if TYPE_CHECKING:
    from gist_ray.config import Config
    from gist_ray.models.encoder import Encoder

log = logging.getLogger(__name__)


def eval_due(cfg: Config, step: int, total: int) -> bool:
    """Whether the training loop evaluates after ``step`` (the same answer on every rank).

    The final step is left to the driver, which evaluates the exported model anyway."""
    ev = cfg.eval
    return bool(ev.source) and ev.every > 0 and step % ev.every == 0 and step < total


class TrainingEval:
    """Rank 0's periodic eval; returns the metrics (the loop logs them with the step's). A
    resumed run keeps its best so far (from best-model.json)."""

    def __init__(self, cfg: Config, run_id: str | None = None) -> None:
        from gist_ray.eval.sets import load_eval_for

        self.evalset = load_eval_for(cfg)
        self.metric, self.run_id = cfg.eval.metric, run_id
        self.dims = list(cfg.loss.matryoshka_dims)  # retrieval at each width too
        self.output_dir = Path(cfg.output_dir)
        self.best = read_best(self.output_dir, run_id)

    def __call__(self, student: Encoder, step: int) -> dict[str, float]:
        # At the model's own settings (its max length and prompts), as before and after training.
        metrics = evaluate_model(student, self.evalset, self.dims)
        value = metrics[self.metric]
        improved = math.isfinite(value) and (self.best is None or value > self.best["value"])
        if improved:
            self.best = {"step": step, "metric": self.metric, "value": value}
            save_best(self.output_dir, {**self.best, "run_id": self.run_id}, student.save)
        note = "best so far, saved" if improved else ""
        if not improved and self.best is not None:
            note = f"best {self.best['value']:.4f} at step {self.best['step']}"
        log.info("eval step %d: %s %.4f%s", step, self.metric, value, f" ({note})" if note else "")
        return metrics


def score_key(cfg: Config) -> str:
    """The metric Ray Train's checkpoint scoring ranks validated checkpoints by."""
    return f"eval/{cfg.eval.metric}"


def validate_checkpoint(
    checkpoint: Any, config: dict[str, Any], run_id: str, tracking_uri: str
) -> dict[str, float]:
    """Ray Train's validation function (a task beside the training workers): the retrieval
    metrics of a checkpoint's model at its own settings, logged to MLflow on the checkpoint's
    step unless that step already holds them (a validation repeated after a restart logs
    nothing twice). Returns ``{"eval/<metric>": value}``, which Ray attaches to the
    checkpoint and scores it by."""
    from gist_ray.config import load_config_dict
    from gist_ray.core import log as console_log
    from gist_ray.eval.sets import load_eval_for
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import user_spec
    from gist_ray.train.checkpoint import CHECKPOINT_MODEL_DIR, META_FILE

    console_log.configure()
    cfg = load_config_dict(config)
    with checkpoint.as_directory() as folder:
        step = int(json.loads((Path(folder) / META_FILE).read_text())["step"])
        model = load_encoder(user_spec(cfg, str(Path(folder) / CHECKPOINT_MODEL_DIR)), frozen=True)
        evalset = load_eval_for(cfg)
        found = evaluate_model(model, evalset, cfg.loss.matryoshka_dims)
        metrics = {f"eval/{k}": v for k, v in found.items()}
    if run_id and tracking_uri:
        from gist_ray.tracking.runs import log_once

        log_once(tracking_uri, run_id, metrics, step)
    log.info("eval step %d: %s %.4f", step, cfg.eval.metric, metrics[score_key(cfg)])
    return metrics
