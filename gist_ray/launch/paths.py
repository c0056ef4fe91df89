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
