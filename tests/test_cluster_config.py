"""The shipped cluster files and example configs: they parse, validate and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gist_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_cluster_yaml_passes_rays_own_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    # What `ray up` runs before it talks to the cloud: defaults merged, schema and cross-checks.
    validate_config(prepare_config(cluster))
    nodes = cluster["available_node_types"]
    head = nodes[cluster["head_node_type"]]
    gpu = [n for name, n in nodes.items() if name != cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "training workers must not land on the head"
    assert gpu and all(0 <= n["min_workers"] <= n["max_workers"] for n in gpu)
    assert any("gist-ray" in cmd for cmd in cluster["setup_commands"])


def test_kuberay_rayjob_manifest_parses():
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("gist-ray train --config ")
    config_name = Path(job["spec"]["entrypoint"].split()[-1]).name
    assert (ROOT / "configs" / config_name).is_file(), "the RayJob runs a shipped config"
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    load_config(path)


def test_cpu_default_config_equals_the_built_in_defaults():
    assert load_config(ROOT / "configs" / "cpu-default.yaml") == Config()


def test_gpu_configs_use_gpus_and_multinode_uses_shared_storage():
    from gist_ray.launch.resources import is_shared_storage

    one = load_config(ROOT / "configs" / "gpu-1node.yaml")
    many = load_config(ROOT / "configs" / "gpu-multinode.yaml")
    assert one.ray.use_gpu and many.ray.use_gpu
    assert many.ray.num_workers > one.ray.num_workers
    assert many.train.batch_size > one.train.batch_size
    assert many.ray.storage_path and is_shared_storage(many.ray.storage_path)
    assert one.mlflow.run_name and many.mlflow.run_name, "named runs resume on rerun"
    assert one.train.max_failures >= 1 and many.train.max_failures >= 1


def test_object_storage_config_keeps_nothing_on_a_local_disk():
    """What the KubeRay RayJob runs: pods share no disk, so every location is a URI."""
    from gist_ray.core import storage
    from gist_ray.launch.resources import storage_path

    cfg = load_config(ROOT / "configs" / "object-storage.yaml")
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].endswith("/object-storage.yaml")
    locations = [cfg.data.train, cfg.output_dir, storage_path(cfg), cfg.mlflow.artifact_location]
    assert all(storage.is_remote(loc) for loc in locations), locations
    gpus = sum(
        int(g["replicas"])
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.ray.use_gpu and cfg.ray.num_workers <= gpus


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ray.resource_wait_s=-1", "ray.resource_wait_s = -1 is not allowed"),
        ("mlflow.run_name=a/b", "mlflow.run_name = 'a/b' is not allowed"),
    ],
)
def test_cluster_keys_are_validated(override, needle):
    from gist_ray.core.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[override])
