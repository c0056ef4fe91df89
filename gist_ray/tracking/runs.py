"""MLflow tracking. Ray Train V2 has no MLflow callback: the driver creates the run and logs
params and final results; rank 0 re-attaches to the same run id to log per-step metrics."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gist_ray.core.errors import GistRayError

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
STEP_KEY = "loss"  # logged at every flushed training step
MAX_BATCH = 1000  # MLflow log_batch limit on metrics per call


def resolve_tracking_uri(configured: str | None, cwd: str | Path | None = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else SQLite in the working directory.

    A relative SQLite path is made absolute so Ray workers (other cwd) hit the same store."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = Path(uri[len("sqlite:///") :]).expanduser()
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


def _experiment_id(client, experiment: str, tracking_uri: str, artifact_location: str | None):
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        if artifact_location and exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
            # MLflow fixes it when the experiment is created: say where artifacts really go
            log.warning(
                "mlflow.artifact_location = %r applies only to a new experiment; experiment %r "
                "keeps its artifacts in %s (set a new mlflow.experiment to use it)",
                artifact_location,
                experiment,
                exp.artifact_location,
            )
        return exp.experiment_id
    return client.create_experiment(
        experiment, artifact_location=artifact_location or default_artifact_location(tracking_uri)
    )


def _params(params: dict[str, Any]) -> list:
    import mlflow

    # MLflow params are limited to 6000 characters each and must be strings.
    return [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]


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
    exp_id = _experiment_id(client, experiment, tracking_uri, artifact_location)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


@dataclass
class ExistingRun:
    """An MLflow run found by name, and how far its step metrics got."""

    run_id: str
    status: str
    last_step: int  # the last training step logged (0: none)
    metrics: dict[str, float]  # latest value of every metric


def find_run(tracking_uri: str, experiment: str, run_name: str) -> ExistingRun | None:
    """The newest run called ``run_name`` in ``experiment``, or None."""
    import mlflow

    check_reachable(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    # MLflow's filter strings have no escapes: quote with the kind the name does not contain.
    quote = '"' if "'" in run_name else "'"
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = {quote}{run_name}{quote}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return ExistingRun(
        run.info.run_id,
        run.info.status,
        last_logged_step(client, run.info.run_id),
        dict(run.data.metrics),
    )


def get_run(tracking_uri: str, run_id: str) -> ExistingRun | None:
    """The run with this id, or None when the store does not hold it (or it was deleted)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    check_reachable(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage == "deleted":
        return None
    return ExistingRun(
        run.info.run_id,
        run.info.status,
        last_logged_step(client, run.info.run_id),
        dict(run.data.metrics),
    )


def last_logged_step(client, run_id: str) -> int:
    """The last step with a ``loss`` value: every flushed step logs loss in the same batch."""
    return max((m.step for m in client.get_metric_history(run_id, STEP_KEY)), default=0)


def reopen_run(
    tracking_uri: str, run_id: str, params: dict[str, Any], tags: dict[str, str]
) -> None:
    """Mark a stopped or finished run as running again. Params are immutable in MLflow: only
    the ones it lacks are added (the checkpoint already proved the rest match)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    missing = {k: v for k, v in params.items() if k not in run.data.params}
    resumes = int(run.data.tags.get("gist_ray.resumes", "0")) + 1
    tags = {**tags, "gist_ray.resumes": str(resumes)}
    client.log_batch(
        run_id,
        params=_params(missing),
        tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items() if k != "mlflow.runName"],
    )
    client.update_run(run_id, status="RUNNING")


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Close a run as ``status`` (FINISHED, FAILED, KILLED)."""
    import mlflow

    mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status=status)


@contextlib.contextmanager
def failed_if_raises(tracking_uri: str, run_id: str) -> Iterator[None]:
    """Close the run as FAILED when the block raises: a refusal after a run was opened must
    not leave it RUNNING."""
    try:
        yield
    except BaseException:
        end_run(tracking_uri, run_id, "FAILED")
        raise


def metric_name(name: str) -> str:
    """MLflow metric names allow no ``@``: ``ndcg@10`` is logged as ``ndcg_at_10``."""
    return name.replace("@", "_at_")


class RunLogger:
    """Logs metrics to an existing run from one process (rank 0), batching writes per step.

    With ``skip_logged`` (a resumed run) a metric the run already holds is not logged again:
    the driver's summary metrics (step 0) must not gain a second value on a rerun."""

    def __init__(self, tracking_uri: str, run_id: str, skip_logged: bool = False) -> None:
        import mlflow

        self._mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self._logged = set(self.client.get_run(run_id).data.metrics) if skip_logged else set()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        ts = int(time.time() * 1000)
        batch = [
            self._mlflow.entities.Metric(metric_name(k), float(v), ts, step)
            for k, v in metrics.items()
            if metric_name(k) not in self._logged
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_terminated(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class StepLogger:
    """Rank 0's per-step training metrics. The training loop hands it only steps covered by a
    committed checkpoint (see :class:`gist_ray.train.checkpoint.TrainState`), so MLflow holds every
    step exactly once even when a restart replays steps; whole steps go in one batch, so the
    presence of ``loss`` at a step means the step is complete."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        import time

        import mlflow

        ts = int(time.time() * 1000)
        batch: list = []
        for step, metrics in steps:
            row = [
                mlflow.entities.Metric(metric_name(k), float(v), ts, step)
                for k, v in metrics.items()
            ]
            if batch and len(batch) + len(row) > MAX_BATCH:
                self.client.log_batch(self.run_id, metrics=batch)
                batch = []
            batch.extend(row)
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags (a restarted worker sets the same ones again)."""
        import mlflow

        batch = [mlflow.entities.RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self.client.log_batch(self.run_id, tags=batch)

    def log_unlogged(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        """After a restart: log the checkpoint's steps that never reached MLflow."""
        last = last_logged_step(self.client, self.run_id)
        self.log_steps([(s, m) for s, m in steps if s > last])


def ui_command(tracking_uri: str) -> str:
    return f"mlflow ui --backend-store-uri {tracking_uri}"


# ----------------------------------------------------------------------------- run extras


def start_system_metrics(tracking_uri: str, run_id: str, interval_s: float = 10.0):
    """Sample CPU, memory, disk, network (and GPU, with nvidia-ml-py) into the run as
    ``system/*`` metrics from a background thread of this process; returns the monitor (stop
    it with :func:`stop_system_metrics`), or None when psutil is missing.

    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides ``interval_s``."""
    import logging

    try:
        import psutil  # noqa: F401 - MLflow's monitors need it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        logging.getLogger(__name__).warning(
            "system metrics are off: `pip install psutil` (and nvidia-ml-py for GPUs)"
        )
        return None
    # resume_logging: a resumed run continues its system/* step axis instead of restarting at 0
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=tracking_uri
    )
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the sampler and log what it holds; safe to call twice."""
    if monitor is not None and not getattr(monitor, "_gist_ray_stopped", False):
        monitor._gist_ray_stopped = True
        monitor.finish()


def log_config(tracking_uri: str, run_id: str, config_yaml: str) -> None:
    """The resolved config as the artifact ``config.yaml``: rerun it with ``--config``."""
    import mlflow

    mlflow.MlflowClient(tracking_uri).log_text(run_id, config_yaml, "config.yaml")


def log_once(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` at ``step``, leaving out those the run already holds at that step."""
    import time

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    ts = int(time.time() * 1000)
    batch = [
        mlflow.entities.Metric(metric_name(k), float(v), ts, step)
        for k, v in metrics.items()
        if step not in {m.step for m in client.get_metric_history(run_id, metric_name(k))}
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)
