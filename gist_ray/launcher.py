"""Ray Train launcher: the only module that knows about Ray.

It connects to (or starts) a Ray cluster, checks the requested resources, creates the MLflow run,
runs :func:`gist_ray.train.train_worker` on ``ray.num_workers`` TorchTrainer workers and copies
the final model out of the last checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gist_ray.config import Config
from gist_ray.errors import GistRayError


class RayReporter:
    """Reporter backed by ``ray.train.report`` / ``ray.train.get_checkpoint``."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
            checkpoint_dir_name=Path(checkpoint_dir).name,
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # Ray has copied it to storage

    def latest_checkpoint(self) -> str | None:
        import ray.train

        found = ray.train.get_checkpoint()
        return found.path if found is not None else None


def _ray_entry(payload: dict[str, Any]) -> None:
    """Runs on each Ray worker: rebuild the config and hand over to plain torch code."""
    from gist_ray.config import load_config_dict
    from gist_ray.train import train_worker

    train_worker(
        load_config_dict(payload["config"]),
        RayReporter(),
        payload["run_id"],
        payload["tracking_uri"],
    )


def connect(cfg: Config) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS``, or start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as e:  # noqa: BLE001 - connection errors come in several types
            raise GistRayError(
                f"ray.address = {address!r}: cannot connect to a Ray cluster "
                f"there ({str(e).splitlines()[0][:160]})"
            ) from e
        return
    # A fresh temp dir: a stale ray_current_cluster file from an earlier `ray stop` confuses init.
    tmp = tempfile.mkdtemp(prefix="gist-ray-ray-")
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    ray.init(num_cpus=cfg.ray.num_cpus, _temp_dir=tmp, log_to_driver=True)


def check_resources(cfg: Config) -> None:
    import ray

    total = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * (0 if cfg.ray.use_gpu else 1)
    if cfg.ray.use_gpu and total.get("GPU", 0) < cfg.ray.num_workers:
        raise GistRayError(
            f"ray.num_workers = {cfg.ray.num_workers} with ray.use_gpu = true needs "
            f"{cfg.ray.num_workers} GPUs but the cluster has {int(total.get('GPU', 0))}; "
            "lower ray.num_workers or set ray.use_gpu=false"
        )
    if need_cpu > total.get("CPU", 0):
        raise GistRayError(
            f"ray.num_workers = {cfg.ray.num_workers} needs {need_cpu} CPUs but the cluster "
            f"has {int(total.get('CPU', 0))}; lower ray.num_workers or add nodes"
        )


def run_training(cfg: Config, run_id: str, tracking_uri: str) -> Path:
    """Fit on the cluster; return the final checkpoint's directory (local copy)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = cfg.ray.storage_path or str(Path(cfg.output_dir) / "ray")
    name = cfg.mlflow.run_name or f"gist-ray-{run_id[:8]}"
    trainer = TorchTrainer(
        _ray_entry,
        train_loop_config={"config": cfg.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train V2 patches print() into its logger, which echoes every line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - TrainingFailedError wraps the worker's error
        raise _unwrap(e) from e
    if result.checkpoint is None:
        raise GistRayError("training finished without a checkpoint")
    local = Path(cfg.output_dir) / "final-checkpoint"
    if local.exists():
        shutil.rmtree(local)
    result.checkpoint.to_directory(str(local))
    return local


def _unwrap(e: BaseException) -> BaseException:
    """Surface a user error raised inside a worker as itself, not as a Ray wrapper."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, GistRayError):
            return cur
        for attr in ("worker_failures", "errors"):
            inner = getattr(cur, attr, None)
            if isinstance(inner, dict) and inner:
                cur = next(iter(inner.values()))
                break
        else:
            cur = cur.__cause__ or cur.__context__
    text = str(e)
    for line in text.splitlines():
        if "Error:" in line and "gist_ray.errors" in line:
            return GistRayError(line.split("Error:", 1)[1].strip())
    return e
