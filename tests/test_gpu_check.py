"""benchmarks/gpu_check.py, the device run, on CPU: ``--smoke`` runs every stage under the Triton
interpreter with Ray, MLflow and datasets hidden from the stages (the GPU machine has none of
them), and a stage that crashes or hangs loses only itself (the fault is injected with the
test-only ``GPU_CHECK_FAULT=<stage>:abort|hang``). Fresh processes, tens of seconds: slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["smoke", "correctness", "speed", "references", "max_n", "train_step"]
HEAVY = "ray,mlflow,datasets"


def _gpu_check(out: Path, *args: str, fault: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_CHECK_FAULT")}
    env["PYTHONPATH"] = str(ROOT)
    if fault:
        env["GPU_CHECK_FAULT"] = fault
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def _merged(out: Path) -> dict:
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_smoke_runs_every_stage_ok_without_ray_mlflow_datasets(tmp_path):
    proc = _gpu_check(tmp_path, "--block", HEAVY)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    merged = _merged(tmp_path)
    assert merged["complete"] and list(merged["stages"]) == STAGES
    for name, st in merged["stages"].items():
        assert st["status"] == "ok", (name, st)
        assert st["blocked"] == sorted(HEAVY.split(",")) and st["heavy_imports"] == [], name
        assert st["cases"] and all(c["ok"] for c in st["cases"].values()), name
    header = json.loads((tmp_path / "header.json").read_text())
    assert header == merged["header"] and header["versions"]["torch"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(f"----- stage {name} log -----" in log for name in STAGES)
    cases = merged["stages"]["correctness"]["cases"]
    for dtype in ("bf16", "fp16", "fp32"):  # the seams were crossed, read off the launches
        assert cases[f"seams {dtype}"]["fwd_column_splits"] > 1
        assert cases[f"seams {dtype}"]["bwd_chunks"] > 1
    assert cases["sm80 pointer plan bf16"]["tma"] == ["False"]
    assert cases["dtype training feeds the loss"]["kernel_input"] == "float32"  # CPU: no autocast
    step = merged["stages"]["train_step"]["cases"]
    assert step["gradient caching equals the plain step"]["grad_cosine"] > 0.9999
    refs = merged["stages"]["references"]["cases"]
    assert refs["materialised fp32 and bf16 references vs the kernel"]["triton_vs_fp32_reference"]
    # Targets are recorded with the measured values, and apply on a GPU only.
    assert [t["applies"] for t in merged["targets"]] == [False] * 5
    assert merged["targets"][3]["measured"] == 256  # max_n reached --n-cap under --smoke
    assert (tmp_path / "profile_bf16.txt").read_text().strip()


@pytest.mark.slow
def test_a_crashing_stage_loses_only_itself(tmp_path):
    proc = _gpu_check(tmp_path, "--stages", "smoke,speed,max_n", fault="speed:abort")
    assert proc.returncode == 1
    stages = _merged(tmp_path)["stages"]
    assert [s["status"] for s in stages.values()] == ["ok", "crashed", "ok"]
    assert stages["speed"]["exit_status"] != 0
    tb = (tmp_path / stages["speed"]["traceback_file"]).read_text()
    assert "Fatal Python error: Aborted" in tb and "inject_fault" in tb  # faulthandler's dump
    assert (tmp_path / "header.json").exists()
    assert (
        "GPU_CHECK_FAULT: injecting 'abort' into stage speed"
        in (tmp_path / "gpu_check.log").read_text()
    )


@pytest.mark.slow
def test_a_hanging_stage_is_stopped_with_its_traceback(tmp_path):
    proc = _gpu_check(tmp_path, "--stages", "speed,max_n", "--timeout", "speed=12",
                      fault="speed:hang")  # fmt: skip
    assert proc.returncode == 1
    stages = _merged(tmp_path)["stages"]
    assert [s["status"] for s in stages.values()] == ["timeout", "ok"]
    assert stages["speed"]["wall_s"] < 12 + 10
    tb = (tmp_path / stages["speed"]["traceback_file"]).read_text()
    assert "Timeout (0:00:09)!" in tb and "inject_fault" in tb  # every thread's stack
