"""The ``chunked`` backend against the ``reference`` oracle (harness: tests/loss/harness.py)."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

import gist_ray.loss.chunked as chunked
import gist_ray.loss.plan as plan
from gist_ray.loss import gist_loss
from gist_ray.loss.op import tiled_backend
from tests.loss.harness import (
    CONTRAST,
    MARGINS,
    TOL,
    Case,
    assert_close,
    check_front_end,
    check_problem,
    fresh_seed,
    make_inputs,
)

# ------------------------------------------------------------------------------ chunked tests


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: at these sizes OpenMP threads only add synchronisation, which on a
    loaded 2-core machine made this file 20× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def chunk(request, monkeypatch) -> int | None:
    """Run ``chunked`` with a given chunk width (default 16: b here is no multiple of it, so
    chunk seams cut through the diagonal; None: the production width)."""
    width = getattr(request, "param", 16)
    if width is not None:
        monkeypatch.setattr(chunked, "chunk_width", lambda rows, tile_elems=None: width)
    return width


@pytest.fixture(params=[True, False], ids=["bits", "recompute"])
def mask_bits(request, monkeypatch) -> bool:
    """Both ways the backward can learn the forward's mask: stored bits, or recomputed guide
    tiles (what happens when the bits would not fit)."""
    if not request.param:
        monkeypatch.setattr(plan, "MASK_BITS_FRACTION", 0.0)
    return request.param


CHUNKED = functools.partial(tiled_backend, backend="chunked")


@pytest.mark.parametrize("strategy, margin", MARGINS)
@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("contrast", CONTRAST, ids=["aa+pp", "aa", "pp", "ap-only"])
def test_front_end_matches_reference(chunk, strategy, margin, k, contrast):
    case = Case(b=37, k=k, margin=margin, strategy=strategy,
                contrast_anchors=contrast[0], contrast_positives=contrast[1])  # fmt: skip
    check_front_end("chunked", case)


@pytest.mark.parametrize("chunk", [8, 24, 64, None], indirect=True, ids=lambda w: f"chunk{w}")
@pytest.mark.parametrize("b, d, d_g", [(1, 8, 32), (5, 24, 40), (70, 48, 64)])
def test_chunk_widths_and_sizes(chunk, mask_bits, b, d, d_g):
    check_front_end("chunked", Case(b=b, d=d, d_g=d_g, k=1, margin=0.05))


@pytest.mark.parametrize("world, rank", [(2, 0), (3, 1), (3, 2)])
@pytest.mark.parametrize("strategy, margin", [("absolute", 0.0), ("relative", 0.2)])
def test_gathered_pool_with_offset(chunk, mask_bits, world, rank, strategy, margin):
    case = Case(b=23, world=world, rank=rank, k=2, margin=margin, strategy=strategy)
    check_problem(CHUNKED, case)


@pytest.mark.parametrize("strategy, margin", MARGINS)
def test_all_masked_rows_are_finite(chunk, strategy, margin):
    case = Case(b=30, k=2, d_g=32, margin=margin, strategy=strategy, all_masked=True)
    stats = check_front_end("chunked", case)
    assert stats["no_negative_frac"] == 1.0
    out = check_problem(CHUNKED, replace(case, world=2, rank=1))
    assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("strategy, margin", [("absolute", 0.05), ("relative", 0.2)])
def test_half_precision_inputs(chunk, dtype, strategy, margin):
    case = Case(b=40, k=1, margin=margin, strategy=strategy, dtype=dtype)
    check_front_end("chunked", case)
    check_problem(CHUNKED, replace(case, world=2, rank=1))


def test_fp16_student_with_fp32_guide(chunk):
    check_front_end(
        "chunked", Case(b=40, k=2, margin=0.05, dtype=torch.float16, guide_dtype=torch.float32)
    )


def test_only_anchor_requires_grad():
    a, p, n, ga, gp, gn = make_inputs(Case(b=20, k=1), fresh_seed())
    grads = []
    for backend in ("reference", "chunked"):
        leaf = a.clone().requires_grad_()
        gist_loss(leaf, p, ga, gp, [n], [gn], margin=0.05, backend=backend).backward()
        grads.append(leaf.grad)
    assert_close(grads[1], grads[0], TOL[torch.float32], "grad of anchor")


def test_chunk_width_is_bounded():
    assert chunked.chunk_width(8192) * 8192 <= chunked.TILE_ELEMS
    assert chunked.chunk_width(1) == chunked.MAX_CHUNK
    assert chunked.chunk_width(10**9) == chunked.MIN_CHUNK
    assert all(chunked.chunk_width(b) % 8 == 0 for b in (1, 3, 100, 1000, 8191))
