"""Gradient caching gives the parameter gradients of one big backward pass."""

from __future__ import annotations

import pytest
import torch

from gist_ray.config import load_config
from gist_ray.loss import GistLoss
from gist_ray.models.encoder import load_encoder
from gist_ray.models.spec import ModelSpec
from gist_ray.train.step import training_step
from tests.conftest import make_sentences


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Relative error of the whole gradient vector (elementwise checks flag float noise on
    near-zero entries)."""
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err < rel, f"relative gradient error {err:.2e} >= {rel:.0e}"


def _setup(tiny_models, dropout: bool):
    student = load_encoder(ModelSpec(str(tiny_models["student"]), max_seq_length=32))
    student.train(dropout)
    columns = [make_sentences(16, s) for s in (11, 12, 13)]
    gen = torch.Generator().manual_seed(0)
    guide_emb = [torch.randn(16, 48, generator=gen) for _ in columns]
    return student, columns, guide_emb


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_gradcache_equals_one_backward_with_dropout(tiny_models, backend):
    """Dropout on: the no-cache pass embeds the same mini-batches with a graph, from the same
    RNG state; gradient caching must replay those dropout masks exactly."""
    student, columns, guide_emb = _setup(tiny_models, dropout=True)
    loss_fn = GistLoss(backend=backend)

    torch.manual_seed(7)
    loss_cached, _ = training_step(student, loss_fn, columns, guide_emb, mini_batch_size=4)
    cached = _grads(student)
    rng_after = torch.get_rng_state()

    student.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    emb = [torch.cat([student.embed(t[i : i + 4]) for i in range(0, 16, 4)]) for t in columns]
    from gist_ray.loss import gist_loss

    loss = gist_loss(
        emb[0], emb[1], guide_emb[0], guide_emb[1], emb[2:], guide_emb[2:], backend=backend
    )
    loss.backward()
    direct = _grads(student)
    assert torch.equal(rng_after, torch.get_rng_state()), "RNG stream differs after caching"
    torch.testing.assert_close(loss_cached, loss.detach(), rtol=1e-5, atol=1e-6)
    assert_rel_close(cached, direct, 1e-5)


@pytest.mark.parametrize(
    "settings",
    [{}, {"matryoshka_dims": [32, 16, 8], "hardness_alpha": 3.0, "hardness_mode": "all_negatives"}],
    ids=["plain", "matryoshka+hardness"],
)
def test_gradcache_equals_full_batch_without_dropout(tiny_models, settings):
    """Dropout off: mini-batches of 4 give the gradients of one batch of 16 (padding differs),
    also with the loss summed over Matryoshka widths and hardness-weighted."""
    student, columns, guide_emb = _setup(tiny_models, dropout=False)
    loss_fn = GistLoss(**settings)
    loss_full, stats_full = training_step(student, loss_fn, columns, guide_emb)
    full = _grads(student)
    student.zero_grad(set_to_none=True)
    loss_cached, stats = training_step(student, loss_fn, columns, guide_emb, mini_batch_size=4)
    torch.testing.assert_close(loss_cached, loss_full, rtol=1e-5, atol=1e-6)
    for key in (k for k in stats_full if k.startswith("loss/dim_")):
        torch.testing.assert_close(stats[key], stats_full[key], rtol=1e-5, atol=1e-6)
    assert_rel_close(_grads(student), full, 1e-5)
    assert full.abs().sum() > 0


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("-1", "train.mini_batch_size"),
        ("9", "must be <= the per-worker batch (8"),
    ],
)
def test_bad_mini_batch_size(value, needle):
    from gist_ray.core.errors import ConfigError

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(overrides=["train.batch_size=16", f"train.mini_batch_size={value}"])
