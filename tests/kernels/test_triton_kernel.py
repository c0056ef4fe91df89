"""The ``triton`` backend (gist_ray.kernels) against the ``reference`` oracle.

Without a GPU the kernels run under the Triton interpreter (tests/kernels/conftest.py sets
``TRITON_INTERPRET=1``); tiles are then upcast to fp32 and multiplied by broadcast-and-sum (the
interpreter's dot is wrong on bf16), so 16-bit inputs are tested through that path (their native
tensor-core path runs on a GPU only: benchmarks/gpu_check.py, or this file on a CUDA machine;
compilation is checked by tests/kernels/test_compile_gate.py). Sizes stay below ~70 rows and
columns: the interpreter costs ~40 ms per program. Interpreter tiles are 32 × 32 with K steps of
32, the forward splits each segment's columns into 32-column splits and the backward works in
chunks of 64 columns, so b, N and d here cross every row, column, split, chunk and K seam (and
widths that are not multiples of 16 cross the launcher's padding).

The comparison harness (inputs, tolerances, checks) is tests/loss/harness.py.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

import gist_ray.loss.plan as plan
import tests.loss.harness as H
from gist_ray.loss.op import tiled_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_backend = functools.partial(tiled_backend, backend="triton")


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
    assert torch.isfinite(out.loss).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    """fp16 and bf16 inputs (under the interpreter: tiles upcast to fp32 before tl.dot; P and the
    gradient GEMMs stay in the input dtype)."""
    case = _case(b=40, k=1, margin=0.05, dtype=dtype)
    H.check_front_end("triton", case)
    H.check_problem(triton_backend, replace(case, world=2, rank=1, strategy="relative"))


def test_bf16_student_with_fp32_guide():
    """Mixed dtypes (e.g. a cached fp32 guide): the front end casts the guide to the student's
    bf16, so both GEMMs of a tile see one dtype."""
    case = _case(b=40, k=1, margin=0.05, dtype=torch.bfloat16, guide_dtype=torch.float32)
    H.check_front_end("triton", case)


@pytest.mark.parametrize(
    "case",
    [_case(b=40, k=1), _case(b=30, k=2, world=2, rank=1, strategy="relative")],
    ids=["b40-k1", "b30-k2-rank1-of-2-rel"],
)
def test_duplicates_tie_exactly(case):
    """``t_i`` comes from the same tile code as every ``g``: a duplicate of row i's positive (in
    AP or among the negatives) ties it exactly and is kept, as in ``reference``."""
    H.check_ties(triton_backend, case)


def test_backward_recomputes_the_mask_when_bits_do_not_fit(monkeypatch):
    """No room for the mask bits: the backward recomputes the guide tiles with the forward's tile
    plan and gets the same gradients."""
    monkeypatch.setattr(plan, "MASK_BITS_FRACTION", 0.0)
    H.check_problem(triton_backend, _case(b=45, world=2, rank=1, k=1, margin=0.05))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_confident_rows_16_bit(dtype):
    """Per-row 16-bit gradient accuracy against float64 on rows where the positive dominates:
    ``w·(P - onehot)`` is formed in float32 before the one rounding to 16 bits."""
    H.check_confident_rows("triton", dtype, DEVICE)


def test_launcher_refuses_mixed_dtypes_before_any_launch():
    """One dtype for every operand (the front end casts): the launcher checks it itself and
    names the tensor, before anything is launched."""
    from gist_ray.kernels import gist_function

    case = _case(b=8, k=1)
    p = H.make_problem(case, H.make_inputs(case, H.fresh_seed()))
    bad = replace(p, guide_cands=(p.guide_cands[0].half(), *p.guide_cands[1:]))
    with pytest.raises(ValueError, match="guide candidates 0 are torch.float16, anchor rows"):
        gist_function.forward([bad])


# ------------------------------------------------------ Matryoshka widths and hardness weighting


@pytest.mark.parametrize(
    "dtype, bits",
    [(torch.float32, True), (torch.bfloat16, False)],
    ids=["fp32-bits", "bf16-recompute"],
)
def test_matryoshka_sum_of_independent_losses(dtype, bits, monkeypatch):
    """Widths 40/24/8 (8: padded to the kernels' 16) against the weighted sum of independent
    reference losses: the narrower widths' forwards load the widest one's mask bits (or, when
    the bits do not fit, recompute the same mask)."""
    if not bits:
        monkeypatch.setattr(plan, "MASK_BITS_FRACTION", 0.0)
    case = _case(b=45, k=1, d=40, margin=0.05, dtype=dtype)
    H.check_matryoshka("triton", case, [40, 24, 8], [1.0, 0.5, 2.0])


def test_matryoshka_all_masked_and_hardness():
    H.check_matryoshka("triton", _case(b=40, k=1, d=32, d_g=32, all_masked=True), [32, 16])
    H.check_matryoshka("triton", _case(b=35, k=2, d=32, margin=0.05), [32, 16],
                       hardness_alpha=3.0, hardness_mode="in_batch_negatives")  # fmt: skip


@pytest.mark.parametrize("mode", plan.HARDNESS_MODES)
def test_hardness_against_oracle(mode):
    """Hardness weighting after the mask (``_harden`` in the forward and the backward's P),
    including the diagonal tiles where row i's own hard negative differs from the rest."""
    H.check_hardness("triton", _case(b=45, k=2, margin=0.05), alpha=5.0, mode=mode)


def test_hardness_16_bit():
    H.check_hardness("triton", _case(b=40, k=1, margin=0.05, dtype=torch.float16), alpha=2.0,
                     mode="all_negatives")  # fmt: skip


def _run_kernels(p: plan.Problem, grad: torch.Tensor) -> list[torch.Tensor]:
    """Every output of the launchers' forward and backward on ``p``."""
    from gist_ray.kernels import gist_function

    out = gist_function.forward([p])
    dleft, dcands = gist_function.backward([p], grad[None], out[4], out[5], out[6])
    return [*out, *dleft, *dcands]


def test_misaligned_operands_give_what_aligned_copies_give():
    """TMA descriptors need a 16-byte aligned base and row stride: operands that are views at
    odd offsets into wider buffers (and of odd widths) are copied by the launcher
    (``gist_function.aligned``) and give bit for bit what contiguous copies give."""
    from gist_ray.kernels.gist_function import aligned

    case = _case(b=37, world=2, rank=1, k=1, d=27, d_g=19, margin=0.05)
    p = H.make_problem(case, H.make_inputs(case, H.fresh_seed()))
    fields = ("left", "cands", "guide_left", "guide_cands")

    def shifted(x: torch.Tensor) -> torch.Tensor:  # same values, one element into a wider row
        buf = x.new_zeros(x.shape[0], x.shape[1] + 3)
        buf[:, 1 : 1 + x.shape[1]] = x
        return buf[:, 1 : 1 + x.shape[1]]

    odd = replace(p, **{f: tuple(map(shifted, getattr(p, f))) for f in fields})
    dense = replace(p, **{f: tuple(x.contiguous() for x in getattr(p, f)) for f in fields})
    for x in (x for f in fields for x in getattr(odd, f)):
        assert x.data_ptr() % 16 and x.stride(0) == x.shape[1] + 3
        y = aligned(x)
        assert y.data_ptr() % 16 == 0 and y.stride(0) % 16 == 0
        assert torch.equal(y[:, : x.shape[1]], x)
    grad = torch.randn(case.b)
    for got, want in zip(_run_kernels(odd, grad), _run_kernels(dense, grad), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [True, False], ids=["bits", "recompute"])
def test_pointer_operands_match_reference(monkeypatch, bits):
    """sm_80 plans hand the GEMM operands to the kernels as pointers, sm_90 plans (and the
    interpreter's, everywhere else in this file) as TMA tensor descriptors: the pointer path of
    ``_dot_tile`` matches ``reference`` too, with the mask from the bits or recomputed."""
    from gist_ray.kernels import gist_function

    if not bits:
        monkeypatch.setattr(plan, "MASK_BITS_FRACTION", 0.0)
    pointers = replace(gist_function.INTERPRET_PLAN, tma=False)
    monkeypatch.setattr(gist_function, "INTERPRET_PLAN", pointers)
    H.check_problem(triton_backend, _case(b=37, world=2, rank=1, k=1, d=40, d_g=24, margin=0.05))
