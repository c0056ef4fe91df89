"""``gist-ray train`` on the driver: validate inputs, evaluate the base model, train on Ray,
export and evaluate the trained model, and log everything to one MLflow run."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gist_ray.config import Config, validate_loss_for
from gist_ray.errors import GistRayError
from gist_ray.paths import check_job_paths

log = logging.getLogger(__name__)

EVAL_KEYS = ("ndcg@10", "recall@10", "mrr@10")


def _absolutize(cfg: Config) -> Config:
    """Ray workers run elsewhere (another cwd, maybe another node): make local paths absolute."""
    cfg = dataclasses.replace(cfg)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    for section, key in (
        ("data", "train"),
        ("eval", "source"),
        ("model", "student"),
        ("model", "guide"),
    ):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and Path(value).expanduser().exists():
            setattr(obj, key, str(Path(value).expanduser().resolve()))
    return cfg


def evaluate_model(model: str, cfg: Config, evalset) -> dict[str, float]:
    from gist_ray.eval.metrics import retrieval_metrics
    from gist_ray.models import load_encoder

    enc = load_encoder(model, cfg.model.pooling, cfg.model.max_seq_length)
    encode = lambda texts: enc.encode(texts, batch_size=64)  # noqa: E731
    return retrieval_metrics(encode, evalset, dims=cfg.loss.matryoshka_dims)


@dataclass
class _Run:
    run_id: str
    resumed: bool  # an existing MLflow run continues
    complete: bool  # its checkpoint already holds every step: nothing to train
    found: Any  # launcher.FoundCheckpoint or None
    before: dict[str, float]  # eval-before metrics the run already holds


def _open_run(cfg: Config, tracking_uri: str, steps: int) -> _Run:
    """A new MLflow run, or, when ``mlflow.run_name`` names an existing one, that run resumed
    from its latest checkpoint under ``ray.storage_path/run_name`` (refusing a mismatch)."""
    from gist_ray import launcher
    from gist_ray.tracking import runs as tracking

    tags = {
        "student": cfg.model.student,
        "guide": cfg.model.guide,
        "global_batch": str(cfg.train.batch_size),
        "world_size": str(cfg.ray.num_workers),
        "gist_ray.command": "train",
    }
    name, exp = cfg.mlflow.run_name, cfg.mlflow.experiment
    found = launcher.find_checkpoint(cfg, name) if name else None
    existing = tracking.find_run(tracking_uri, exp, name) if name else None
    if found is not None and (existing is None or existing.run_id != found.mlflow_run_id):
        raise GistRayError(
            f"{found.where} is a checkpoint (step {found.step}) of MLflow run "
            f"{found.mlflow_run_id}, but experiment {exp!r} in {tracking_uri} has "
            f"{'no' if existing is None else 'another'} run named {name!r}; point "
            "mlflow.tracking_uri / mlflow.experiment at the original store, or use another "
            "mlflow.run_name"
        )
    if found is None and existing is not None and existing.last_step > 0:
        raise GistRayError(
            f"MLflow run {name!r} ({existing.run_id}) already logged {existing.last_step} steps "
            f"but {launcher.storage_path(cfg)}/{name} holds no checkpoint of it; set "
            "ray.storage_path to where its checkpoints are, or use another mlflow.run_name"
        )
    if existing is None:
        run_id = tracking.start_run(
            tracking_uri, exp, name, cfg.flat(), tags, cfg.mlflow.artifact_location
        )
        return _Run(run_id, False, False, None, {})

    tracking.reopen_run(tracking_uri, existing.run_id, cfg.flat(), tags)
    done = found.step if found else 0
    complete = found is not None and found.step >= steps
    log.info(
        "MLflow run %r (%s, was %s): %s",
        name,
        existing.run_id,
        existing.status,
        f"already complete ({done}/{steps} steps); not training again, exporting its model"
        if complete
        else f"resuming at step {done}/{steps}",
    )
    prefix = "eval/before/"
    before = {
        k[len(prefix) :].replace("_at_", "@"): v
        for k, v in existing.metrics.items()
        if k.startswith(prefix)
    }
    return _Run(existing.run_id, True, complete, found, before)


def train(cfg: Config) -> dict[str, Any]:
    """Run the whole ``train`` command; returns paths, run id and metrics."""
    from gist_ray import launcher
    from gist_ray.models import export_model
    from gist_ray.tracking import results, runs

    t0 = time.perf_counter()
    check_job_paths(cfg, runs.resolve_tracking_uri(cfg.mlflow.tracking_uri))
    cfg = _absolutize(cfg)
    steps, evalset = _check_inputs(cfg)  # fail on bad data or models before any cluster starts
    tracking_uri = runs.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    launcher.connect(cfg)
    launcher.check_resources(cfg)
    run = _open_run(cfg, tracking_uri, steps)
    before = run.before
    if evalset is not None and not before:
        log.info(
            "evaluating %s before training (%d queries, %d documents)",
            cfg.model.student,
            len(evalset.queries),
            len(evalset.corpus),
        )
        before = evaluate_model(cfg.model.student, cfg, evalset)
    # A resumed run keeps its summary metrics: they must not gain a second value.
    logger = runs.RunLogger(tracking_uri, run.run_id, skip_logged=run.resumed)
    logger.log_metrics({f"eval/before/{k}": v for k, v in before.items()}, step=0)
    monitor = runs.start_system_metrics(tracking_uri, run.run_id)
    runs.log_config(tracking_uri, run.run_id, cfg.to_yaml())
    try:
        final_ckpt = (
            launcher.export_checkpoint(cfg, run.found.checkpoint)
            if run.complete
            else launcher.run_training(cfg, run.run_id, tracking_uri)
        )
        model_dir = export_model(final_ckpt / "model", cfg.output_dir)
        after = evaluate_model(str(model_dir), cfg, evalset) if evalset is not None else {}
        logger.log_metrics({f"eval/after/{k}": v for k, v in after.items()}, step=0)
        final = results.finish(cfg, tracking_uri, run.run_id, model_dir, steps, before, after)
        wall = time.perf_counter() - t0
        logger.log_metrics({"wall_time_s": wall}, step=0)
        runs.stop_system_metrics(monitor)
        logger.set_terminated("FINISHED")
    except BaseException:
        runs.stop_system_metrics(monitor)
        logger.set_terminated("FAILED")
        raise
    _print_summary(cfg, evalset, before, after, model_dir, run.run_id, tracking_uri, final, wall)
    return {
        "model_dir": str(model_dir),
        "run_id": run.run_id,
        "tracking_uri": tracking_uri,
        "before": before,
        "after": after,
        "wall_time_s": wall,
        "final": final,
    }


def _check_inputs(cfg: Config) -> tuple[int, Any]:
    """Load the data, both models and the eval set once on the driver, so bad input fails in
    seconds; returns the number of training steps and the eval set (or None)."""
    from gist_ray.batches import GlobalBatches
    from gist_ray.data import load_training_data, negative_columns
    from gist_ray.eval.sets import load_eval_for
    from gist_ray.models import load_encoder

    data = load_training_data(cfg)
    batches = GlobalBatches.for_config(cfg, len(data))
    m = cfg.model
    student = load_encoder(m.student, m.pooling, m.max_seq_length)
    validate_loss_for(cfg, student.dim, len(negative_columns(data)))
    load_encoder(m.guide, m.guide_pooling, m.max_seq_length, key="model.guide")
    return batches.total_steps(cfg), load_eval_for(cfg)


def _print_summary(cfg, evalset, before, after, model_dir, run_id, tracking_uri, final, wall):
    """The command's result, on stdout."""
    from gist_ray.tracking.runs import ui_command

    print()
    if evalset is not None:
        print(
            f"Retrieval on {evalset.name} ({len(evalset.queries)} held-out queries, "
            f"{len(evalset.corpus)} documents):"
        )
        print(f"{'metric':<12}{'before':>10}{'after':>10}{'change':>10}")
        for k in EVAL_KEYS:
            print(f"{k:<12}{before[k]:>10.4f}{after[k]:>10.4f}{after[k] - before[k]:>+10.4f}")
    print(f"\nmodel:       {model_dir}")
    print(f"MLflow run:  {run_id} (experiment {cfg.mlflow.experiment!r}, store {tracking_uri})")
    print(f"MLflow UI:   {ui_command(tracking_uri)}")
    print("\n".join(final.lines()))
    print(f"wall time:   {wall / 60:.1f} min")


def cache_guide(cfg: Config) -> None:
    """``gist-ray cache-guide``: validate the data, then build the guide cache on Ray."""
    from gist_ray import launcher
    from gist_ray.data import load_training_data

    check_job_paths(cfg, "")
    cfg = _absolutize(cfg)
    load_training_data(cfg)
    launcher.connect(cfg)
    launcher.check_resources(cfg)
    launcher.run_cache_guide(cfg)
    log.info("guide cache ready; `gist-ray train` with the same data and guide uses it")
