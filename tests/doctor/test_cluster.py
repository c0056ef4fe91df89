"""``gist-ray doctor --address`` on a real Ray cluster of several nodes on this machine: one
Ray task per node, pinned to it, one table per node, the nodes without the resources named, and
nodes that do not answer in time reported as failed (tests/doctor/cluster_driver.py starts the
cluster and runs the command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_every_cpu_node_of_a_cluster_reports_its_own_table(tmp_path):
    result, report, late = (
        tmp_path / "result.json",
        tmp_path / "doctor.json",
        tmp_path / "late.json",
    )
    runs = tmp_path / "runs.json"
    runs.write_text(
        json.dumps([["--json", str(report)], ["--timeout", "0.5", "--json", str(late)]])
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.doctor.cluster_driver", str(result), str(runs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(result.read_text())
    first, second = out["runs"]
    assert first["returncode"] == 0, first["stdout"] + first["stderr"]
    text = first["stdout"]

    doc = json.loads(report.read_text())
    assert doc["ok"] is True
    nodes = doc["machines"]
    assert sorted(n["node_id"] for n in nodes) == sorted(out["workers"])  # each node once
    for node in nodes:
        assert [(c["case"], c["backend"], c["ok"]) for c in node["checks"]] == [
            ("small", "chunked", True), ("seams", "chunked", True),
        ]  # fmt: skip
        assert node["gpus"] == [] and node["versions"]["torch"]
        assert any("Triton kernel was NOT checked" in n for n in node["notes"])
        title = f"node {node['node_ip']} ({node['host']}, node id {node['node_id'][:12]})"
        assert text.count(title) == 1
    assert [n["node_id"] for n in doc["skipped_nodes"]] == [out["head"]]  # no CPU: no task
    assert f"node id {out['head'][:12]}): not checked (no CPU)" in text
    assert text.count("device  backend") == 2  # one table per node
    assert text.rstrip().endswith("verdict: OK (4 checks passed on 2 nodes)")

    # Nodes that do not answer in time: each one a failed check, exit status 1.
    assert second["returncode"] == 1, second["stdout"] + second["stderr"]
    lines = second["stdout"][second["stdout"].index("verdict:") :].splitlines()
    assert lines[0] == "verdict: FAILED (2 of 2 checks failed on 2 nodes)"
    for line in lines[1:]:
        assert line.startswith("FAILED node ") and "did not finish within 0.5 s" in line
    assert [m["ok"] for m in json.loads(late.read_text())["machines"]] == [False, False]
