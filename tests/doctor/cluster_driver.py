"""Driver of tests/doctor/test_cluster.py, in its own process (a process joins one Ray cluster,
and a test session may already hold the shared local one): ``python -m
tests.doctor.cluster_driver RESULT.json RUNS.json``, RUNS.json a list of argument lists.

Starts a real Ray cluster of three nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head
without CPUs and two worker nodes of one CPU each, none with a GPU), runs ``gist-ray doctor
--address ADDR ARGS...`` against it as a user would (a separate process) once per argument list,
and writes each run's exit status and output, and the nodes' ids, to RESULT.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(result_path: str, runs_path: str) -> None:
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="grd-")  # short: Ray's socket paths live under it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        exe = shutil.which("gist-ray") or f"{sys.executable} -m gist_ray.cli"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        runs = []
        for args in json.loads(Path(runs_path).read_text()):
            proc = subprocess.run(
                [*exe.split(), "doctor", "--address", cluster.address, *args],
                capture_output=True, text=True, timeout=600, env=env,
            )  # fmt: skip
            runs.append({"returncode": proc.returncode, "stdout": proc.stdout,
                         "stderr": proc.stderr[-5000:]})  # fmt: skip
        result = {"runs": runs, "head": cluster.head_node.node_id,
                  "workers": [w.node_id for w in workers]}  # fmt: skip
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
