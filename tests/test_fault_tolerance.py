"""Fault tolerance on a real 2-worker Ray Train run (tiny random BERTs, dropout on, SQLite MLflow).

Workers SIGKILL themselves between checkpoints (gist_ray.train.faults, GIST_RAY_FAULT_INJECT). With
``train.max_failures=1`` the first kill (rank 1 after step 3) is survived: Ray restarts both
workers from the step-2 checkpoint. The second (rank 0 after step 5) exceeds the budget and the
run fails, its last checkpoint at step 4. Rerunning the same command resumes it to the end;
rerunning it once more trains nothing. The result must equal an uninterrupted run of the same
config (plain torch.distributed, 2 processes, no Ray: the per-worker code is the same), and
MLflow must hold one run whose step axis has every step exactly once, with the same values.

Each Ray Train fit costs ~50 s on the 2-core CI machine (worker start-up), so the scenarios
share two fits: the one that fails after a restart, and the resume.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from gist_ray.config import load_config
from gist_ray.core.errors import GistRayError

STEPS = 6
EXPERIMENT = "fault-tolerance"


@contextlib.contextmanager
def _faults(spec: str):
    os.environ["GIST_RAY_FAULT_INJECT"] = spec
    try:
        yield
    finally:
        os.environ.pop("GIST_RAY_FAULT_INJECT", None)


def _reference_worker(
    rank: int, cfg_dict: dict, port: int, losses_file: str, world: int = 2
) -> None:
    """One rank of the uninterrupted reference: train_worker under plain torch.distributed, in a
    fresh process with one thread (``world`` = 1: the same conditions for a single process)."""
    import torch.distributed as dist

    from gist_ray.config import load_config_dict
    from gist_ray.train.checkpoint import LocalReporter
    from tests.conftest import run_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # like a Ray worker with one CPU
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config_dict(cfg_dict)
        result = run_worker(cfg, LocalReporter(cfg.output_dir))
        if rank == 0:
            Path(losses_file).write_text(json.dumps(result["losses"]))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def make_cfg(tiny_models, tiny_pairs_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")

    def cfg(name: str, *extra: str):
        return load_config(
            overrides=[
                f"model.student={tiny_models['student']}",
                f"model.guide={tiny_models['guide']}",
                "model.max_seq_length=32",
                f"data.train={tiny_pairs_file}",
                "data.max_examples=0",
                "eval.source=",
                "train.batch_size=8",
                f"train.max_steps={STEPS}",
                "train.checkpoint_every=2",
                "train.lr=1e-3",
                "ray.num_workers=2",
                f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
                f"mlflow.experiment={EXPERIMENT}",
                f"mlflow.run_name={name}",
                f"output_dir={root / name}",
                *extra,
            ]
        )

    return cfg


@pytest.fixture(scope="module")
def reference(make_cfg):
    """The uninterrupted run: per-step losses and final weights."""
    from safetensors.torch import load_file

    cfg = make_cfg("reference")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    losses_file = Path(cfg.output_dir) / "losses.json"
    Path(cfg.output_dir).mkdir(parents=True)
    torch.multiprocessing.spawn(
        _reference_worker, args=(cfg.to_dict(), port, str(losses_file)), nprocs=2
    )
    final = Path(cfg.output_dir) / "checkpoints" / f"checkpoint-{STEPS:07d}"
    return {
        "losses": json.loads(losses_file.read_text()),
        "weights": load_file(str(final / "model" / "model.safetensors")),
    }


@pytest.fixture(scope="module")
def runs(ray_cluster, make_cfg):
    """The 'ft' run: fails after one survived kill, then its command is rerun."""
    import mlflow

    from gist_ray.commands.train import train

    cfg = make_cfg("ft", "train.max_failures=1")
    stderr = io.StringIO()
    with _faults("1@3,0@5"), contextlib.redirect_stderr(stderr):
        with pytest.raises(Exception) as failed:  # noqa: B017 - Ray's error for a dead worker
            train(cfg)
    client = mlflow.MlflowClient(f"{cfg.mlflow.tracking_uri}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'ft'")
    after_failure = {
        "status": run.info.status,
        "steps": sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")),
    }
    resumed = train(cfg)
    return {
        "cfg": cfg,
        "error": failed.value,
        "stderr": stderr.getvalue(),
        "after_failure": after_failure,
        "resumed": resumed,
    }


def _history(result, key="loss"):
    import mlflow

    client = mlflow.MlflowClient(result["tracking_uri"])
    return sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)


def _assert_same_model(result, reference):
    from safetensors.torch import load_file

    weights = load_file(str(Path(result["model_dir"]) / "model.safetensors"))
    assert weights.keys() == reference["weights"].keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, reference["weights"][name], rtol=1e-5, atol=1e-6, msg=name)


def _assert_step_axis(result, reference):
    """Every step exactly once, with the uninterrupted run's values (dropout replayed)."""
    got = _history(result)
    assert [m.step for m in got] == list(range(1, STEPS + 1))
    torch.testing.assert_close(
        torch.tensor([m.value for m in got]), torch.tensor(reference["losses"])
    )
    for key in ("lr", "grad_norm", "mask_frac/ap"):
        assert [m.step for m in _history(result, key)] == list(range(1, STEPS + 1)), key


def test_killed_worker_is_restarted_from_the_last_checkpoint(runs):
    markers = Path(runs["cfg"].output_dir) / ".faults"
    # Rank 0 reached step 5 only because Ray restarted both workers after rank 1 died at 3.
    assert sorted(p.name for p in markers.iterdir()) == ["rank0-step5", "rank1-step3"]
    assert not isinstance(runs["error"], GistRayError), "a worker death is not a user error"
    assert "after the checkpoint at step 4: rerun the same command to resume" in runs["stderr"]


def test_failed_run_left_only_checkpointed_steps_in_mlflow(runs):
    # Step 5 ran (and was logged to stdout) but its checkpoint never came: not in MLflow.
    assert runs["after_failure"] == {"status": "FAILED", "steps": [1, 2, 3, 4]}


def test_rerun_resumes_the_same_mlflow_run_to_the_end(runs, reference):
    import mlflow

    result = runs["resumed"]
    client = mlflow.MlflowClient(result["tracking_uri"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'ft'")
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["gist_ray.resumes"] == "1"
    _assert_step_axis(result, reference)


def test_final_model_equals_an_uninterrupted_run(runs, reference):
    state = torch.load(Path(runs["resumed"]["checkpoint"]) / "state.pt", weights_only=False)
    assert state["step"] == STEPS
    # Exactly max_steps optimizer steps went into the weights (replayed steps are not extra).
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {STEPS}
    assert state["scheduler"]["last_epoch"] == STEPS
    _assert_same_model(runs["resumed"], reference)


def test_rerunning_a_finished_run_trains_nothing_and_exports_the_model(
    runs, reference, monkeypatch, capsys
):
    from gist_ray.commands.train import train
    from gist_ray.launch import trainer

    monkeypatch.setattr(trainer, "run_training", lambda *a, **k: pytest.fail("trained again"))
    cfg = runs["cfg"]
    shutil.rmtree(Path(cfg.output_dir) / "model")
    again = train(cfg)
    assert f"already complete ({STEPS}/{STEPS} steps, checkpoint " in capsys.readouterr().out
    assert again["run_id"] == runs["resumed"]["run_id"]
    _assert_same_model(again, reference)
    _assert_step_axis(again, reference)
    assert len(_history(again, "wall_time_s")) == 1, "summary metrics are not logged twice"


def test_checkpoint_of_another_model_is_refused_before_training(runs, tiny_models, monkeypatch):
    from gist_ray.commands.train import train
    from gist_ray.launch import trainer

    monkeypatch.setattr(trainer, "run_training", lambda *a, **k: pytest.fail("trained"))
    cfg = copy.deepcopy(runs["cfg"])
    cfg.model.student = str(tiny_models["guide"])
    with pytest.raises(GistRayError, match="another config.*: model.student ") as e:
        train(cfg)
    assert "\n" not in str(e.value) and "--fresh" in str(e.value)


def test_truncated_checkpoint_in_storage_is_refused(runs, monkeypatch):
    from gist_ray.commands.train import train
    from gist_ray.launch import resources, trainer

    monkeypatch.setattr(trainer, "run_training", lambda *a, **k: pytest.fail("trained"))
    cfg = runs["cfg"]
    latest = sorted((Path(resources.storage_path(cfg)) / "ft").glob("checkpoint-*"))[-1]
    state = latest / "state.pt"
    data = state.read_bytes()
    try:
        state.write_bytes(data[:64])
        with pytest.raises(GistRayError, match="corrupt or truncated: state.pt is 64 bytes"):
            train(cfg)
    finally:
        state.write_bytes(data)
