"""``gist-ray train`` on the driver: validate inputs, evaluate the base model, train on Ray,
export and evaluate the trained model, and log everything to one MLflow run."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gist_ray.config import SELF, Config, validate_loss_for
from gist_ray.core import storage
from gist_ray.core.errors import ConfigError, Interrupted
from gist_ray.core.log import fmt_change
from gist_ray.core.outputs import Output
from gist_ray.launch.paths import check_command, check_job_paths

log = logging.getLogger(__name__)

EVAL_KEYS = ("ndcg@10", "recall@10", "mrr@10")


def _absolutize(cfg: Config) -> Config:
    """Ray workers run elsewhere (another cwd, maybe another node): make local paths absolute."""
    from gist_ray.config import map_sources

    def absolute(value: str) -> str:
        path = Path(value).expanduser()
        return str(path.resolve()) if value and path.exists() else value

    cfg = dataclasses.replace(cfg)
    cfg.output_dir = storage.absolute(cfg.output_dir)
    cache_dir = cfg.data.guide_cache_dir
    cfg.data = dataclasses.replace(
        cfg.data,
        train=map_sources(cfg.data.train, absolute),
        guide_cache_dir=storage.absolute(cache_dir) if cache_dir else "",  # a URI as it is
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
    name: str  # the run's folder under ray.storage_path


def _open_run(cfg: Config, tracking_uri: str, steps: int, fresh: bool = False) -> _Run:
    """The run this output folder holds (``run.json``; or, without one, the run called
    ``mlflow.run_name``) resumed from its latest checkpoint, refusing a checkpoint of another
    config; else a new run. ``fresh``: remove that run's checkpoints and start a new one."""
    from gist_ray.launch import resume
    from gist_ray.tracking import runs as tracking

    tags = {
        "student": cfg.model.student,
        "guide": cfg.model.guide,
        "global_batch": str(cfg.train.batch_size),
        "world_size": str(cfg.ray.num_workers),
        "gist_ray.command": "train",
    }
    exp = cfg.mlflow.experiment
    record = resume.read_record(cfg)
    if fresh:
        resume.discard(cfg, record)
        record = None
    name = record.ray_name if record else (None if fresh else cfg.mlflow.run_name)
    found = resume.find_checkpoint(cfg, name) if name else None
    done = found.step if found else 0
    existing = None  # the MLflow run to continue (one MLflow run per logical run)
    if found is not None and found.mlflow_run_id:
        existing = tracking.get_run(tracking_uri, found.mlflow_run_id)
        if existing is None:
            log.warning(
                "checkpoint %s belongs to MLflow run %s, which %s does not hold: the resumed run "
                "logs to a new MLflow run",
                found.where,
                found.mlflow_run_id,
                tracking_uri,
            )
    elif record is not None:  # stopped before its first checkpoint
        existing = tracking.get_run(tracking_uri, record.mlflow_run_id)
    elif name:
        existing = tracking.find_run(tracking_uri, exp, name)
    if existing is not None and existing.last_step > done:
        log.warning(
            "MLflow run %s logged %d steps but the latest checkpoint is at step %d: training "
            "from there as a new MLflow run",
            existing.run_id,
            existing.last_step,
            done,
        )
        existing = None
    complete = found is not None and found.step >= steps
    where = f"the run in {cfg.output_dir}"
    if complete:
        log.info(
            "%s is already complete (%d/%d steps, checkpoint %s): not training again, exporting "
            "its model (--fresh trains it again)",
            where,
            done,
            steps,
            found.where,
        )
    elif found is not None:
        log.info("resuming %s from step %d/%d (checkpoint %s)", where, done, steps, found.where)
    elif record is not None:
        log.info("%s stopped before its first checkpoint: training from step 0", where)
    if existing is None:
        run_id = tracking.start_run(
            tracking_uri, exp, cfg.mlflow.run_name, cfg.flat(), tags, cfg.mlflow.artifact_location
        )
        name = name or resume.run_dir_name(cfg, run_id)
        with tracking.failed_if_raises(tracking_uri, run_id):
            resume.write_record(cfg, resume.RunRecord(name, run_id))
        return _Run(run_id, False, complete, found, {}, name)

    tracking.reopen_run(tracking_uri, existing.run_id, cfg.flat(), tags)
    with tracking.failed_if_raises(tracking_uri, existing.run_id):
        resume.write_record(cfg, resume.RunRecord(name, existing.run_id))
    log.info("continuing MLflow run %s (was %s)", existing.run_id, existing.status)
    prefix = "eval/before/"
    before = {
        k[len(prefix) :].replace("_at_", "@"): v
        for k, v in existing.metrics.items()
        if k.startswith(prefix)
    }
    return _Run(existing.run_id, True, complete, found, before, name)


def train(cfg: Config, fresh: bool = False) -> dict[str, Any]:
    """Run the whole ``train`` command; returns paths, run id and metrics. The run this output
    folder holds is resumed unless ``fresh``."""
    from gist_ray.eval.metrics import evaluate_model
    from gist_ray.launch import cluster, guide_job, resources, resume, trainer
    from gist_ray.models.encoder import EXPORT_DIR, export_model, load_encoder
    from gist_ray.models.lora import merge_adapter
    from gist_ray.models.spec import user_spec
    from gist_ray.tracking import datasets, results, runs
    from gist_ray.train.checkpoint import CHECKPOINT_MODEL_DIR, staging_dir

    t0 = time.perf_counter()
    check_job_paths(cfg, runs.resolve_tracking_uri(cfg.mlflow.tracking_uri))
    check_command(cfg, "train")  # every storage location, before Ray and MLflow
    cfg = _absolutize(cfg)
    inputs = _check_inputs(cfg)  # fail on bad data or models before any cluster starts
    evalset = inputs.evalset
    tracking_uri = runs.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    cluster.connect(cfg)
    resources.check_resources(cfg)
    run = _open_run(cfg, tracking_uri, inputs.steps, fresh)  # a failure in it closes its run
    logger = None
    monitor = None
    out = Output(cfg.output_dir)  # the model and plots, uploaded when output_dir is a URI
    try:
        # A resumed run keeps its summary metrics: they must not gain a second value.
        logger = runs.RunLogger(tracking_uri, run.run_id, skip_logged=run.resumed)
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
        logger.log_metrics({f"eval/before/{k}": v for k, v in before.items()}, step=0)
        monitor = runs.start_system_metrics(tracking_uri, run.run_id)
        runs.log_config(tracking_uri, run.run_id, cfg.to_yaml())
        checkpoint = (
            run.found.checkpoint
            if run.complete
            else trainer.run_training(cfg, run.run_id, tracking_uri, run.name, guide_caches)
        )
        # The final checkpoint where it lies (a local storage path is not copied again; a
        # remote one is downloaded and the download removed after).
        with resume.local_checkpoint(checkpoint) as final_ckpt:
            spec = user_spec(cfg, str(final_ckpt / CHECKPOINT_MODEL_DIR))
            trained = load_encoder(spec, frozen=True)
            merged = cfg.model.lora.rank > 0 and cfg.model.lora_export == "merged"
            if merged:  # evaluate and export the model the user gets: the adapter merged in
                merge_adapter(trained.model)
            after = evaluate_model(trained, evalset, cfg.loss.matryoshka_dims) if evalset else {}
            card = _model_card(cfg, inputs, trained, before, after)
            model_dir = export_model(
                final_ckpt / CHECKPOINT_MODEL_DIR,
                out.local,
                card,
                trained.model if merged else None,
            )
        model_at = out.publish(EXPORT_DIR)
        final = results.log_results(
            cfg, tracking_uri, run.run_id, model_dir, inputs.steps, before, after, evalset, out=out
        )
        wall = time.perf_counter() - t0
        logger.log_metrics({"wall_time_s": wall}, step=0)
        runs.stop_system_metrics(monitor)
        logger.set_terminated("FINISHED")
    except KeyboardInterrupt as e:
        runs.end_run(tracking_uri, run.run_id, "KILLED")  # first: a SIGKILL may follow soon
        line = _stopped_at(cfg, run, fresh)
        with contextlib.suppress(OSError):  # left empty unless a save was under way
            staging_dir(cfg.output_dir).rmdir()
        raise Interrupted(line, getattr(e, "signum", None)) from e
    except BaseException:
        runs.end_run(tracking_uri, run.run_id, "FAILED")
        raise
    finally:
        runs.stop_system_metrics(monitor)
        out.close()
    disk = _disk_line(cfg, run.name, model_at)
    _print_summary(cfg, evalset, before, after, model_at, run.run_id, tracking_uri, final, wall)
    print(disk)
    return {
        "model_dir": model_at,
        "run_id": run.run_id,
        "tracking_uri": tracking_uri,
        "before": before,
        "after": after,
        "wall_time_s": wall,
        "final": final,
        "checkpoint": run.found.where if run.complete else str(checkpoint.path),
    }


def _stopped_at(cfg: Config, run: _Run, fresh: bool = False) -> str:
    """The interrupt's line: how far training got and where a rerun resumes (the same command
    without ``--fresh``, which would start over again)."""
    from gist_ray.launch import cluster, trainer

    saved = trainer.last_checkpoint_step(cfg, run.name)
    reached = max(cluster.last_reported_step() or 0, saved or 0)
    where = f"interrupted at step {reached}" if reached else "interrupted before training"
    again = "the same command without --fresh" if fresh else "the same command"
    if saved is None:
        return f"{where}; no checkpoint yet; rerun {again} to start again"
    return f"{where}; last checkpoint at step {saved}; rerun {again} to resume"


def _disk_line(cfg: Config, name: str, model_at: str) -> str:
    """What the run keeps on disk (or in object storage), and where: the output folder (model,
    best model, log) and the checkpoints (in it by default, else under ray.storage_path)."""
    from gist_ray.launch.resume import du, human_size, run_dir

    out = cfg.output_dir
    ckpts = run_dir(cfg, name)
    parts = [f"model {human_size(du(model_at))}"]
    total = du(out)
    if storage.kind(ckpts) == "dir":
        size = du(ckpts)
        parts.append(f"checkpoints {human_size(size)} in {ckpts}")
        if not _inside(ckpts, out):
            total += size
    label = "stored:     " if storage.is_remote(out) else "on disk:    "
    return f"{label} {human_size(total)} in {out} ({'; '.join(parts)})"


def _inside(location: str, folder: str) -> bool:
    """Whether ``location`` lies in ``folder`` (paths resolved; URIs compared as text)."""
    if storage.is_remote(location) or storage.is_remote(folder):
        return location.rstrip("/").startswith(folder.rstrip("/") + "/")
    return (
        storage.local_path(location).resolve().is_relative_to(storage.local_path(folder).resolve())
    )


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
            f"Retrieval on {evalset.name}: {len(evalset.queries)} held-out queries, "
            f"{len(evalset.corpus)} documents"
        )
        print(f"{'metric':<12}{'before':>10}{'after':>10}{'change':>10}")
        for k in EVAL_KEYS:
            print(f"{k:<12}{before[k]:>10.4f}{after[k]:>10.4f}{fmt_change(after[k] - before[k])}")
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
    check_command(cfg, "cache-guide")
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
