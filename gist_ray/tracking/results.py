"""The driver's last part of ``gist-ray train``: eval metrics on the step axis, the best step
(and ``best-model/``), plots, the final model in MLflow (sentence-transformers flavor with an
embeddings pyfunc), the final eval metrics linked to that model and the eval set, and its
registration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from gist_ray.config import Config
from gist_ray.core import storage
from gist_ray.core.outputs import Output
from gist_ray.models.best import best_dir, copy_from, read_best, save_best
from gist_ray.tracking.runs import metric_name

MODEL_URI_TAG = "gist_ray.model_uri"  # set once the model is logged: a rerun does not log twice
MODEL_ID_TAG = "gist_ray.model_id"


@dataclass
class Final:
    metric: str
    best_step: int | None = None  # None: no eval set
    best_value: float = math.nan
    base_value: float = math.nan  # the student before training (step 0)
    best_model_dir: str | None = None  # <output_dir>/best-model, when eval.every > 0
    plots: list[str] = field(default_factory=list)
    model_uri: str | None = None
    model_id: str | None = None  # MLflow 3 logged model: the final eval metrics are linked to it
    registered: str | None = None  # "name version N"
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The terminal report's lines about these results."""
        out = []
        if self.best_step is not None:
            base = f"; base model {self.base_value:.4f}" if math.isfinite(self.base_value) else ""
            out.append(f"best step:   {self.best_step} ({self.metric} {self.best_value:.4f}{base})")
            if math.isfinite(self.base_value) and self.base_value > self.best_value:
                out.append(f"             training did not improve {self.metric} on the eval set")
        if self.best_model_dir:
            out.append(f"best model:  {self.best_model_dir}")
        if self.plots:
            out.append(f"plots:       {storage.parent(self.plots[0])} ({len(self.plots)} PNG)")
        if self.model_uri:
            out.append(
                f"MLflow model: {self.model_uri} (mlflow.sentence_transformers.load_model, or "
                "mlflow.pyfunc.load_model -> embeddings)"
            )
        if self.registered:
            out.append(f"registered:  {self.registered}")
        out += [f"warning:     {w}" for w in self.warnings]
        return out


def _log_step_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log ``eval/<k>`` at ``step`` unless the run already holds a value there (a rerun)."""
    import time

    import mlflow

    ts = int(time.time() * 1000)
    batch = []
    for k, v in metrics.items():
        key = f"eval/{metric_name(k)}"
        if any(m.step == step for m in client.get_metric_history(run_id, key)):
            continue
        batch.append(mlflow.entities.Metric(key, float(v), ts, step))
    if batch:
        client.log_batch(run_id, metrics=batch)


def best_step(client, run_id: str, metric: str, final_step: int) -> tuple[int | None, float, float]:
    """(best step >= 1, its value, the step-0 value) from the run's ``eval/<metric>`` history;
    ties go to the earlier step (a later model must be strictly better)."""
    from gist_ray.tracking.plots import history

    points = history(client, run_id, f"eval/{metric_name(metric)}")
    base = next((v for s, v in points if s == 0), math.nan)
    trained = [(s, v) for s, v in points if 1 <= s <= final_step and math.isfinite(v)]
    if not trained:
        return None, math.nan, base
    step, value = max(trained, key=lambda sv: (sv[1], -sv[0]))
    return step, value, base


def log_results(
    cfg: Config,
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    final_step: int,
    before: dict[str, float],
    after: dict[str, float],
    evalset=None,
    *,
    out: Output,
) -> Final:
    """Everything after the final eval; the run itself is closed by the caller. ``model_dir``
    is the exported model on this machine; ``out`` the output folder the plots go to (written
    in its local folder, uploaded when it is on object storage)."""
    import mlflow

    from gist_ray.tracking.plots import plot_run
    from gist_ray.tracking.pyfunc import log_embedding_model

    client = mlflow.MlflowClient(tracking_uri)
    out_dir = out.location
    final = Final(metric=cfg.eval.metric)
    if after:
        # The step axis of eval/*: the base model at 0, rank 0's evals, the exported model last.
        _log_step_metrics(client, run_id, before, 0)
        _log_step_metrics(client, run_id, after, final_step)
        final.best_step, final.best_value, final.base_value = best_step(
            client, run_id, cfg.eval.metric, final_step
        )
        if cfg.eval.every and final.best_step is not None:
            if final.best_step == final_step:  # the exported model is the best one
                best = {"step": final_step, "metric": cfg.eval.metric, "value": final.best_value}
                save_best(out_dir, {**best, "run_id": run_id}, copy_from(model_dir))
            info = read_best(out_dir, run_id)
            if info and info["step"] == final.best_step and storage.exists(best_dir(out_dir)):
                final.best_model_dir = best_dir(out_dir)
            else:  # saved by rank 0 on another node
                final.warnings.append(
                    f"best model (step {final.best_step}) is in {best_dir(out_dir)} on the "
                    "node of rank 0"
                )
        client.set_tag(run_id, "best_step", str(final.best_step))
        client.log_metric(run_id, f"best/{metric_name(cfg.eval.metric)}", final.best_value)

    try:
        plots = plot_run(tracking_uri, run_id, out.path("plots"))
        for p in plots:
            client.log_artifact(run_id, str(p), "plots")
        if plots:
            out.publish("plots")
        final.plots = [storage.join(out.uri("plots"), p.name) for p in plots]
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished training
        final.warnings.append(f"plots failed: {type(e).__name__}: {e}")

    tags = client.get_run(run_id).data.tags
    if tags.get(MODEL_URI_TAG):  # a rerun of a complete run: the model is already there
        final.model_uri, final.model_id = tags[MODEL_URI_TAG], tags.get(MODEL_ID_TAG)
    else:
        info = log_embedding_model(
            tracking_uri,
            run_id,
            model_dir,
            step=final_step,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        final.model_uri, final.model_id = info.model_uri, info.model_id
        client.set_tag(run_id, MODEL_URI_TAG, final.model_uri)
        client.set_tag(run_id, MODEL_ID_TAG, final.model_id)
        if cfg.mlflow.register_as:
            final.registered = _register(tracking_uri, final, cfg.mlflow.register_as, run_id)
    if after:
        log_final_metrics(client, run_id, final.model_id, after, evalset, cfg.eval.source)
    return final


def log_final_metrics(
    client,
    run_id: str,
    model_id: str | None,
    after: dict[str, float],
    evalset=None,
    source: str = "",
) -> None:
    """``eval/after/<metric>`` (step 0), linked to the logged model and the eval set, unless
    the run already holds them (a rerun)."""
    import time

    import mlflow

    from gist_ray.tracking.datasets import eval_dataset, log_inputs

    held = client.get_run(run_id).data.metrics
    ds = None
    if evalset is not None:
        ds = eval_dataset(evalset, source)
        log_inputs(client, run_id, [(ds, "evaluation")])
    ts = int(time.time() * 1000)
    batch = [
        mlflow.entities.Metric(
            f"eval/after/{metric_name(k)}",
            float(v),
            ts,
            0,
            model_id=model_id,
            dataset_name=ds.name if ds else None,
            dataset_digest=ds.digest if ds else None,
        )
        for k, v in after.items()
        if f"eval/after/{metric_name(k)}" not in held
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def _register(tracking_uri: str, final: Final, name: str, run_id: str) -> str | None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = mlflow.register_model(final.model_uri, name, tags={"run_id": run_id})
    except Exception as e:  # noqa: BLE001 - e.g. a server without a model registry
        final.warnings.append(f"could not register the model as {name!r}: {e}".splitlines()[0])
        return None
    return f"{name} version {version.version}"
