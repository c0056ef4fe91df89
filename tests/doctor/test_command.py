"""``gist-ray doctor`` on this CPU machine through the real command line: the table, the
verdict, the JSON, the config's Matryoshka widths, hardness and dtypes, the all-gather with gloo
processes, a broken kernel reported as FAILED with exit status 1, and no Ray, MLflow or
datasets imported by the local check (the GPU machine has none of them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from gist_ray.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _doctor(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("gist-ray") or f"{sys.executable} -m gist_ray.cli"
    return subprocess.run([*exe.split(), "doctor", *args], capture_output=True, text=True,
                          timeout=600, env=_env(), cwd=cwd)  # fmt: skip


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600, env=_env(), cwd=cwd)  # fmt: skip


def _rows(stdout: str) -> list[list[str]]:
    """The table's rows (after its header line), split on runs of 2+ spaces."""
    import re

    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("device  backend"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith(("note:", "speed", "verdict")):
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_doctor_prints_its_table_and_verdict_and_writes_json(tmp_path):
    out = tmp_path / "report" / "doctor.json"
    proc = _doctor("--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    text = proc.stdout
    assert f"torch {torch.__version__}" in text and "GPUs: none" in text
    rows = _rows(text)
    assert [(r[0], r[1], r[3], r[4], r[5], r[-1]) for r in rows] == [
        ("cpu", "chunked", "float32", "plain", "small", "OK"),
        ("cpu", "chunked", "float32", "plain", "seams", "OK"),
    ]
    assert "(2 chunks)" in rows[1][6]
    assert "the Triton kernel was NOT checked" in text
    assert text.rstrip().endswith("verdict: OK (2 checks passed)")

    doc = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["doctor.json"]  # written atomically
    assert doc["ok"] is True and doc["skipped_nodes"] == []
    (machine,) = doc["machines"]
    assert machine["versions"]["torch"] == torch.__version__ and machine["gpus"] == []
    small, seams = machine["checks"]
    for r in (small, seams):
        assert r["ok"] and r["backend"] == "chunked" and r["dtype"] == "float32"
        assert r["loss_err"] <= r["tolerance"] == 1e-4 and r["grad_err"] <= r["tolerance"]
        assert r["mask_mismatch_rows"] == 0
    assert small["chunks"] == 1 and seams["chunks"] == 2
    assert seams["offset"] < seams["chunk"] < seams["offset"] + seams["b"]
    assert doc["settings"]["matryoshka_dims"] == [] and doc["settings"]["hardness_alpha"] == 0


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"model_kwargs": {"dtype": "bfloat16"}},
        "loss": {"matryoshka_dims": [48, 16], "matryoshka_weights": [1.0, 0.5],
                 "hardness_alpha": 2.0, "hardness_mode": "in_batch_negatives",
                 "margin": 0.1, "margin_strategy": "relative", "temperature": 0.05},
    }))  # fmt: skip
    return config


VARIANT = "widths 48/16, hardness 2 in_batch_negatives"


def test_the_configs_matryoshka_hardness_and_dtype_are_checked(tmp_path):
    out = tmp_path / "doctor.json"
    proc = _doctor("--config", str(_config(tmp_path)), "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert [(r[3], r[4], r[5], r[-1]) for r in rows] == [
        ("float32", VARIANT, "small", "OK"), ("bfloat16", VARIANT, "small", "OK"),
        ("float32", VARIANT, "seams", "OK"), ("bfloat16", VARIANT, "seams", "OK"),
    ]  # fmt: skip
    assert "verdict: OK (4 checks passed)" in proc.stdout
    doc = json.loads(out.read_text())
    s = doc["settings"]
    assert s["matryoshka_dims"] == [48, 16] and s["hardness_mode"] == "in_batch_negatives"
    assert s["cpu_dtypes"] == ["float32", "bfloat16"] and s["temperature"] == 0.05
    checks = doc["machines"][0]["checks"]
    assert [c["d"] for c in checks] == [48] * 4  # the widest width is the student's
    assert all(c["mask_mismatch_rows"] == 0 and 0 < c["masked_fraction"] < 0.5 for c in checks)


@pytest.mark.slow  # several processes
def test_the_all_gather_of_two_gloo_processes_equals_one_process(tmp_path):
    out = tmp_path / "doctor.json"
    proc = _doctor("--config", str(_config(tmp_path)), "--processes", "2", "--set",
                   "model.model_kwargs={}", "--json", str(out), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert [(r[3], r[4], r[5], r[6], r[-1]) for r in rows][-1] == (
        "float32", VARIANT, "all-gather", "2x b=16", "OK")  # fmt: skip
    assert "verdict: OK (3 checks passed)" in proc.stdout
    gather = json.loads(out.read_text())["machines"][0]["checks"][-1]
    assert gather["processes"] == 2 and gather["pool"] == 32
    assert gather["loss_err"] <= gather["tolerance"] and gather["grad_err"] <= gather["tolerance"]


BROKEN_KERNEL = """
    import sys, torch
    from gist_ray.loss import chunked, op

    # A backward that loses the candidates' gradient past the first column chunk: right on
    # any pool of one chunk, wrong once the pool crosses a seam.
    def backward(grad, lse, bits, norms, *args):
        problems, _ = op._unpack(args)
        dleft, dcands = chunked.backward(problems, grad, lse, bits)
        for g in dcands:
            g[chunked.chunk_width(problems[0].rows):] = 0
        return [*dleft, *dcands]

    lib = torch.library.Library("gist_ray", "IMPL")
    lib.impl("gist_rows_backward", backward, "CPU")  # the op every tiled backward runs
    from gist_ray.cli import main
    sys.exit(main(["doctor", "--json", sys.argv[1]]))
"""


def test_a_broken_kernel_is_reported_failed_with_exit_status_1(tmp_path):
    out = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(BROKEN_KERNEL), str(out)],
                          capture_output=True, text=True, timeout=600, env=_env(),
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert [(r[5], r[-1]) for r in rows] == [("small", "OK"), ("seams", "FAILED")]
    verdict = proc.stdout[proc.stdout.index("verdict:") :].splitlines()
    assert verdict[0] == "verdict: FAILED (1 of 2 checks failed)"
    assert verdict[1].startswith("FAILED cpu chunked float32 seams: gradient error ")
    doc = json.loads(out.read_text())
    assert doc["ok"] is False
    assert [c["ok"] for c in doc["machines"][0]["checks"]] == [True, False]


def test_the_local_check_needs_neither_ray_nor_mlflow_nor_datasets(tmp_path):
    """As on the GPU machine: those packages cannot be imported at all."""
    code = """
        import sys
        from importlib.abc import MetaPathFinder

        class Absent(MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("ray", "mlflow", "datasets"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Absent())
        from gist_ray.cli import main
        rc = main(["doctor", "--no-speed"])
        print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"ray", "mlflow",
              "datasets"}))
        sys.exit(rc)
    """
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "verdict: OK" in proc.stdout and "imported: []" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--processes", "1"], "--processes 1: 0 (no all-gather check) or 2 or more"),
        (["--timeout", "0"], "--timeout 0: must be > 0"),
        (["--set", "loss.temperature=0"], "loss.temperature = 0.0 is not allowed; must be > 0"),
        (
            ["--set", "loss.hardness_mode=some"],
            "loss.hardness_mode = 'some' is not allowed; one of",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["doctor", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
