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
    assert "delete it" in _one_line(e)


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
    with pytest.raises(GistRayError, match="incompatible: it was written with model.student") as e:
        ckpt.load_checkpoint(path, ckpt.identity(other))
    assert "mlflow.run_name" in _one_line(e)
    lr = load_config(overrides=[f"model.student={tiny_models['student']}", "train.lr=1"])
    with pytest.raises(GistRayError, match="train.lr = 3e-05"):
        ckpt.load_checkpoint(path, ckpt.identity(lr))
    # Operational keys may change on resume.
    ops = load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            "train.max_failures=3",
            "train.checkpoint_every=7",
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
