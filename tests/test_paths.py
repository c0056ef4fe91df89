"""Paths a run writes must outlive it: inside a Ray job with --working-dir, a path in the job's
temporary copy of that dir is refused before anything starts (the real job is in
tests/test_ray_job.py; here the job's environment is reproduced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gist_ray.config import load_config
from gist_ray.core.errors import ConfigError
from gist_ray.launch.paths import JOB_CONFIG_ENV, check_job_paths, job_working_dir, local_path
from gist_ray.tracking.runs import resolve_tracking_uri

ROOT = Path(__file__).parents[1]


@pytest.fixture
def in_job(tmp_path, monkeypatch):
    """This process as the entrypoint of `ray job submit --working-dir ...`."""
    work = tmp_path / "ray" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(job))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work.resolve()


def _check(*overrides: str) -> None:
    cfg = load_config(overrides=list(overrides))
    check_job_paths(cfg, resolve_tracking_uri(cfg.mlflow.tracking_uri))


def test_outside_a_job_relative_paths_are_fine(tmp_path, monkeypatch):
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert job_working_dir() is None
    _check()  # the defaults: ./gist-ray-output, sqlite:///mlflow.db


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ([], "output_dir"),  # the default output_dir is relative
        (["output_dir=/srv/out"], "mlflow.tracking_uri"),  # then the default SQLite store
        (["output_dir=/srv/out", "ray.storage_path=ckpt"], "ray.storage_path"),
        (["output_dir=/srv/out", "mlflow.tracking_uri=http://h:5000",
          "mlflow.artifact_location=mlruns"], "mlflow.artifact_location"),
    ],
)  # fmt: skip
def test_paths_in_the_jobs_temporary_working_dir_are_refused(in_job, overrides, key):
    with pytest.raises(ConfigError) as e:
        _check(*overrides)
    msg = str(e.value)
    assert msg.startswith(f"{key} = ") and "\n" not in msg
    assert str(in_job) in msg and "deletes when the job ends" in msg


def test_an_absolute_path_inside_the_copy_is_refused_too(in_job):
    with pytest.raises(ConfigError, match="output_dir"):
        _check(f"output_dir={in_job / 'out'}")


def test_paths_outside_the_copy_and_remote_stores_pass(in_job, tmp_path):
    _check(
        f"output_dir={tmp_path / 'out'}",
        "ray.storage_path=s3://bucket/ckpt",
        "mlflow.tracking_uri=http://head:5000",
        "mlflow.artifact_location=s3://bucket/mlruns",
    )
    _check(f"output_dir={tmp_path / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db")


def test_shipped_gpu_configs_survive_a_job(in_job):
    for name in ("gpu-1node.yaml", "gpu-multinode.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        uri = resolve_tracking_uri(cfg.mlflow.tracking_uri or "http://head:5000")
        check_job_paths(cfg, uri)


def test_local_path_of_each_kind():
    assert local_path("sqlite:////a/b.db") == "/a/b.db"
    assert local_path("file:///a/b") == "/a/b"
    assert local_path("rel/dir") == "rel/dir"
    assert local_path("s3://b/k") is None and local_path("http://h:5000") is None
    assert local_path(None) is None


def test_sqlite_store_under_home_is_expanded(tmp_path):
    uri = resolve_tracking_uri("sqlite:///~/gist/mlflow.db", cwd=tmp_path)
    assert uri == f"sqlite:///{Path('~/gist/mlflow.db').expanduser()}"
