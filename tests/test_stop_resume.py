"""Stopping and resuming `gist-ray train` as a person does, in a pseudo-terminal: Ctrl-C mid-
training, a plain rerun of the same command, a changed config, `--fresh` stopped by SIGTERM.

One tiny random BERT trained for many short steps (one Ray worker) so that an interrupt lands
mid-training: each scenario waits for the run's first checkpoint folder in storage, then
interrupts. The CLI runs as a subprocess (its own local Ray cluster, started and removed by
gist-ray), the scenarios in order on one output folder. The resumed run must end with the same
weights as an uninterrupted one: the same per-worker code under plain torch.distributed (one
process, no Ray), seeded, dropout on.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300
EVERY = 5
EXPERIMENT = "stop-resume"


def _run(args: list[str], cwd: Path, stop_when=None, sig=None, timeout=300.0):
    """``gist-ray ARGS`` on a pseudo-terminal; once ``stop_when()`` holds, Ctrl-C is typed
    (``sig`` SIGINT) or ``sig`` is sent to the process. Returns (exit status, output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("RAY_ADDRESS", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, with the terminal as its stdin/stdout/stderr
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "gist_ray.cli", *args], env)
    out, sent, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if stop_when is not None and not sent and stop_when():
                if sig == signal.SIGINT:
                    os.write(fd, b"\x03")  # what the terminal turns into SIGINT
                else:
                    os.kill(pid, sig)
                sent = True
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"gist-ray {' '.join(args)} ran past {timeout:.0f}s:\n{out.decode()}")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert sent or stop_when is None, "the run ended before it could be interrupted"
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace").replace("\r\n", "\n")


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "ray").glob("*/checkpoint-*"))


def _runs(db: Path) -> dict[str, str]:
    """run id -> status of every run in the experiment."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    return {r.info.run_id: r.info.status for r in client.search_runs([exp.experiment_id])}


def _reference_worker(rank: int, cfg_dict: dict, port: int) -> None:
    """The uninterrupted run: train_worker under plain torch.distributed (world of one, like the
    single Ray worker), one thread, checkpoints in a local folder."""
    import torch.distributed as dist

    from gist_ray.config import load_config_dict
    from gist_ray.train.checkpoint import LocalReporter
    from gist_ray.train.loop import train_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        cfg = load_config_dict(cfg_dict)
        train_worker(cfg, LocalReporter(cfg.output_dir))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tiny_models, tiny_pairs_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("stop")
    config = {
        "model": {
            "student": str(tiny_models["student"]),
            "guide": str(tiny_models["guide"]),
            "max_seq_length": 32,
        },
        "data": {"train": str(tiny_pairs_file), "max_examples": 0},
        "eval": {"source": ""},
        "train": {"batch_size": 8, "max_steps": STEPS, "checkpoint_every": EVERY, "lr": 1e-3},
        "ray": {"num_workers": 1, "num_cpus": 2},
        "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": EXPERIMENT},
        "output_dir": str(root / "out"),
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "out": root / "out", "db": root / "mlflow.db", "config": config}


@pytest.fixture(scope="module")
def reference(setup):
    from safetensors.torch import load_file

    from gist_ray.config import load_config

    out = setup["root"] / "reference"
    cfg = load_config(overrides=[f"{k}={v}" for k, v in _flat(setup["config"]).items()])
    cfg.output_dir = str(out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_reference_worker, args=(cfg.to_dict(), port), nprocs=1)
    final = out / "checkpoints" / f"checkpoint-{STEPS:07d}" / "model" / "model.safetensors"
    return load_file(str(final))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def interrupted(setup):
    """Ctrl-C once the first checkpoint is committed (the second is being written: a worker
    starts the next only once Ray committed the last)."""
    out = setup["out"]
    code, text = _run(
        ["train", "--config", "run.yaml"],
        setup["root"],
        stop_when=lambda: len(_checkpoints(out)) >= 2,
        sig=signal.SIGINT,
    )
    return {"code": code, "text": text, "runs": _runs(setup["db"]), "out": out}


@pytest.fixture(scope="module")
def resumed(setup, interrupted):
    code, text = _run(["train", "--config", "run.yaml"], setup["root"])
    return {"code": code, "text": text, "runs": _runs(setup["db"])}


STOPPED = re.compile(
    r"gist-ray: interrupted at step (\d+); last checkpoint at step (\d+); "
    r"rerun the same command( without --fresh)? to resume"
)


def test_ctrl_c_says_where_it_stopped_exits_130_and_marks_the_run_killed(interrupted):
    assert interrupted["code"] == 130, interrupted["text"]
    found = STOPPED.search(interrupted["text"])
    assert found, interrupted["text"]
    reached, saved = int(found.group(1)), int(found.group(2))
    assert saved >= EVERY and saved % EVERY == 0 and reached >= saved
    assert f"checkpoint-{saved:07d}" in {p.name for p in _checkpoints(interrupted["out"])}
    assert list(interrupted["runs"].values()) == ["KILLED"]
    assert "Traceback" not in interrupted["text"]
    # The bar was closed: the line starts a line of its own.
    line_start = interrupted["text"].index("gist-ray: interrupted")
    assert line_start == 0 or interrupted["text"][line_start - 1] == "\n"


def test_rerun_resumes_the_same_mlflow_run_and_matches_an_uninterrupted_run(
    setup, interrupted, resumed, reference
):
    from safetensors.torch import load_file

    assert resumed["code"] == 0, resumed["text"]
    saved = int(STOPPED.search(interrupted["text"]).group(2))
    assert f"resuming the run in {setup['out']} from step {saved}/{STEPS}" in resumed["text"]
    assert resumed["runs"] == {run_id: "FINISHED" for run_id in interrupted["runs"]}
    weights = load_file(str(setup["out"] / "model" / "model.safetensors"))
    assert weights.keys() == reference.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_finished_run_keeps_one_copy_of_each_thing_and_no_empty_folder(setup, resumed):
    out = setup["out"]
    assert not (out / "final-checkpoint").exists()
    assert not (out / "checkpoints-staging").exists()
    empty = [p for p in out.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert empty == []
    on_disk = re.search(r"on disk: +([\d.]+ [KMG]?B) in (\S+) \(model ", resumed["text"])
    assert on_disk and on_disk.group(2) == str(out), resumed["text"]
    assert "checkpoints " in resumed["text"] and str(out / "ray") in resumed["text"]


def test_a_changed_model_is_refused_in_one_line_naming_the_key(setup, resumed, tiny_models):
    code, text = _run(
        ["train", "--config", "run.yaml", "--set", f"model.student={tiny_models['guide']}"],
        setup["root"],
    )
    assert code == 2, text
    (line,) = [s for s in text.splitlines() if s.startswith("gist-ray: error:")]
    assert "model.student (" in line and "--fresh" in line
    assert _runs(setup["db"]) == resumed["runs"], "no MLflow run was opened or changed"


def test_fresh_starts_over_and_sigterm_exits_143(setup, resumed):
    out = setup["out"]
    old = set(_checkpoints(out))
    code, text = _run(
        ["train", "--config", "run.yaml", "--fresh"],
        setup["root"],
        stop_when=lambda: len(set(_checkpoints(out)) - old) >= 2,
        sig=signal.SIGTERM,
    )
    assert code == 143, text
    assert "--fresh: removed the earlier checkpoints" in text and "resuming" not in text
    assert STOPPED.search(text) and STOPPED.search(text).group(3), "rerun without --fresh: " + text
    assert not any(p.exists() for p in old), "the earlier run's checkpoints were removed"
    runs = _runs(setup["db"])
    (new,) = set(runs) - set(resumed["runs"])
    assert runs[new] == "KILLED" and {k: runs[k] for k in resumed["runs"]} == resumed["runs"]
    record = json.loads((out / "run.json").read_text())
    assert record["mlflow_run_id"] == new
    # Started at step 0 in a folder of its own, not from the finished run's last checkpoint.
    assert {p.parent for p in _checkpoints(out)} == {out / "ray" / record["ray_name"]}
    assert {p.parent for p in old} != {out / "ray" / record["ray_name"]}
    assert int(STOPPED.search(text).group(2)) < STEPS
