"""``gist-ray train`` on the driver: validate inputs, evaluate the base model, train on Ray,
export and evaluate the trained model, and log everything to one MLflow run."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gist_ray.config import SELF, Config, validate_loss_for
from gist_ray.core.errors import ConfigError, GistRayError
from gist_ray.launch.paths import check_job_paths

log = logging.getLogger(__name__)

EVAL_KEYS = ("ndcg@10", "recall@10", "mrr@10")


def _absolutize(cfg: Config) -> Config:
    """Ray workers run elsewhere (another cwd, maybe another node): make local paths absolute."""
    from gist_ray.config import map_sources

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path.resolve()) if value and path.exists() else value

    cfg = dataclasses.replace(cfg)
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    cache_dir = cfg.data.guide_cache_dir
    cfg.data = dataclasses.replace(
        cfg.data,
        train=map_sources(cfg.data.train, absolute),
        guide_cache_dir=str(Path(cache_dir).expanduser().resolve()) if cache_dir else "",
    )
    cfg.eval = dataclasses.replace(cfg.eval, source=absolute(cfg.eval.source))
    guide = cfg.model.guide if cfg.model.guide == SELF else absolute(cfg.model.guide)
    cfg.model = dataclasses.replace(cfg.model, student=absolute(cfg.model.student), guide=guide)
    return cfg


@dataclass
class _Run:
    run_id: str
    resumed: bool  # an existing MLflow run continues
    complete: bool  # its checkpoint already holds every step: nothing to train
    found: Any  # resume.FoundCheckpoint or None
    before: dict[str, float]  # eval-before metrics the run already holds


def _open_run(cfg: Config, tracking_uri: str, steps: int) -> _Run:
    """A new MLflow run, or, when ``mlflow.run_name`` names an existing one, that run resumed
    from its latest checkpoint under ``ray.storage_path/run_name`` (refusing a mismatch)."""
    from gist_ray.launch import resources, resume
    from gist_ray.tracking import runs as tracking

    tags = {
        "student": cfg.model.student,
        "guide": cfg.model.guide,
        "global_batch": str(cfg.train.batch_size),
        "world_size": str(cfg.ray.num_workers),
        "gist_ray.command": "train",
    }
    name, exp = cfg.mlflow.run_name, cfg.mlflow.experiment
    found = resume.find_checkpoint(cfg, name) if name else None
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
            f"but {resources.storage_path(cfg)}/{name} holds no checkpoint of it; set "
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
    from gist_ray.eval.metrics import evaluate_model
    from gist_ray.launch import cluster, guide_job, resources, resume, trainer
    from gist_ray.models.encoder import export_model, load_encoder
    from gist_ray.models.lora import merge_adapter
    from gist_ray.models.spec import user_spec
    from gist_ray.tracking import datasets, results, runs
    from gist_ray.train.checkpoint import CHECKPOINT_MODEL_DIR

    t0 = time.perf_counter()
    check_job_paths(cfg, runs.resolve_tracking_uri(cfg.mlflow.tracking_uri))
    cfg = _absolutize(cfg)
    inputs = _check_inputs(cfg)  # fail on bad data or models before any cluster starts
    evalset = inputs.evalset
    tracking_uri = runs.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    cluster.connect(cfg)
    resources.check_resources(cfg)
    run = _open_run(cfg, tracking_uri, inputs.steps)
    guide_caches = None if run.complete else guide_job.prepare_guide_cache(cfg, inputs.sets)
    datasets.log_training_data(tracking_uri, run.run_id, inputs.sets)
    before = run.before
    if evalset is not None and not before:
        log.info(
            "evaluating %s before training (%d queries, %d documents)",
            cfg.model.student,
            len(evalset.queries),
            len(evalset.corpus),
        )
        base = load_encoder(user_spec(cfg, cfg.model.student, cfg.model.revision), frozen=True)
        before = evaluate_model(base, evalset, cfg.loss.matryoshka_dims)
    # A resumed run keeps its summary metrics: they must not gain a second value.
    logger = runs.RunLogger(tracking_uri, run.run_id, skip_logged=run.resumed)
    logger.log_metrics({f"eval/before/{k}": v for k, v in before.items()}, step=0)
    monitor = runs.start_system_metrics(tracking_uri, run.run_id)
    runs.log_config(tracking_uri, run.run_id, cfg.to_yaml())
    try:
        final_ckpt = (
            resume.export_checkpoint(cfg, run.found.checkpoint)
            if run.complete
            else trainer.run_training(cfg, run.run_id, tracking_uri, guide_caches)
        )
        trained = load_encoder(user_spec(cfg, str(final_ckpt / CHECKPOINT_MODEL_DIR)), frozen=True)
        merged = cfg.model.lora.rank > 0 and cfg.model.lora_export == "merged"
        if merged:  # evaluate and export the model the user gets: the adapter merged in
            merge_adapter(trained.model)
        after = evaluate_model(trained, evalset, cfg.loss.matryoshka_dims) if evalset else {}
        card = _model_card(cfg, inputs, trained, before, after)
        model_dir = export_model(
            final_ckpt / CHECKPOINT_MODEL_DIR,
            cfg.output_dir,
            card,
            trained.model if merged else None,
        )
        final = results.log_results(
            cfg, tracking_uri, run.run_id, model_dir, inputs.steps, before, after, evalset
        )
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


@dataclass
class _Inputs:
    steps: int
    evalset: Any  # EvalSet or None
    sets: list  # gist_ray.data.training.TrainingSet


def _check_inputs(cfg: Config) -> _Inputs:
    """Load the data, both models and the eval set once on the driver, so bad input (data,
    models, prompts naming columns the data lacks, a batch the data cannot fill) fails in
    seconds, before any cluster starts."""
    from gist_ray.data.batches import GlobalBatches
    from gist_ray.data.training import load_training_sets
    from gist_ray.eval.sets import load_eval_for
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.loading import load_model
    from gist_ray.models.lora import prepare_student
    from gist_ray.models.prompts import guide_prompts, student_prompts
    from gist_ray.models.spec import ModelSpec

    sets = load_training_sets(cfg)
    guide_prompts(cfg, sets)
    batches = GlobalBatches.for_config(cfg, sets)
    student = load_encoder(ModelSpec.student(cfg))
    prepare_student(student.model, cfg)  # LoRA target modules that match nothing, no peft
    student_prompts(cfg, sets, student.model.prompts)
    validate_loss_for(cfg, student.dim, max(len(s.columns) - 2 for s in sets))
    if cfg.model.guide != SELF:
        load_model(ModelSpec.guide(cfg))
    return _Inputs(batches.total_steps(cfg), load_eval_for(cfg), sets)


def _model_card(cfg: Config, inputs: _Inputs, trained, before, after) -> str:
    from gist_ray.models.card import CardInfo, render_card
    from gist_ray.models.encoder import describe

    model = describe(trained)
    model["train_max_seq_length"] = cfg.model.max_seq_length or trained.own_max_seq_length
    ev = inputs.evalset
    info = CardInfo(
        model=model,
        rows={s.name: s.rows for s in inputs.sets},
        steps=inputs.steps,
        world_size=cfg.ray.num_workers,
        eval_name=ev.name if ev is not None else "",
        eval_size=f"{len(ev.queries)} queries, {len(ev.corpus):,} documents" if ev else "",
        before=before,
        after=after,
    )
    return render_card(cfg, info)


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


def cache_guide(cfg: Config) -> list[str]:
    """``gist-ray cache-guide``: validate the data, then build the guide cache as a Ray Data
    job (or load it, when it is complete). Returns the cache folders."""
    from gist_ray.data.training import load_training_sets
    from gist_ray.launch import cluster, guide_job, resources
    from gist_ray.models.prompts import guide_prompts

    if cfg.model.guide == SELF and cfg.model.self_guide == "ema":
        raise ConfigError(
            "model.self_guide = ema: the guide changes every step, so there is nothing to cache; "
            "cache-guide needs another model.guide or model.self_guide: frozen"
        )
    check_job_paths(cfg, "")
    cfg = _absolutize(cfg)
    cfg.data = dataclasses.replace(cfg.data, guide_cache=True)
    sets = load_training_sets(cfg)
    guide_prompts(cfg, sets)
    cluster.connect(cfg)
    resources.check_resources(cfg)
    folders = guide_job.prepare_guide_cache(cfg, sets)
    log.info("guide cache ready; `gist-ray train` with the same data and guide uses it")
    for s, folder in zip(sets, folders):
        print(f"{s.name}: {folder}")
    return folders
