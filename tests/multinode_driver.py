"""Driver of tests/test_multinode.py, run in its own process (one Ray cluster per driver):
``python -m tests.multinode_driver SPEC.json RESULT.json``.

Starts a Ray cluster of three real nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head
without CPUs for the driver and Ray Train's controller, and two worker nodes of one CPU each, so
the two training workers land on different nodes). It checks that gist-ray refuses the
node-local storage path on it, then trains with ``ray.shared_storage`` declared (every node of
this cluster sees the same temp dir). When the first checkpoint is committed it removes one
worker node, processes and all, and adds a replacement; Ray Train restarts the worker group
from that checkpoint. Writes what the test checks to RESULT.json.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


def _replace_a_node_after_first_checkpoint(
    cluster, node, run_dir: str, training, node_args
) -> dict:
    """Runs on the main thread (Ray starts nodes only there) while ``training`` runs."""
    from gist_ray.core import storage

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and training.is_alive():
        # Ray Train writes this snapshot once a checkpoint is committed to storage.
        if storage.kind(storage.join(run_dir, "checkpoint_manager_snapshot.json")) == "file":
            committed = sorted(
                {e.relpath.split("/")[0] for e in storage.listing(run_dir)}
                - {"checkpoint_manager_snapshot.json"}
            )
            committed = [c for c in committed if c.startswith("checkpoint")]
            cluster.remove_node(node, allow_graceful=False)
            cluster.add_node(**node_args("replacement"))
            return {"killed_after": committed, "removed_node": node.node_id, "replaced": True}
        time.sleep(0.2)
    return {"error": "training ended or no checkpoint appeared within 900 s"}


def main(spec_path: str, result_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from gist_ray.commands.train import train
    from gist_ray.config import load_config_dict
    from gist_ray.core import log
    from gist_ray.core.errors import GistRayError
    from gist_ray.launch import resources

    log.configure()
    spec = json.loads(Path(spec_path).read_text())
    cfg = load_config_dict(spec["config"])
    result: dict = {}
    # Processes Ray starts without an address (Ray Train's placement-group cleaner) would pick
    # "the latest" of the machine's clusters: name ours before any of its processes starts.
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": port})
    caches = Path(result_path).with_suffix(".node-caches")
    object_storage = bool(spec.get("object_storage"))

    def node_args(name: str) -> dict:
        if not object_storage:
            return {"num_cpus": 1}
        return {"num_cpus": 1, "env_vars": {"GIST_RAY_CACHE": str(caches / name)}}

    try:
        workers = [cluster.add_node(**node_args(f"worker-{i}")) for i in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        result["alive_nodes"] = sum(1 for n in ray.nodes() if n["Alive"])
        try:
            resources.check_resources(cfg)
        except GistRayError as e:
            result["local_storage_refused"] = str(e)
        cfg.ray.address = cluster.address
        cfg.ray.shared_storage = not object_storage
        outcome: dict = {}

        def run() -> None:
            try:
                outcome.update(train(cfg))
            except BaseException as e:  # noqa: BLE001 - reported to the test
                outcome["error"] = f"{type(e).__name__}: {e}"

        training = threading.Thread(target=run, daemon=True)
        training.start()
        from gist_ray.core import storage

        run_dir = storage.join(resources.storage_path(cfg), spec["run_name"])
        events = _replace_a_node_after_first_checkpoint(
            cluster, workers[1], run_dir, training, node_args
        )
        training.join()
        if "error" in outcome:
            raise RuntimeError(outcome["error"])
        out = outcome
        result.update(
            events=events,
            run_id=out["run_id"],
            model_dir=out["model_dir"],
            alive_nodes_after=sum(1 for n in ray.nodes() if n["Alive"]),
            node_caches={
                p.name: sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
                for p in sorted(caches.glob("*"))
            },
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
        Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
