"""Where a run's files go must outlive the process that chose it.

``ray job submit --working-dir DIR`` runs the command in a temporary copy of DIR that Ray
deletes with the job: a relative ``output_dir``, ``ray.storage_path``, SQLite MLflow store or
artifact location would put the model, the checkpoints and the runs there. The driver checks
those paths before anything starts and refuses such a path in one line that says what to set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

from gist_ray.config import Config
from gist_ray.core.errors import ConfigError

# Set by Ray's job supervisor for a job's entrypoint: its runtime env and metadata.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_working_dir() -> Path | None:
    """The temporary copy of the job's ``--working-dir`` this process runs in, or None (not a
    Ray job, or a job without a working dir)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def local_path(value: str | None) -> str | None:
    """The file system path ``value`` names (a plain path, ``file://`` or ``sqlite:///``), or
    None for remote URIs (s3://, http://, ...) and unset values."""
    if not value:
        return None
    if value.startswith("sqlite:///"):
        return value[len("sqlite:///") :]
    scheme = urlparse(value).scheme if "://" in value else ""
    if scheme == "file":
        return urlparse(value).path
    return None if scheme else value


def check_job_paths(cfg: Config, tracking_uri: str) -> None:
    """Refuse a local path that would land inside a Ray job's temporary working dir."""
    tmp = job_working_dir()
    if tmp is None:
        return
    m = cfg.mlflow
    candidates = [
        ("output_dir", cfg.output_dir, "an absolute path outside it"),
        ("ray.storage_path", cfg.ray.storage_path, "shared storage (s3://..., an NFS mount)"),
        ("mlflow.tracking_uri", tracking_uri, "a server (http://HEAD:5000) or sqlite:////abs/path"),
        ("mlflow.artifact_location", m.artifact_location, "an absolute path or s3://..."),
        ("data.guide_cache_dir", cfg.data.guide_cache_dir, "a folder every node shares"),
    ]
    for key, value, instead in candidates:
        path = local_path(value)
        if path is None:
            continue
        resolved = Path(path).expanduser()
        resolved = resolved if resolved.is_absolute() else tmp / resolved
        if resolved.resolve().is_relative_to(tmp):
            raise ConfigError(
                f"{key} = {value!r} lies in this Ray job's temporary copy of --working-dir "
                f"({tmp}), which Ray deletes when the job ends; set {key} to {instead}"
            )


# The SDK MLflow's artifact store needs for a scheme (the extra that brings it).
ARTIFACT_SDKS = {"s3": ("boto3", "boto3"), "gs": ("google.cloud.storage", "google-cloud-storage")}
COMMANDS = ("train", "cache-guide", "mine")


def command_locations(cfg: Config, command: str) -> list[tuple[str, str, bool]]:
    """(config key, location, written?) of every place ``command`` reads or writes."""
    from gist_ray.config import map_sources
    from gist_ray.core import storage

    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    found: list[tuple[str, str, bool]] = []

    def source(value: str) -> str:
        found.append(("data.train", value, False))
        return value

    map_sources(cfg.data.train, source)
    if cfg.data.guide_cache_dir:
        found.append(("data.guide_cache_dir", cfg.data.guide_cache_dir, True))
    if command == "mine":
        if cfg.mine.output:  # a file: its folder is probed (a probe under it makes it a folder)
            found.append(("mine.output", storage.parent(cfg.mine.output), True))
        else:
            found.append(("output_dir", cfg.output_dir, True))
        return found
    found.append(("output_dir", cfg.output_dir, True))
    found.append(("ray.storage_path", cfg.ray.storage_path or _default_storage(cfg), True))
    if command == "train":
        if cfg.eval.source:
            found.append(("eval.source", cfg.eval.source, False))
        if cfg.mlflow.artifact_location:
            found.append(("mlflow.artifact_location", cfg.mlflow.artifact_location, True))
    return found


def _default_storage(cfg: Config) -> str:
    from gist_ray.core import storage

    return storage.join(cfg.output_dir, "ray")


def check_locations(locations: list[tuple[str, str, bool]]) -> None:
    """Before anything starts (no Ray, no MLflow run): every remote location must be
    reachable (its bucket exists, the credentials are accepted) and, when written, writable;
    an MLflow artifact store on object storage needs its SDK. The first failure is one
    ConfigError naming the key and the URI. Local paths are left to the code that uses them."""
    import importlib.util

    from gist_ray.core import storage

    for key, location, write in locations:
        if not storage.is_remote(location):
            continue
        if key == "mlflow.artifact_location":
            module, package = ARTIFACT_SDKS.get(storage.scheme(location), (None, None))
            if module and not _importable(module, importlib.util):
                raise ConfigError(
                    f"{key} = {location!r}: MLflow's artifact store needs {package}, which is "
                    "not installed; pip install 'gist-ray[cloud]'"
                )
        storage.check_location(location, key, write=write)


def check_command(cfg: Config, command: str) -> None:
    """:func:`check_locations` of every location ``train`` / ``cache-guide`` / ``mine`` uses."""
    check_locations(command_locations(cfg, command))


def _importable(module: str, util) -> bool:
    try:
        return util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False
