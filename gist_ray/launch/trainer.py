"""Ray Train's TorchTrainer around :func:`gist_ray.train.loop.train_worker`: the reporter, the
validation of the ``eval.every`` checkpoints, fault tolerance, and a worker's own error.

Fault tolerance is Ray Train V2's: ``FailureConfig(max_failures)`` restarts the worker group
after a worker or node dies and ``ray.train.get_checkpoint()`` hands the restarted workers the
latest committed checkpoint; a new ``fit()`` with the same ``RunConfig(name, storage_path)``
reloads the run's checkpoint list from storage, so rerunning a command resumes it.

Ctrl-C is gist-ray's, not Ray Train's: Ray's handler (installed by ``fit()``) aborts the run and
exits the process with no word and status 1. Ours leaves a KeyboardInterrupt to the command,
which aborts the run, marks the MLflow run KILLED and says where a rerun resumes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gist_ray.config import Config
from gist_ray.core.errors import GistRayError
from gist_ray.core.log import QUIET_BARS
from gist_ray.launch.resources import storage_path
from gist_ray.launch.resume import NOT_VALIDATED, export_best, find_checkpoint

log = logging.getLogger(__name__)

# Fault injection for the fault-tolerance tests (gist_ray.train.faults) reaches the workers.
FORWARDED_ENV = ("GIST_RAY_FAULT_INJECT",)


class RayReporter:
    """Reporter backed by ``ray.train.report`` / ``ray.train.get_checkpoint``. With
    ``score_key`` (eval during training) checkpoints reported with ``validate`` are evaluated
    by Ray Train's validation task while training goes on, and ranked by that metric."""

    def __init__(self, score_key: str | None = None) -> None:
        self.score_key = score_key

    def report(
        self, metrics: dict[str, float], checkpoint_dir: str | None, validate: bool = False
    ) -> None:
        """Returns once the checkpoint is committed: uploaded and recorded in the run's snapshot
        in storage, i.e. what a restart would resume from."""
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        if self.score_key:  # ranked below every validated one until (unless) validated
            metrics = {self.score_key: NOT_VALIDATED, **metrics}
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
            checkpoint_dir_name=Path(checkpoint_dir).name,
            validation=validate and self.score_key is not None,
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Ray has copied it to storage
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        """A local folder with the checkpoint to resume from: where it lies on a local storage
        path, else a download removed when the context ends (Ray's ``as_directory``)."""
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            yield None
            return
        with found.as_directory() as folder:
            yield folder


def _ray_entry(payload: dict[str, Any]) -> None:
    """Runs on each Ray worker: rebuild the config and hand over to plain torch code."""
    from gist_ray.config import load_config_dict
    from gist_ray.core import log
    from gist_ray.core.distributed import rank
    from gist_ray.train import faults
    from gist_ray.train.loop import train_worker

    log.configure()
    cfg = load_config_dict(payload["config"])
    train_worker(
        cfg,
        RayReporter(payload.get("score_key")),
        payload["run_id"],
        payload["tracking_uri"],
        guide_caches=payload.get("guide_caches"),
        on_step=faults.from_env(cfg.output_dir, rank()),
    )


def _trainer(cfg: Config, entry, payload: dict[str, Any], validation=None, **run_config: Any):
    """A TorchTrainer running ``entry(payload)`` on ``ray.num_workers`` workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # V2's print patch echoes every line twice
    env.update(QUIET_BARS)  # a worker's progress bars are noise in the driver's log
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})

    class Trainer(TorchTrainer):
        controller = None  # the Train controller actor, aborted on an interrupt

        def _register_sigint_handler(self, controller) -> None:
            self.controller = controller  # and SIGINT stays a KeyboardInterrupt (see above)

    return Trainer(
        entry,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu
        ),
        run_config=ray.train.RunConfig(
            storage_path=storage_path(cfg), worker_runtime_env={"env_vars": env}, **run_config
        ),
        validation_config=validation,
    )


def _validation(cfg: Config, run_id: str, tracking_uri: str):
    """Ray Train's validation of the checkpoints written every ``eval.every`` steps (None when
    there is no eval during training): :func:`gist_ray.train.evaluation.validate_checkpoint` as a
    task with ``eval.num_cpus`` / ``eval.num_gpus``."""
    if not (cfg.eval.source and cfg.eval.every):
        return None
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    from gist_ray.train.evaluation import validate_checkpoint

    kwargs = {"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri}
    env = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **QUIET_BARS}}
    return ValidationConfig(
        fn=validate_checkpoint,
        task_config=ValidationTaskConfig(fn_kwargs=kwargs),
        ray_remote_kwargs={
            "num_cpus": cfg.eval.num_cpus,
            "num_gpus": cfg.eval.num_gpus,
            "runtime_env": env,
        },
    )


def run_training(
    cfg: Config,
    run_id: str,
    tracking_uri: str,
    name: str,
    guide_caches: list[str] | None = None,
):
    """Fit on the cluster as run ``name`` under the storage path (resuming its latest checkpoint
    if it has one); return the final checkpoint (a ``ray.train.Checkpoint``). ``guide_caches``:
    the datasets' guide cache folders, built before (:func:`prepare_guide_cache`)."""
    import ray.train

    from gist_ray.train.evaluation import score_key

    validation = _validation(cfg, run_id, tracking_uri)
    score = score_key(cfg) if validation else None
    payload = {
        "config": cfg.to_dict(),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "guide_caches": guide_caches,
        "score_key": score,
    }
    # With validation Ray keeps the 2 best-scored checkpoints (besides the latest, which a
    # restart resumes from, and any still being validated), all on the run's storage.
    keep = ray.train.CheckpointConfig(
        num_to_keep=2, checkpoint_score_attribute=score, checkpoint_score_order="max"
    )
    trainer = _trainer(
        cfg,
        _ray_entry,
        payload,
        validation,
        name=name,
        checkpoint_config=keep,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        _abort(trainer.controller)
        raise
    except Exception as e:  # noqa: BLE001 - TrainingFailedError wraps the worker's error
        _resume_hint(cfg, name)
        raise unwrap_worker_error(e) from e
    if result.checkpoint is None:
        raise GistRayError("training finished without a checkpoint")
    if score:
        export_best(cfg, run_id, result.best_checkpoints, score)
    return result.checkpoint


def _abort(controller) -> None:
    """Ask the Train controller to stop its workers; not waited for (a scheduler's SIGKILL may
    follow SIGTERM within seconds), and what it misses ends with this driver's Ray session."""
    if controller is None:
        return
    try:
        controller.abort.remote()
    except Exception:  # noqa: BLE001 - already gone
        log.debug("could not abort the Train controller", exc_info=True)


def last_checkpoint_step(cfg: Config, name: str) -> int | None:
    """The step of run ``name``'s latest committed checkpoint (None: none, or unreadable)."""
    try:
        found = find_checkpoint(cfg, name)
    except GistRayError:
        return None
    return found.step if found is not None else None


def _resume_hint(cfg: Config, name: str) -> None:
    """After a failed fit, say where a rerun would resume."""
    try:
        found = find_checkpoint(cfg, name)
    except GistRayError:
        return
    if found is not None:
        log.warning(
            "training failed after the checkpoint at step %d: rerun the same command to resume "
            "from it",
            found.step,
        )


def unwrap_worker_error(e: BaseException) -> BaseException:
    """The error a worker raised, rather than Ray's wrapper around it: a user error
    (:class:`GistRayError`) from any worker, else the lowest failing rank's (or the Train
    controller's); the latter gets a ``gist_ray_origin`` attribute ("Ray worker rank 1") for the
    CLI's one-line message. Ray's exception is returned when it wraps no such error."""
    found: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()

    def walk(cur: BaseException | None, origin: str | None) -> None:
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            failures = getattr(cur, "worker_failures", None) or getattr(cur, "errors", None)
            if isinstance(failures, dict) and failures:
                for rank in sorted(failures, key=str):
                    walk(failures[rank], f"Ray worker rank {rank}")
                return
            controller = getattr(cur, "controller_failure", None)
            if isinstance(controller, BaseException):
                walk(controller, "the Ray Train controller")
                return
            # Ray Train's wrapper of the worker's exception; Ray core's (RayTaskError)
            inner = getattr(cur, "_base_exc", None) or getattr(cur, "cause", None)
            if not isinstance(inner, BaseException):
                found.append((cur, origin))
                inner = cur.__cause__ or cur.__context__
            cur = inner

    walk(e, None)
    for err, _ in found:
        if isinstance(err, GistRayError):
            return err
    for line in str(e).splitlines():  # a user error whose class did not survive the trip
        if "Error:" in line and "gist_ray.core.errors" in line:
            return GistRayError(line.split("Error:", 1)[1].strip())
    workers = [(err, origin) for err, origin in found if origin is not None]
    if not workers:
        return e
    err, origin = workers[0]
    try:
        err.gist_ray_origin = origin  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__
        pass
    return err
