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


# ----------------------------------------------- launch arithmetic, seams, P, norms, accumulation


@pytest.mark.parametrize("interpreted", [False, True], ids=["gpu-plans", "interpreter-plan"])
def test_forward_grid_stays_within_cuda_limits(monkeypatch, interpreted):
    """Pure launch arithmetic, no tensor: at any pool size the forward's column splits (the
    grid's y) stay <= 65,535 (CUDA's gridDim.y limit), cover the pool exactly once in whole
    tiles, and keep the kernel's int32 column arithmetic (``split * per + per``) in range. The
    backward's grid over a chunk stays within it too."""
    from gist_ray.kernels import gist_function as gf

    monkeypatch.setattr(gf, "INTERPRETED", interpreted)
    monkeypatch.setattr(gf, "_num_sms", lambda device: 132)
    plans = [gf.INTERPRET_PLAN] if interpreted else list(gf.PLANS.values())
    guarded = 0  # cases whose splits, uncapped, would pass the limit
    per_split = 1 if interpreted else gf.MIN_SPLIT_TILES
    for p in plans:
        cfg = p.fwd
        for b in (1, 33, 8192, 65536):
            for n in (1, 1000, 4_000_000, 100_000_000, 2**31 - 2**20):
                (rows, splits), per = gf.forward_grid(b, n, cfg, torch.device("cuda"))
                assert rows == -(-b // cfg.block_m) and rows < 2**31
                assert 1 <= splits <= gf.MAX_GRID_Y, (p.name, b, n, splits)
                assert per % cfg.block_n == 0 and (splits - 1) * per < n <= splits * per
                assert splits * per + per < 2**31
                guarded += -(-n // cfg.block_n) // per_split > gf.MAX_GRID_Y
        for b in (1, 8192):
            chunk = max(256, min(1 << 16, gf.P_ELEMS // b) // 256 * 256)
            assert gf.prob_grid(b, chunk, p.bwd)[1] <= gf.MAX_GRID_Y
    assert guarded > 0


def _seam_case(**kw) -> H.Case:
    """b = 37 local rows of a pool of 148 (rank 2 of 4): under the interpreter 2 row blocks, 5
    column tiles and so 5 forward splits, and 3 backward chunks of 64."""
    return _case(b=37, world=4, rank=2, **kw)


def test_seams_cross_splits_and_chunks():
    """The sizes of the seam tests below really cross several forward splits and backward
    chunks (and row blocks), then match the reference (fp32 and bf16, mask from the bits and
    recomputed)."""
    from gist_ray.kernels import gist_function as gf

    case = _seam_case(k=1, margin=0.05)
    n = case.b * case.world
    cfg = gf.INTERPRET_PLAN.fwd
    (rows, splits), _ = gf.forward_grid(case.b, n, cfg, torch.device("cpu"))
    assert rows >= 2 and splits >= 2 and -(-n // gf.INTERPRET_CHUNK) >= 2
    H.check_problem(triton_backend, case)
    H.check_problem(triton_backend, replace(case, dtype=torch.bfloat16, strategy="relative"))


def test_seams_recomputed_mask(monkeypatch):
    monkeypatch.setattr(plan, "MASK_BITS_FRACTION", 0.0)
    H.check_problem(triton_backend, _seam_case(k=2, margin=0.1, dtype=torch.float16))


def _strided(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x``'s first ``width`` columns as a view into a wider (zero-padded) buffer, the way a
    Matryoshka width reaches the kernels: rows at the wide stride, no copy."""
    buf = x.new_zeros(x.shape[0], x.shape[1] + 32)
    buf[:, : x.shape[1]] = x
    return buf[:, :width]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_views_match_reference(dtype):
    """Student and guide operands as strided views (row stride wider than the width, as a
    Matryoshka width's ``x[:, :w]``) across split and chunk seams: the launcher passes them
    as they are (no copy; TMA descriptors take the stride) and the result equals the
    reference's on the same values, and bit for bit what contiguous copies give."""
    from gist_ray.kernels.gist_function import aligned

    case = _seam_case(k=1, d=48, d_g=32, margin=0.05, dtype=dtype)
    p = H.make_problem(case, H.make_inputs(case, H.fresh_seed()))
    fields = ("left", "cands", "guide_left", "guide_cands")
    views = replace(p, **{f: tuple(_strided(x, x.shape[1]) for x in getattr(p, f)) for f in fields})
    for x in (x for f in fields for x in getattr(views, f)):
        assert not x.is_contiguous() and aligned(x) is x  # passed to the kernels as it is
    grad = torch.randn(case.b)
    dense = replace(p, **{f: tuple(x.contiguous() for x in getattr(p, f)) for f in fields})
    for got, want in zip(_run_kernels(views, grad), _run_kernels(dense, grad), strict=True):
        assert torch.equal(got, want)
    out = triton_backend(views)
    ref = plan_reference(p)
    torch.testing.assert_close(out.loss, ref.loss, rtol=H.TOL[dtype], atol=H.TOL[dtype])
    assert torch.equal(out.masked, ref.masked)


def plan_reference(p: plan.Problem) -> plan.BackendOutput:
    from gist_ray.loss.reference import reference_backend

    return reference_backend(p)


def test_matryoshka_across_seams():
    """Matryoshka widths 48/32/16 through the front end, across split and chunk seams, against
    independent reference losses."""
    H.check_matryoshka("triton", _seam_case(k=1, d=48, margin=0.05), [48, 32, 16],
                       [1.0, 0.5, 2.0])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matryoshka_widths_as_strided_views_at_the_launchers(dtype):
    """The launchers' own Matryoshka path with every width's student operands as strided
    views ``x[:, :w]`` of the widest tensors (no copy reaches the kernels; the narrower widths
    load the widest one's mask bits), across split and chunk seams: each width's loss and
    gradients equal ``reference`` on the same views."""
    from gist_ray.kernels import gist_function as gf

    from gist_ray.loss.reference import reference_backend

    case = _seam_case(k=1, d=64, d_g=32, margin=0.05, dtype=dtype)
    p = H.make_problem(case, H.make_inputs(case, H.fresh_seed()))
    widths = [64, 32, 16]
    problems = [replace(p, left=tuple(x[:, :w] for x in p.left),
                        cands=tuple(x[:, :w] for x in p.cands)) for w in widths]  # fmt: skip
    for q in problems[1:]:
        for x in (*q.left, *q.cands):
            assert not x.is_contiguous() and gf.aligned(x) is x
    grad = torch.randn(len(widths), case.b)
    out = gf.forward(problems)
    assert out[5].numel()  # the bits were stored and loaded
    dleft, dcands = gf.backward(problems, grad, out[4], out[5], out[6])
    tol = H.TOL[dtype]
    for w, q in enumerate(problems):
        leaves = replace(
            q,
            left=tuple(x.detach().clone().requires_grad_() for x in q.left),
            cands=tuple(x.detach().clone().requires_grad_() for x in q.cands),
        )
        ref = reference_backend(leaves)
        (ref.loss * grad[w]).sum().backward()
        H.assert_close(out[0][w], ref.loss, tol, f"loss of width {widths[w]}")
        nl, nc = len(q.left), len(q.cands)
        got = [*dleft[w * nl : (w + 1) * nl], *dcands[w * nc : (w + 1) * nc]]
        for g, x in zip(got, (*leaves.left, *leaves.cands), strict=True):
            H.assert_close(g, x.grad, tol, f"gradient at width {widths[w]}")


def test_backward_sums_chunks_in_float32(monkeypatch):
    """bf16, 5 backward chunks: dL's chunks (``P_chunk @ C_chunk``) are summed in float32
    (:func:`gist_function.add_mm`). The accumulator equals the exact sum of the very P chunks
    the kernel produced to float32 rounding, where rounding each chunk's product to bf16 (the
    former ``dleft += pr @ C``) is off by bf16 rounding; and the gradients match the
    reference."""
    from gist_ray.kernels import gist_function as gf

    case = _case(b=32, world=5, rank=2, k=0, d=64, d_g=32, margin=0.05, dtype=torch.bfloat16,
                 contrast_anchors=False, contrast_positives=False)  # fmt: skip
    p = H.make_problem(case, H.make_inputs(case, H.fresh_seed()))
    grad = torch.randn(case.b)
    out = gf.forward([p])
    real = gf.add_mm

    def per_chunk_bf16(acc, a, b):
        acc += torch.mm(a, b)  # a bf16 product, rounded before the float32 sum

    errors = {}
    for name, add in (("fp32", real), ("bf16", per_chunk_bf16)):
        seen = []

        def record(acc, a, b, add=add, seen=seen):
            seen.append((acc, a.double() @ b.double()))
            add(acc, a, b)

        monkeypatch.setattr(gf, "add_mm", record)
        gf.backward([p], grad[None], out[4], out[5], out[6], chunk=32)
        assert len(seen) == 5  # one product per chunk, AP only
        acc = seen[-1][0]
        exact = sum(prod for _, prod in seen)
        errors[name] = ((acc.double() - exact).norm() / exact.norm()).item()
    monkeypatch.setattr(gf, "add_mm", real)
    assert errors["fp32"] < 1e-6 < 1e-4 < errors["bf16"], errors
    # Through the op (3 chunks of 64), every segment (the harness needs every column used).
    H.check_problem(triton_backend, replace(case, contrast_anchors=True, contrast_positives=True))


def test_guide_norms_once_and_blockwise(monkeypatch):
    """The guide's inverse norms: computed once per forward and backward pair (saved by the
    op, not recomputed), block by block with every block the same shape, so rows far apart
    and in different blocks get bit-identical norms; and they equal ``plan.inv_norm``."""
    from gist_ray.kernels import gist_function as gf

    x = torch.randn(50, 40).to(torch.bfloat16)
    x[47] = x[3]  # a duplicate in the last (overlapping) block
    monkeypatch.setattr(gf, "NORM_BLOCK_ELEMS", 7 * 40)  # 7 rows per call: 8 calls
    got = gf.inv_norms(x)
    assert got.dtype == torch.float32 and got[47] == got[3]
    torch.testing.assert_close(got, plan.inv_norm(x), rtol=1e-6, atol=0)

    calls = []
    real = gf.guide_norms
    monkeypatch.setattr(gf, "guide_norms", lambda p: calls.append(1) or real(p))
    case = _case(b=20, world=2, rank=1, k=1, margin=0.05)
    H.check_problem(triton_backend, case)
    assert len(calls) == 1  # the forward's; the backward reused them


def test_op_schema_with_the_triton_backend():
    """``torch.library.opcheck`` on the op with the kernels (its fake function's norms output
    and the backward that takes them)."""
    from tests.loss.test_op import _op_args

    args = list(_op_args(_case(b=12, k=1, d=16, d_g=16)))
    args[-1] = "triton"
    from gist_ray.loss.op import gist_rows

    torch.library.opcheck(gist_rows, tuple(args))
