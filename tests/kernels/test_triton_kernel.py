"""The ``triton`` backend (gist_ray.kernels) against the ``reference`` oracle.

Without a GPU the kernels run under the Triton interpreter (tests/kernels/conftest.py sets
``TRITON_INTERPRET=1``); the launcher then upcasts every tile to fp32 before ``tl.dot``, since the
interpreter's dot is wrong on bf16 operands, so bf16 inputs are tested with the upcast (their
native tensor-core path is exercised on a GPU only: benchmarks/gpu_check.py, or this file on a
CUDA machine). Sizes stay below ~70 rows and columns: the interpreter costs ~40 ms per program.
Interpreter tiles are 32 × 32 with K steps of 32, the forward splits each segment's columns in
two (in multiples of 32) and the backward works in chunks of 64 columns, so b, N and d here cross
every row, column, split, chunk and K seam.

The comparison harness (inputs, tolerances, checks) is tests/loss/harness.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import tests.loss.harness as H
from gist_ray.loss.triton_backend import triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(**kw) -> H.Case:
    return H.Case(device=DEVICE, **kw)


# Every margin setting × 0-3 negative columns, the contrast flags cycling with k; no b is a
# multiple of the 32-row tile.
FRONT_CASES = {
    f"b{b}-k{k}-{strategy[:3]}{margin}-{'aa' * ca}{'pp' * cp}": _case(
        b=b, k=k, margin=margin, strategy=strategy, contrast_anchors=ca, contrast_positives=cp
    )
    for strategy, margin in H.MARGINS
    for k, (b, (ca, cp)) in enumerate(zip([33, 50, 45, 40], H.CONTRAST))
}
FRONT_CASES.update(
    {
        "b70-k1-rel0.2-d40-dg24": _case(b=70, k=1, margin=0.2, strategy="relative", d=40, d_g=24),
        "b20-k3-abs0.05-d24-dg48": _case(b=20, k=3, margin=0.05, d=24, d_g=48),
        "b1-k1-d16-dg16": _case(b=1, k=1, margin=0.05, d=16, d_g=16),
    }
)


@pytest.mark.parametrize("case", FRONT_CASES.values(), ids=FRONT_CASES.keys())
def test_front_end_matches_reference(case):
    H.check_front_end("triton", case)


@pytest.mark.parametrize(
    "case",
    [
        _case(b=23, world=3, rank=1, k=1),
        _case(b=30, world=2, rank=1, k=0, margin=0.2, strategy="relative"),
        _case(b=17, world=4, rank=3, k=1, margin=0.05, contrast_anchors=False),
    ],
    ids=["b23-of-69-rank1", "b30-of-60-rank1-rel.2", "b17-of-68-rank3"],
)
def test_gathered_pool_with_offset(case):
    """b < N: local rows against a pool 2-4× larger, the positive at column ``rank*b + i``, and
    an arbitrary upstream gradient (random weights on the lse)."""
    H.check_problem(triton_backend, case)


@pytest.mark.parametrize(
    "strategy, margin", [("absolute", 0.0), ("relative", 0.2)], ids=["abs0", "rel.2"]
)
def test_all_masked_rows_are_finite(strategy, margin):
    """Every candidate but the positive masked: fully masked tiles and splits give -inf partial
    lse, which must combine without NaN; the loss is finite (0 up to rounding)."""
    # b = 45 and a pool of 90: rows whose positive lies in a split's second column tile have a
    # fully masked first tile (the online max must not turn -inf - -inf into NaN).
    case = _case(b=45, k=1, d_g=32, margin=margin, strategy=strategy, all_masked=True)
    stats = H.check_front_end("triton", case)
    assert stats["no_negative_frac"] == 1.0
    out = H.check_problem(triton_backend, replace(case, b=30, world=3, rank=1))
    assert torch.isfinite(out.lse).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    """fp16 and bf16 inputs (under the interpreter: tiles upcast to fp32 before tl.dot; P and the
    gradient GEMMs stay in the input dtype)."""
    case = _case(b=40, k=1, margin=0.05, dtype=dtype)
    H.check_front_end("triton", case)
    H.check_problem(triton_backend, replace(case, world=2, rank=1, strategy="relative"))


def test_bf16_student_with_fp32_guide():
    """Mixed dtypes (e.g. a cached fp32 guide): each tile pair is multiplied in its own dtype."""
    case = _case(b=40, k=1, margin=0.05, dtype=torch.bfloat16, guide_dtype=torch.float32)
    H.check_front_end("triton", case)


def test_imports_stay_light():
    """The loss package must not import triton; the kernels must not import Ray, MLflow or
    datasets (the GPU machine has none of them)."""
    code = (
        "import sys, gist_ray.loss; assert 'triton' not in sys.modules, 'loss imports triton';"
        "import gist_ray.loss.triton_backend, gist_ray.kernels.gist_function;"
        "heavy = [m for m in ('ray', 'mlflow', 'datasets') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
