"""Bad cluster input: an address that does not answer, node-local storage on a multi-node
cluster, GPUs the cluster lacks. Each is one line saying what to change, in bounded time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from gist_ray.config import load_config
from gist_ray.core.errors import GistRayError
from gist_ray.launch import cluster, resources


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unanswered_address_fails_fast():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(GistRayError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        cluster.probe_address(f"127.0.0.1:{port}")
    with pytest.raises(GistRayError, match="no Ray cluster answers"):
        cluster.probe_address(f"ray://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5


def test_port_that_accepts_but_stays_silent_fails_within_the_timeout():
    """A hung service (or a firewall that accepts and drops) would keep ray.init retrying."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(GistRayError, match="does not speak gRPC within 1s"):
            cluster.probe_address(f"127.0.0.1:{port}", timeout=1.0)
        assert time.monotonic() - t0 < 5


def test_a_real_gcs_passes_the_probe(ray_cluster):
    cluster.probe_address(ray_cluster.get_runtime_context().gcs_address)


def test_dashboard_or_malformed_address_is_explained():
    with pytest.raises(GistRayError, match="dashboard .*ray job submit --address"):
        cluster.probe_address("http://127.0.0.1:8265")
    with pytest.raises(GistRayError, match="expected HOST:PORT"):
        cluster.probe_address("just-a-host")


@pytest.mark.slow  # the CLI loads both models and the data before probing the address
def test_cli_reports_an_unreachable_cluster_in_one_line(tiny_models, tiny_pairs_file, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "-m",
        "gist_ray.cli",
        "train",
        "--set",
        f"model.student={tiny_models['student']}",
        "--set",
        f"model.guide={tiny_models['guide']}",
        "--set",
        f"data.train={tiny_pairs_file}",
        "--set",
        "eval.source=",
        "--set",
        "train.batch_size=8",
        "--set",
        f"ray.address=127.0.0.1:{port}",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gist-ray: error:")]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "ray.address" in lines[0]


def test_shared_storage_detection(monkeypatch, tmp_path):
    assert resources.is_shared_storage("s3://bucket/ckpt")
    assert resources.is_shared_storage("gs://bucket/ckpt")
    assert not resources.is_shared_storage(f"file://{tmp_path}")
    monkeypatch.setattr(resources, "_mount_type", lambda path: "ext4")
    assert not resources.is_shared_storage(str(tmp_path))
    monkeypatch.setattr(resources, "_mount_type", lambda path: "nfs4")
    assert resources.is_shared_storage(str(tmp_path))


def test_multinode_storage_must_be_shared(tmp_path):
    """The rule itself (tests/test_multinode.py checks it against a real 3-node cluster)."""
    cfg = load_config(overrides=[f"output_dir={tmp_path}"])
    resources.check_storage(cfg, alive_nodes=1)  # one node: local storage is fine
    with pytest.raises(GistRayError) as e:
        resources.check_storage(cfg, alive_nodes=2)
    msg = str(e.value)
    assert "\n" not in msg and "node-local but the cluster has 2 nodes" in msg
    assert "ray.storage_path" in msg and "s3://" in msg and "ray.shared_storage" in msg
    for shared in ("ray.storage_path=s3://b/p", "ray.shared_storage=true"):
        resources.check_storage(load_config(overrides=[f"output_dir={tmp_path}", shared]), 2)


def test_unwritable_storage_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config(overrides=[f"output_dir={tmp_path}", f"ray.storage_path={blocker}/ray"])
    with pytest.raises(GistRayError) as e:
        resources.check_storage(cfg, alive_nodes=1)
    msg = str(e.value)
    assert msg.startswith(f"ray.storage_path = '{blocker}/ray' is not writable (")
    assert "set ray.storage_path to a writable folder" in msg and "\n" not in msg


def test_gpus_the_cluster_lacks_are_refused(ray_cluster):
    cfg = load_config(overrides=["ray.use_gpu=true"])
    with pytest.raises(GistRayError, match="needs 2 GPUs but the cluster has 0") as e:
        resources.check_resources(cfg)
    assert "ray.use_gpu=false" in str(e.value) and "\n" not in str(e.value)
    # With resource_wait_s the autoscaler is asked and waited for, then the same refusal.
    t0 = time.monotonic()
    with pytest.raises(GistRayError, match="needs 2 GPUs"):
        resources.check_resources(
            load_config(overrides=["ray.use_gpu=true", "ray.resource_wait_s=1"])
        )
    assert 1 <= time.monotonic() - t0 < 15


def test_too_many_cpu_workers_are_refused(ray_cluster):
    with pytest.raises(GistRayError, match="needs 8 CPUs but the cluster has 2"):
        resources.check_resources(load_config(overrides=["ray.num_workers=8"]))
