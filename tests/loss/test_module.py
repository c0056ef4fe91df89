"""``GistLoss`` (gist_ray/loss/module.py): settings validated once, same maths as ``gist_loss``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gist_ray.loss import GistLoss, gist_loss
from tests.loss.harness import Case, fresh_seed, make_inputs

SETTINGS = dict(
    temperature=0.05, margin=0.05, margin_strategy="relative",
    contrast_anchors=True, contrast_positives=False, backend="chunked",
)  # fmt: skip


@pytest.mark.parametrize("k", [0, 2])
def test_module_equals_functional(k):
    inputs = make_inputs(Case(b=20, k=k), fresh_seed())
    student, guide = inputs[: 2 + k], inputs[2 + k :]
    leaves = [x.clone().requires_grad_() for x in student]
    loss, stats = GistLoss(**SETTINGS)(leaves, guide)
    loss.backward()
    twins = [x.clone().requires_grad_() for x in student]
    ref, ref_stats = gist_loss(
        twins[0], twins[1], guide[0], guide[1], twins[2:], guide[2:], **SETTINGS, return_stats=True
    )
    ref.backward()
    assert torch.equal(loss.detach(), ref.detach())
    assert set(stats) == set(ref_stats)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    assert {key: float(v) for key, v in stats.items()} == ref_stats
    for x, y in zip(leaves, twins):
        assert torch.equal(x.grad, y.grad)


def test_from_config_reads_attributes():
    cfg = SimpleNamespace(**SETTINGS)
    loss_fn = GistLoss.from_config(cfg, gather=True)
    assert (loss_fn.temperature, loss_fn.margin_strategy) == (0.05, "relative")
    assert loss_fn.gather is True
    assert loss_fn.contrast_positives is False and loss_fn.backend == "chunked"
    assert "margin_strategy='relative'" in repr(loss_fn)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "loss.temperature must be > 0, got 0"),
        ({"temperature": -1.0}, "loss.temperature must be > 0, got -1.0"),
        ({"margin": -0.1}, "loss.margin must be >= 0, got -0.1"),
        ({"margin": float("nan")}, "loss.margin must be >= 0, got nan"),
        ({"margin_strategy": "percent"}, "loss.margin_strategy: unknown strategy 'percent'"),
        ({"backend": "cuda"}, "loss.backend: unknown backend 'cuda'"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        GistLoss(**kwargs)
    assert "\n" not in str(err.value)


def test_mismatched_columns_name_the_tensor():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="negative_1 has 3 rows, anchor has 4"):
        GistLoss()([a, a, torch.randn(3, 8)], [a, a, a])
    with pytest.raises(ValueError, match="3 student columns but 2 guide columns"):
        GistLoss()([a, a, a], [a, a])
