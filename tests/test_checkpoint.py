"""Checkpoints: atomic write, a manifest with file sizes, and clear refusals of truncated,
corrupt or foreign checkpoints (no Ray needed)."""

from __future__ import annotations

import json

import pytest
import torch

from gist_ray.config import load_config
from gist_ray.core.errors import GistRayError
from gist_ray.train import checkpoint as ckpt


@pytest.fixture()
def saved(tiny_models, tmp_path):
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec

    cfg = load_config(overrides=[f"model.student={tiny_models['student']}"])
    student = load_encoder(ModelSpec(str(tiny_models["student"]), max_seq_length=32))
    state = {
        "step": 4,
        "optimizer": {"x": torch.arange(1000.0)},
        "rng": [ckpt.rng_state()],
        "mlflow_run_id": "abc",
        "identity": ckpt.identity(cfg),
    }
    path = ckpt.save_checkpoint(tmp_path / "checkpoint-0000004", student, state)
    return cfg, path


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_roundtrip_writes_a_manifest_and_no_temporary_folders(saved, tmp_path):
    cfg, path = saved
    model_dir, state = ckpt.load_checkpoint(path, ckpt.identity(cfg))
    assert state["step"] == 4 and state["mlflow_run_id"] == "abc"
    assert (model_dir / "modules.json").is_file()
    meta = json.loads((path / ckpt.META_FILE).read_text())
    assert meta["step"] == 4 and meta["files"][ckpt.STATE_FILE] > 0
    assert "model/model.safetensors" in meta["files"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_truncated_state_file_is_refused(saved):
    cfg, path = saved
    data = (path / ckpt.STATE_FILE).read_bytes()
    (path / ckpt.STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(GistRayError, match="corrupt or truncated: state.pt is") as e:
        ckpt.load_checkpoint(path, ckpt.identity(cfg))
    assert "--fresh" in _one_line(e)


def test_truncated_weights_are_refused(saved):
    cfg, path = saved
    weights = path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(GistRayError, match="model/model.safetensors is 100 bytes"):
        ckpt.load_checkpoint(path, ckpt.identity(cfg))


def test_garbage_of_the_right_size_is_refused(saved):
    cfg, path = saved
    size = (path / ckpt.STATE_FILE).stat().st_size
    (path / ckpt.STATE_FILE).write_bytes(b"\0" * size)
    with pytest.raises(GistRayError, match=r"state.pt is corrupt or truncated \(") as e:
        ckpt.load_checkpoint(path, ckpt.identity(cfg))
    _one_line(e)


def test_missing_or_unreadable_manifest_is_refused(saved):
    cfg, path = saved
    (path / ckpt.META_FILE).write_text("{not json")
    with pytest.raises(GistRayError, match="meta.json is not valid JSON"):
        ckpt.load_checkpoint(path, ckpt.identity(cfg))
    (path / ckpt.META_FILE).unlink()
    with pytest.raises(GistRayError, match="incomplete: meta.json is missing"):
        ckpt.load_checkpoint(path, ckpt.identity(cfg))


def test_checkpoint_of_another_model_or_config_is_refused(saved, tiny_models):
    cfg, path = saved
    other = load_config(overrides=[f"model.student={tiny_models['guide']}"])
    with pytest.raises(GistRayError, match="another config.*: model.student ") as e:
        ckpt.load_checkpoint(path, ckpt.identity(other))
    assert "--fresh" in _one_line(e)
    # Every changed key is named, with the checkpoint's value and this run's.
    two = load_config(
        overrides=[f"model.student={tiny_models['student']}", "train.lr=1", "train.batch_size=4"]
    )
    with pytest.raises(GistRayError) as e:
        ckpt.load_checkpoint(path, ckpt.identity(two))
    assert "train.batch_size (" in str(e.value) and "train.lr (3e-05 -> 1" in str(e.value)
    assert "\n" not in str(e.value)
    # Operational keys may change on resume.
    ops = load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            "train.max_failures=3",
            "train.checkpoint_every=7",
            "train.checkpoint_minutes=1",
        ]
    )
    ckpt.load_checkpoint(path, ckpt.identity(ops))


def test_rng_state_roundtrip_replays_dropout():
    torch.manual_seed(0)
    state = ckpt.rng_state()
    a = torch.nn.functional.dropout(torch.ones(100), 0.5)
    torch.rand(7)  # advance
    ckpt.set_rng_state(state)
    b = torch.nn.functional.dropout(torch.ones(100), 0.5)
    assert torch.equal(a, b)


def _due_worker(rank: int, port: int, out_dir: str, results: str) -> None:
    """One rank asking ``due`` with its own clock: rank 0 late, rank 1 not, then the reverse."""
    import os
    import time

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config(overrides=[f"output_dir={out_dir}", "train.checkpoint_every=100"])
        checkpointer = ckpt.Checkpointer(cfg, ckpt.LocalReporter(out_dir))
        answers = []
        for late_rank in (0, 1):
            late = time.monotonic() - 11 * 60  # past the default 10 minutes
            checkpointer._saved_at = late if rank == late_rank else time.monotonic()
            answers.append(checkpointer.due(3, 1000))
        with open(f"{results}.{rank}", "w") as f:
            json.dump(answers, f)
    finally:
        dist.destroy_process_group()


def test_checkpoint_by_time_is_decided_by_rank_0_for_every_rank(tmp_path):
    """The save is collective: ranks whose clocks disagree must still agree on a time-based
    checkpoint (rank 0's clock decides), or one would wait in the save forever."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = tmp_path / "due"
    torch.multiprocessing.spawn(_due_worker, args=(port, str(tmp_path), str(results)), nprocs=2)
    got = [json.loads((tmp_path / f"due.{r}").read_text()) for r in (0, 1)]
    assert got == [[True, False], [True, False]]


def test_checkpoint_by_time_alone(tmp_path):
    """Between ``checkpoint_every`` steps a checkpoint is due once ``checkpoint_minutes`` passed
    since the last one; 0 turns the clock off."""
    import time

    cfg = load_config(overrides=[f"output_dir={tmp_path}", "train.checkpoint_every=100"])
    checkpointer = ckpt.Checkpointer(cfg, ckpt.LocalReporter(tmp_path))
    assert not checkpointer.due(3, 1000)
    assert checkpointer.due(100, 1000) and checkpointer.due(1000, 1000)
    checkpointer._saved_at = time.monotonic() - 10 * 60 - 1
    assert checkpointer.due(3, 1000)
    cfg.train.checkpoint_minutes = 0
    assert not checkpointer.due(3, 1000)
    with pytest.raises(GistRayError, match="train.checkpoint_minutes"):
        load_config(overrides=["train.checkpoint_minutes=-1"])
