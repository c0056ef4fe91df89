"""The loss and the kernels import and run without Ray, MLflow or datasets (the GPU machine
has none of them), and importing ``gist_ray.loss`` does not import triton (so a test can still
choose the interpreter before the kernels are defined). Each test starts fresh Python processes
(5-25 s): marked slow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "mlflow", "datasets"):
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Block())
"""


def _run(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK + code], capture_output=True, text=True, env=full_env,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_loss_runs_without_ray_mlflow_datasets_or_triton():
    out = _run(
        "import torch, gist_ray.loss as L\n"
        "assert 'triton' not in sys.modules, 'gist_ray.loss imports triton'\n"
        "x = [torch.randn(6, 8, requires_grad=True) for _ in range(3)]\n"
        "g = [torch.randn(6, 5) for _ in range(3)]\n"
        "loss, stats = L.GistLoss()(x, g)\n"
        "loss.backward()\n"
        "print(float(loss), 'gist_ray.kernels.gist_kernels' in sys.modules)\n"
    )
    assert out.split()[1] == "False", "the CPU path loaded the Triton kernels"


@pytest.mark.slow
def test_kernels_and_compile_gate_import_without_ray_mlflow_datasets():
    _run(
        "import gist_ray.kernels.gist_function, gist_ray.kernels.compile_check\n"
        "import gist_ray.loss.op\n",
        TRITON_INTERPRET="1",
    )
    _run("import gist_ray.kernels.gist_function, gist_ray.kernels.compile_check\n")


@pytest.mark.slow
def test_gpu_check_imports_from_a_plain_checkout():
    """benchmarks/gpu_check.py runs from the checkout, without install (the GPU machine)."""
    _run(
        "import runpy; sys.argv = ['gpu_check.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
    )
