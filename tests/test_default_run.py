"""The README's default run, `gist-ray train` with no config, at a reduced size: the real
offline student (all-MiniLM-L6-v2) and guide (all-mpnet-base-v2), built-in InsuranceQA, a local
2-worker Ray cluster and MLflow in the working directory — through the installed console script.

Its terminal output is what a user reads: our progress lines and the summary, and no line from
Ray, MLflow or transformers (those are in ``<output_dir>/gist-ray.log``, and on the terminal
with ``--verbose``), no warning and no error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REDUCED = ["train.max_steps=2", "data.max_examples=64", "eval.max_queries=12", "eval.max_corpus=60"]
# What other programs print on a run, and where it comes from.
THIRD_PARTY = {
    "Ray": re.compile(r"\((TrainController|RayTrainWorker|PlacementGroupCleaner) pid=|worker\.py"),
    "Ray Train": re.compile(r"Reporting training result|Checkpoint successfully created"),
    "MLflow": re.compile(r"INFO mlflow\.|Downloading artifacts"),
    # transformers' tqdm bars, sentence-transformers' INFO lines (models load through it)
    "transformers": re.compile(
        r"Loading weights|Writing model shards|Loading SentenceTransformer model|Saving model to"
    ),
}
PROBLEM = re.compile(r"\b(WARNING|ERROR|Traceback|warning|error)\b")


def _train(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("gist-ray") or f"{sys.executable} -m gist_ray.cli"
    sets = sum((["--set", s] for s in REDUCED), [])
    env = {**os.environ, "GIST_RAY_CACHE": str(cwd.parent / "cache"), "HF_HUB_OFFLINE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(key, None)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [*exe.split(), "train", *sets, *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    root = tmp_path_factory.mktemp("default-run")
    return root / "quiet", _train(root / "quiet")


@pytest.fixture(scope="module")
def verbose(quiet):
    """The same run with --verbose (after the quiet one: the guide cache is built)."""
    cwd = quiet[0].parent / "verbose"
    return cwd, _train(cwd, "--verbose")


def test_default_run_reduced(quiet):
    tmp_path, proc = quiet
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for metric in ("ndcg@10", "recall@10", "mrr@10"):
        row = re.search(
            rf"^{re.escape(metric)}\s+([0-9.]+)\s+([0-9.]+)\s+([-+][0-9.]+)$", out, re.M
        )
        assert row, f"no before/after row for {metric} in:\n{out[-2000:]}"
        assert 0 <= float(row.group(1)) <= 1 and 0 <= float(row.group(2)) <= 1
    model = tmp_path / "gist-ray-output" / "model"
    assert (model / "modules.json").is_file() and (model / "model.safetensors").is_file()
    assert (tmp_path / "mlflow.db").is_file()
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in out
    assert Path(model, "config.json").read_text().count('"hidden_size": 384')


def test_the_terminal_shows_our_lines_only(quiet):
    tmp_path, proc = quiet
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    log = tmp_path / "gist-ray-output" / "gist-ray.log"
    # our progress: what is loaded, the guide cache, one line per step (not a terminal), eval
    for line in (
        "[gist-ray] loading student all-MiniLM-L6-v2, guide all-mpnet-base-v2",
        "[gist-ray] starting a local Ray cluster",
        "[gist-ray] guide cache of 'insuranceqa' built in ",
        "[gist-ray] step 1/2 loss ",
        "[gist-ray] step 2/2 loss ",
        "[gist-ray] evaluating all-MiniLM-L6-v2 before training",
    ):
        assert line in proc.stdout, f"{line!r} missing from:\n{proc.stdout}"
    assert proc.stdout.rstrip().splitlines()[-1] == f"full log:    {log}"
    for source, pattern in THIRD_PARTY.items():
        assert not pattern.search(terminal), f"{source} on the terminal:\n{terminal}"
    assert not PROBLEM.search(terminal), terminal
    assert proc.stderr == ""
    text = log.read_text()
    for source in ("Ray", "Ray Train", "MLflow"):
        assert THIRD_PARTY[source].search(text), f"no {source} line in the log:\n{text[-3000:]}"
    assert "[gist-ray] step 2/2 loss" in text  # our worker lines too


def test_verbose_shows_the_other_programs_live(verbose):
    tmp_path, proc = verbose
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    text = (tmp_path / "gist-ray-output" / "gist-ray.log").read_text()
    for source, pattern in THIRD_PARTY.items():
        assert pattern.search(terminal), f"no {source} line with --verbose:\n{terminal[-3000:]}"
        assert pattern.search(text), f"no {source} line in the log:\n{text[-3000:]}"
    assert "[gist-ray] step 2/2 loss " in proc.stdout


def test_a_failing_run_names_its_log(tmp_path):
    proc = _train(tmp_path / "failing", "--set", "data.train=missing.csv")
    log = tmp_path / "failing" / "gist-ray-output" / "gist-ray.log"
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gist-ray: error: missing.csv does not exist")
    assert line.endswith(f"(full log: {log})")
    assert "DataError" in log.read_text()  # the traceback is in the log
