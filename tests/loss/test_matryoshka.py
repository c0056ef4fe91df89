"""Matryoshka widths with one guide mask (``loss.matryoshka_dims``): every backend against the
weighted sum of independent ``reference`` losses at each truncated, re-normalised width
(harness: tests/loss/harness.py; the Triton twin is in tests/kernels/test_triton_kernel.py)."""

from __future__ import annotations

import pytest
import torch

import gist_ray.loss.chunked as chunked
import gist_ray.loss.plan as plan
from gist_ray.loss import GistLoss, gist_loss
from gist_ray.loss.op import tiled
from tests.loss.harness import (
    TOL,
    Case,
    assert_close,
    check_matryoshka,
    fresh_seed,
    make_inputs,
    make_problem,
)
from tests.loss.test_chunked import _one_thread  # noqa: F401  (autouse fixture)

WIDTHS = {
    "48-32-16-8-4": ([48, 32, 16, 8, 4], None),
    "40-24-weighted": ([40, 24], [1.0, 0.5]),
    "24-only": ([24], None),  # a single truncated width: the full width is not trained
    "48-zero-weight": ([48, 12], [0.0, 2.0]),
}


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("dims, weights", WIDTHS.values(), ids=WIDTHS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])  # fmt: skip
def test_sum_of_independent_losses(backend, dims, weights, dtype):
    case = Case(b=37, k=1, d=48, margin=0.05, dtype=dtype)
    check_matryoshka(backend, case, dims, weights)


@pytest.mark.parametrize("k, contrast", [(0, (True, True)), (2, (False, True)), (3, (True, False))])
@pytest.mark.parametrize("strategy, margin", [("absolute", 0.0), ("relative", 0.2)])
def test_negatives_contrast_and_margins(k, contrast, strategy, margin):
    case = Case(b=30, k=k, d=32, margin=margin, strategy=strategy,
                contrast_anchors=contrast[0], contrast_positives=contrast[1])  # fmt: skip
    check_matryoshka("chunked", case, [32, 16, 8])


@pytest.mark.parametrize("bits", [True, False], ids=["bits", "recompute"])
def test_small_chunks_and_both_mask_paths(bits, monkeypatch):
    """Chunk seams through the diagonal, and the backward's mask from the bits or recomputed."""
    monkeypatch.setattr(chunked, "chunk_width", lambda rows, tile_elems=None: 16)
    if not bits:
        monkeypatch.setattr(plan, "MASK_BITS_FRACTION", 0.0)
    check_matryoshka("chunked", Case(b=45, k=2, d=40, margin=0.05), [40, 20, 10])


def test_all_masked_rows():
    case = Case(b=30, k=1, d=48, d_g=32, all_masked=True)
    stats = check_matryoshka("chunked", case, [48, 16])
    assert stats["no_negative_frac"] == 1.0


def test_with_hardness():
    case = Case(b=33, k=2, d=48, margin=0.05)
    check_matryoshka("chunked", case, [48, 24, 12], hardness_alpha=3.0,
                     hardness_mode="all_negatives")  # fmt: skip


def test_guide_mask_is_computed_once(monkeypatch):
    """Five widths cost one pass of guide tiles, not five: the chunked forward computes each
    (segment, chunk) mask once, and the backward reads the stored bits."""
    calls = []
    drop = chunked._Tiles.drop
    monkeypatch.setattr(chunked._Tiles, "drop", lambda *a: calls.append(1) or drop(*a))
    case = Case(b=40, k=1, d=48)
    problem = make_problem(case, make_inputs(case, fresh_seed()))
    widths = [48, 32, 16, 8, 4]
    problems = [
        plan.Problem(
            tuple(_unit(x, w) for x in problem.left),
            tuple(_unit(x, w) for x in problem.cands),
            problem.guide_left,
            problem.guide_cands,
            problem.segments,
            0,
            0.01,
            0.0,
            "absolute",
        )
        for w in widths
    ]
    for q in problems:
        for x in (*q.left, *q.cands):
            x.requires_grad_()
    outs = tiled(problems, "chunked")
    chunks = -(-problem.pool // chunked.chunk_width(problem.rows))
    assert len(calls) == len(problem.segments) * chunks
    sum(out.loss.sum() for out in outs).backward()
    assert len(calls) == len(problem.segments) * chunks  # the backward read the bits
    assert all(torch.equal(out.masked, outs[0].masked) for out in outs)


def _unit(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.normalize(x[:, :width].detach(), dim=-1)


def test_module_reports_per_width_losses():
    case = Case(b=20, k=1, d=32)
    inputs = make_inputs(case, fresh_seed())
    loss_fn = GistLoss(backend="chunked", matryoshka_dims=[32, 16], matryoshka_weights=[1, 2])
    loss, stats = loss_fn(inputs[:3], inputs[3:])
    assert {"loss/dim_32", "loss/dim_16", "mask_frac/all"} <= set(stats)
    assert_close(loss, stats["loss/dim_32"] + 2 * stats["loss/dim_16"], TOL[torch.float32],
                 "weighted sum")  # fmt: skip
    assert "matryoshka_dims=[32, 16]" in repr(loss_fn)
    plain, plain_stats = GistLoss(backend="chunked")(inputs[:3], inputs[3:])
    assert not any(key.startswith("loss/") for key in plain_stats)
    assert_close(stats["loss/dim_32"], plain, TOL[torch.float32], "full width")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"matryoshka_dims": [32, 64]}, r"loss.matryoshka_dims must be strictly decreasing"),
        ({"matryoshka_dims": [32, 32]}, r"loss.matryoshka_dims must be strictly decreasing"),
        ({"matryoshka_dims": [32, 0]}, r"loss.matryoshka_dims must be positive integers"),
        ({"matryoshka_dims": [32, 1.5]}, r"loss.matryoshka_dims must be positive integers"),
        ({"matryoshka_dims": [32, 16], "matryoshka_weights": [1.0]},
         r"loss.matryoshka_weights has 1 values for 2 loss.matryoshka_dims"),
        ({"matryoshka_dims": [32, 16], "matryoshka_weights": [1.0, -1.0]},
         r"loss.matryoshka_weights must be >= 0"),
        ({"matryoshka_weights": [1.0]}, r"loss.matryoshka_weights is set but"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        GistLoss(**kwargs)
    assert "\n" not in str(err.value)


def test_width_larger_than_the_student():
    a = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"loss.matryoshka_dims: 32 is wider than the student's "
                       r"embeddings \(16\)"):  # fmt: skip
        gist_loss(a, a, a, a, matryoshka_dims=[32, 8])
