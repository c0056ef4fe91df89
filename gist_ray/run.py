"""``gist-ray train`` on the driver: validate inputs, evaluate the base model, train on Ray,
export and evaluate the trained model, and log everything to one MLflow run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from gist_ray.config import Config
from gist_ray.errors import GistRayError

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
    from gist_ray.evaluate import retrieval_metrics
    from gist_ray.models import load_encoder

    enc = load_encoder(model, cfg.model.pooling, cfg.model.max_seq_length)
    return retrieval_metrics(lambda texts: enc.encode(texts, batch_size=64), evalset)


def _print_metrics(before: dict[str, float], after: dict[str, float]) -> None:
    print(f"{'metric':<12}{'before':>10}{'after':>10}{'change':>10}")
    for k in EVAL_KEYS:
        print(f"{k:<12}{before[k]:>10.4f}{after[k]:>10.4f}{after[k] - before[k]:>+10.4f}")


def train(cfg: Config) -> dict[str, Any]:
    """Run the whole ``train`` command; returns paths, run id and metrics."""
    from gist_ray import launcher, tracking
    from gist_ray.data import load_eval, load_pairs
    from gist_ray.models import load_encoder

    cfg = _absolutize(cfg)
    t0 = time.perf_counter()
    # Fail on bad data or models here, before any cluster starts.
    data = load_pairs(
        cfg.data.train, cfg.data.columns or None, cfg.data.max_examples or None, seed=cfg.train.seed
    )
    if len(data) < cfg.train.batch_size:
        raise GistRayError(
            f"train.batch_size = {cfg.train.batch_size} is larger than the "
            f"dataset {cfg.data.train!r} ({len(data)} rows)"
        )
    load_encoder(cfg.model.student, cfg.model.pooling, cfg.model.max_seq_length)
    load_encoder(
        cfg.model.guide, cfg.model.guide_pooling, cfg.model.max_seq_length, key="model.guide"
    )
    ev = cfg.eval
    evalset = (
        load_eval(
            ev.source, ev.split, ev.max_queries or None, ev.max_corpus or None, seed=cfg.train.seed
        )
        if ev.source
        else None
    )

    tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    launcher.connect(cfg)
    launcher.check_resources(cfg)

    before: dict[str, float] = {}
    if evalset is not None:
        print(
            f"[gist-ray] evaluating {cfg.model.student} before training "
            f"({len(evalset.queries)} queries, {len(evalset.corpus)} documents)",
            flush=True,
        )
        before = evaluate_model(cfg.model.student, cfg, evalset)

    tags = {
        "student": cfg.model.student,
        "guide": cfg.model.guide,
        "global_batch": str(cfg.train.batch_size),
        "world_size": str(cfg.ray.num_workers),
        "gist_ray.command": "train",
    }
    run_id = tracking.start_run(
        tracking_uri,
        cfg.mlflow.experiment,
        cfg.mlflow.run_name,
        cfg.flat(),
        tags,
        cfg.mlflow.artifact_location,
    )
    logger = tracking.RunLogger(tracking_uri, run_id)
    logger.log_metrics({f"eval/before/{k}": v for k, v in before.items()}, step=0)
    try:
        final_ckpt = launcher.run_training(cfg, run_id, tracking_uri)
        model_dir = Path(cfg.output_dir) / "model"
        tmp = model_dir.with_name(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final_ckpt / "model", tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        after: dict[str, float] = {}
        if evalset is not None:
            after = evaluate_model(str(model_dir), cfg, evalset)
            logger.log_metrics({f"eval/after/{k}": v for k, v in after.items()}, step=0)
        logger.log_artifacts(model_dir, "model")
        wall = time.perf_counter() - t0
        logger.log_metrics({"wall_time_s": wall}, step=0)
        logger.set_terminated("FINISHED")
    except BaseException:
        logger.set_terminated("FAILED")
        raise

    print()
    if evalset is not None:
        print(
            f"Retrieval on {evalset.name} ({len(evalset.queries)} held-out queries, "
            f"{len(evalset.corpus)} documents):"
        )
        _print_metrics(before, after)
    print(f"\nmodel:       {model_dir}")
    print(f"MLflow run:  {run_id} (experiment {cfg.mlflow.experiment!r}, store {tracking_uri})")
    print(f"MLflow UI:   {tracking.ui_command(tracking_uri)}")
    print(f"wall time:   {wall / 60:.1f} min")
    return {
        "model_dir": str(model_dir),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "before": before,
        "after": after,
        "wall_time_s": wall,
    }
