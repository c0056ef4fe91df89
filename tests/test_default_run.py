"""The README's default run, `gist-ray train` with no config, at a reduced size: the real
offline student (all-MiniLM-L6-v2) and guide (all-mpnet-base-v2), built-in InsuranceQA, a local
2-worker Ray cluster and MLflow in the working directory — through the installed console script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_default_run_reduced(tmp_path):
    exe = shutil.which("gist-ray") or f"{sys.executable} -m gist_ray.cli"
    reduced = [
        "train.max_steps=2",
        "data.max_examples=64",
        "eval.max_queries=12",
        "eval.max_corpus=60",
    ]
    cmd = [*exe.split(), "train", *sum((["--set", s] for s in reduced), [])]
    env = {**os.environ, "GIST_RAY_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for metric in ("ndcg@10", "recall@10", "mrr@10"):
        row = re.search(
            rf"^{re.escape(metric)}\s+([0-9.]+)\s+([0-9.]+)\s+([-+][0-9.]+)$", out, re.M
        )
        assert row, f"no before/after row for {metric} in:\n{out[-2000:]}"
        assert 0 <= float(row.group(1)) <= 1 and 0 <= float(row.group(2)) <= 1
    assert "step 2/2" in out + proc.stderr
    model = tmp_path / "gist-ray-output" / "model"
    assert (model / "modules.json").is_file() and (model / "model.safetensors").is_file()
    assert (tmp_path / "mlflow.db").is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    assert Path(model, "config.json").read_text().count('"hidden_size": 384')
