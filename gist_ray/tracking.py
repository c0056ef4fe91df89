"""MLflow tracking. Ray Train V2 has no MLflow callback: the driver creates the run and logs
params and final results; rank 0 re-attaches to the same run id to log per-step metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gist_ray.errors import GistRayError

DEFAULT_STORE = "mlflow.db"


def resolve_tracking_uri(configured: str | None, cwd: str | Path | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else SQLite in the working directory.

    A relative SQLite path is made absolute so Ray workers (other cwd) hit the same store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        uri = f"sqlite:///{(Path(cwd or os.getcwd()) / rel).resolve()}"
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """``mlruns/`` beside a SQLite store; a server chooses its own."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast (bounded time) on an HTTP tracking server that does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.request

    url = urllib.parse.urljoin(tracking_uri.rstrip("/") + "/", "health")
    try:
        urllib.request.urlopen(url, timeout=timeout).read()
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        raise GistRayError(
            f"mlflow.tracking_uri = {tracking_uri!r} does not answer ({type(e).__name__}); "
            "start the server or set mlflow.tracking_uri / MLFLOW_TRACKING_URI"
        ) from e


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str | None,
    params: dict[str, Any],
    tags: dict[str, str],
    artifact_location: str | None = None,
) -> str:
    """Create (or find) the experiment and a run; log params and tags; return the run id."""
    import mlflow

    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(
            experiment,
            artifact_location=artifact_location or default_artifact_location(tracking_uri),
        )
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    # MLflow params are limited to 6000 characters each and must be strings.
    mlflow_params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
    client.log_batch(run.info.run_id, params=mlflow_params)
    return run.info.run_id


def metric_name(name: str) -> str:
    """MLflow metric names allow no ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``."""
    return name.replace("@", "_at_")


class RunLogger:
    """Logs metrics to an existing run from one process (rank 0), batching writes per step."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        import mlflow

        self._mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        ts = int(time.time() * 1000)
        batch = [
            self._mlflow.entities.Metric(metric_name(k), float(v), ts, step)
            for k, v in metrics.items()
        ]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def set_terminated(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri}"
