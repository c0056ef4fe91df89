"""A real multi-node run on one machine: three Ray nodes on 127.0.0.1 (a head without CPUs and
two one-CPU worker nodes, so each training worker has a node of its own), storage in a temp dir
every node of this cluster sees. After the first committed checkpoint one worker node is removed
with its processes and a replacement node joins; Ray Train restarts the worker group from the
checkpoint. The run must end with the weights of an uninterrupted run and one MLflow run whose
step axis has each step once. The storage check sees the real nodes (no mocked ``ray.nodes``):
without ``ray.shared_storage`` the temp dir is refused as node-local.

The cluster runs in a driver subprocess (tests/multinode_driver.py): a process joins one Ray
cluster, and this session already holds the shared local one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from tests.test_fault_tolerance import STEPS, make_cfg, reference  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
RUN = "multinode"


def _drive(spec: dict, base: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run tests/multinode_driver.py on ``spec`` (its files beside ``base``): the process and
    what the driver wrote to RESULT.json."""
    spec_file, result = base.with_suffix(".spec.json"), base.with_suffix(".result.json")
    spec_file.write_text(json.dumps(spec))
    drop = ("RAY_ADDRESS", "GIST_RAY_FAULT_INJECT")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multinode_driver", str(spec_file), str(result)],
        cwd=Path(__file__).parents[1],
        env={**{k: v for k, v in os.environ.items() if k not in drop}, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return proc, json.loads(result.read_text())


def test_node_loss_is_survived_with_exact_weights_and_one_step_axis(make_cfg, reference):  # noqa: F811
    cfg = make_cfg(RUN, "train.max_failures=1")
    proc, out = _drive({"config": cfg.to_dict(), "run_name": RUN}, Path(cfg.output_dir))

    assert out["alive_nodes"] == 3
    refused = out["local_storage_refused"]
    assert "node-local but the cluster has 3 nodes" in refused and "ray.shared_storage" in refused

    events = out["events"]
    assert events.get("replaced") and events["killed_after"], events
    assert "resumed from" in proc.stdout  # the restarted workers loaded the checkpoint
    assert out["alive_nodes_after"] == 3  # head + surviving worker node + replacement

    weights = load_file(str(Path(out["model_dir"]) / "model.safetensors"))
    for name, expected in reference["weights"].items():
        torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-6, msg=name)

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    history = client.get_metric_history(out["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in range(1, STEPS + 1)] == pytest.approx(reference["losses"], rel=1e-5)


def test_object_storage_only_cluster_survives_node_loss(make_cfg, reference, s3_server, tmp_path):  # noqa: F811
    """No shared disk: the training data, the guide cache (on), the checkpoints, the outputs and
    MLflow's artifacts are all on s3://, each node stages into its own cache folder, and the
    run survives losing a worker node with the weights of the uninterrupted run."""
    from gist_ray.core import storage
    from tests.s3 import local_s3_folders

    bucket = s3_server.bucket("multinode")
    base = make_cfg(RUN)
    data = f"{bucket}/data/{Path(base.data.train).name}"
    storage.upload(Path(base.data.train), data)
    cfg = make_cfg(
        "multinode-s3",
        "train.max_failures=1",
        f"data.train={data}",
        f"output_dir={bucket}/out",
        f"mlflow.artifact_location={bucket}/mlflow",
        "mlflow.experiment=multinode-s3",  # a new experiment: the artifact location is its own
    )
    spec = {"config": cfg.to_dict(), "run_name": "multinode-s3", "object_storage": True}
    caches = tmp_path / "run.node-caches"  # the driver names each node's cache folder in it
    proc, out = _drive(spec, tmp_path / "run", GIST_RAY_CACHE=str(caches / "driver"))
    assert "local_storage_refused" not in out  # s3:// is shared: nothing to declare
    events = out["events"]
    assert events.get("replaced") and events["killed_after"], events
    assert "resumed from" in proc.stdout

    keys = s3_server.keys(bucket)
    assert any(k.startswith("out/ray/multinode-s3/checkpoint") for k in keys), keys
    assert any("guide-cache" in k and k.endswith("manifest.json") for k in keys), keys
    assert any(k.startswith("mlflow/") for k in keys), keys
    assert out["model_dir"].startswith(f"{bucket}/out")
    # every node staged the data and the guide cache into its own folder, never a shared one
    staged = {node: files for node, files in out["node_caches"].items() if files}
    assert {"worker-0", "replacement"} <= set(staged), out["node_caches"]
    for node in ("worker-0", "replacement"):
        assert any(f.startswith("staged/") for f in staged[node]), (node, staged[node])
        assert any(f.startswith("guide-cache-staged/") for f in staged[node]), (node, staged[node])
    assert local_s3_folders(Path(__file__).parents[1]) == [] and local_s3_folders(tmp_path) == []

    model = storage.download(out["model_dir"], tmp_path / "model")
    weights = load_file(str(model / "model.safetensors"))
    for name, expected in reference["weights"].items():
        torch.testing.assert_close(weights[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    history = client.get_metric_history(out["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in range(1, STEPS + 1)] == pytest.approx(reference["losses"], rel=1e-5)
