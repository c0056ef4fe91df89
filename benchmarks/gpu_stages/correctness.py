"""Stage 2: the kernels against the ``reference`` backend on this device, forward and backward.

Every case is one check of tests/loss/harness.py (fresh random inputs, the unit tests'
tolerances), on sizes that cross what the unit tests' interpreter sizes cross only in small:

* seams: a pool that crosses forward column splits and backward chunks (both read off the
  launches), in bf16, fp16 and fp32; widths that are not multiples of 16 (padded copies);
* strided views (a width's first columns inside a wider row, what Matryoshka widths are), taken
  by the launchers without a copy, equal to the reference and bit for bit to contiguous copies;
* Matryoshka (the narrower widths' forwards load the widest one's mask bits, or recompute it),
  hardness weighting in every mode, both together, the backward that recomputes the mask;
* the sm_80 tile plans (GEMM operands as pointers, not TMA descriptors) run on this GPU: the
  launchers' plan choice asks ``plan_for`` for compute capability 8 (the function the launchers
  call, so CUDA runs those kernels); under --smoke the interpreter's plan without descriptors;
* duplicate-text ties, 16-bit gradients of confident rows against float64, all-masked rows;
* determinism: two runs bit for bit;
* the dtype training feeds the loss: a tiny random BERT with mean pooling and Normalize under
  the training step's autocast (CUDA autocast returns float32 from layer_norm and normalize).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from gpu_stages.common import (
    DTYPES,
    Ctx,
    compiled_kernels,
    gist_function,
    harness,
    launch_log,
    leaves,
    seams,
    train_backend,
    triton_rows,
)
from gpu_stages.tiny_bert import dtype_probe


def run(ctx: Ctx) -> None:
    H = harness()
    dev, smoke = ctx.dev, ctx.smoke
    bf16 = torch.bfloat16
    # Seams: interpreter tiles are 32 wide, every tile its own split, backward chunks of 64
    # columns; on a GPU the backward chunk is ~2^27 / b columns (32,768 at b = 4,096).
    seam = (
        H.Case(b=30, world=3, rank=1, k=1, d=48, d_g=32, margin=0.05, device=dev)
        if smoke
        else H.Case(b=4096, world=10, rank=3, k=1, d=256, d_g=384, margin=0.05, device=dev)
    )
    mid = dict(b=36, d=48, d_g=32) if smoke else dict(b=1024, d=256, d_g=384)  # fmt: skip
    for name, dtype in DTYPES.items():
        ctx.case(f"seams {name}", lambda t=dtype: _seams(replace(seam, dtype=t)))
    ctx.case(
        "determinism bf16 (two runs, bit for bit)", lambda: _determinism(replace(seam, dtype=bf16))
    )
    ctx.case("dtype training feeds the loss", lambda: dtype_probe(dev, ctx.out, train_backend(ctx)))
    padded = H.Case(b=30, world=2, rank=1, k=1, d=40, d_g=27, margin=0.05, dtype=bf16, device=dev)
    if not smoke:
        padded = replace(padded, b=300, world=4, rank=2, d=200, d_g=300)
    ctx.case("padded widths bf16", lambda: _problem(padded))
    ctx.case("strided views bf16", lambda: _strided(replace(seam, dtype=bf16)))
    ctx.case(
        "front end bf16, k=2, relative margin",
        lambda: _stats(
            H.check_front_end(
                "triton",
                H.Case(k=2, margin=0.2, strategy="relative", dtype=bf16, device=dev, **mid),
            )
        ),
    )
    dims = [48, 32, 16] if smoke else [256, 128, 64]
    mat = H.Case(k=1, margin=0.05, dtype=bf16, device=dev, **mid)
    ctx.case(
        "matryoshka bf16 (fwd_load)",
        lambda: _stats(H.check_matryoshka("triton", mat, dims, [1.0, 0.5, 2.0])),
    )
    ctx.case(
        "matryoshka bf16, mask recomputed",
        lambda: _no_bits(lambda: _stats(H.check_matryoshka("triton", mat, dims))),
    )
    hard = H.Case(k=2, margin=0.05, dtype=bf16, device=dev, **mid)
    for mode in ("hard_negatives", "in_batch_negatives", "all_negatives"):
        ctx.case(
            f"hardness {mode} bf16",
            lambda m=mode: H.check_hardness("triton", hard, alpha=2.0, mode=m),
        )
    ctx.case(
        "matryoshka + hardness bf16 (fwd_load_hard)",
        lambda: _stats(
            H.check_matryoshka(
                "triton", hard, dims[:2], hardness_alpha=3.0, hardness_mode="in_batch_negatives"
            )
        ),
    )
    ctx.case(
        "backward recomputes the mask bf16",
        lambda: _no_bits(lambda: _seams(replace(seam, dtype=bf16))),
    )
    for name, bits in (("bf16", True), ("bf16 recompute", False), ("fp32", True)):
        dtype = torch.float32 if name == "fp32" else bf16
        ctx.case(
            f"sm80 pointer plan {name}", lambda t=dtype, b=bits: _sm80(replace(seam, dtype=t), b)
        )
    tie_b = 30 if smoke else 300
    for name in ("bf16", "fp32"):
        ctx.case(
            f"ties {name}",
            lambda n=name: H.check_ties(
                triton_rows, H.Case(b=tie_b, world=2, rank=1, k=2, dtype=DTYPES[n], device=dev)
            ),
        )
    for name in ("bf16", "fp16"):
        ctx.case(
            f"confident rows {name}",
            lambda n=name: _pairs(H.check_confident_rows("triton", DTYPES[n], dev)),
        )
    ctx.case(
        "all masked rows bf16",
        lambda: _stats(
            H.check_front_end(
                "triton", H.Case(b=45, k=1, d_g=32, all_masked=True, dtype=bf16, device=dev)
            )
        ),
    )
    ctx.put("kernels", compiled_kernels())


def _stats(stats: dict) -> dict:
    return {"stats": {k: round(float(v), 6) for k, v in stats.items()}}


def _pairs(result: dict) -> dict:
    return {"worst_row_error_vs_autocast": result}


def _problem(case) -> dict:
    H = harness()
    with launch_log() as launches:
        H.check_problem(triton_rows, case)
    return seams(launches, 4)


def _seams(case) -> dict:
    """check_problem, and proof from the launches that a column split and a backward chunk
    were crossed (when the launch log is available)."""
    got = _problem(case)
    if got["launches"]:
        assert got["fwd_column_splits"] > 1, f"no column split crossed: {got}"
        assert got["bwd_chunks"] > 1, f"no backward chunk crossed: {got}"
    return {"b": case.b, "n": case.b * case.world, "d": case.d, "d_g": case.d_g, **got}


@contextlib.contextmanager
def _bits_off():
    import gist_ray.loss.plan as plan

    old, plan.MASK_BITS_FRACTION = plan.MASK_BITS_FRACTION, 0.0
    try:
        yield
    finally:
        plan.MASK_BITS_FRACTION = old


def _no_bits(fn):
    with _bits_off():
        return fn()


@contextlib.contextmanager
def _sm80_plans(used: list[str]):
    """The launchers pick sm_80's plans: on a GPU ``pick_plan`` (what every launch calls) asks
    ``plan_for`` for compute capability 8 with this device's shared memory; under the
    interpreter (no plan table is read there) its one plan without TMA descriptors."""
    gf = gist_function()
    if gf.INTERPRETED:
        old = gf.INTERPRET_PLAN
        gf.INTERPRET_PLAN = replace(old, name="interpreter-pointers", tma=False)
        used.append(gf.INTERPRET_PLAN.name)
        try:
            yield
        finally:
            gf.INTERPRET_PLAN = old
        return
    original = gf.pick_plan

    def sm80(dtype, device):
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
        plan = gf.plan_for(dtype.itemsize, 8, smem)
        used.append(plan.name)
        return plan

    gf.pick_plan = sm80
    try:
        yield
    finally:
        gf.pick_plan = original


def _sm80(case, bits: bool) -> dict:
    used: list[str] = []
    with _sm80_plans(used), contextlib.ExitStack() as stack:
        if not bits:
            stack.enter_context(_bits_off())
        got = _seams(case)
    assert used, "the launchers never asked for a plan"
    assert not any(p.startswith("sm90") for p in used), f"plans used: {sorted(set(used))}"
    if got["launches"]:
        assert got["tma"] == ["False"], f"TMA flags of the launches: {got['tma']}"
    return {"plans": sorted(set(used)), **got}


def _strided(case) -> dict:
    """The student and guide operands as ``[:, :w]`` views of rows ``w + 64`` wide (the row
    stride a Matryoshka width has inside its full-width embeddings): the launchers take them
    as they are (no padded copy), the result equals ``reference`` and, bit for bit, the same
    problem on contiguous copies; the gradient reaches the view's columns only."""
    H = harness()
    from gist_ray.loss.reference import reference_backend

    base = H.make_problem(case, H.make_inputs(case, H.fresh_seed()))
    gf = gist_function()
    pad = 64

    def wide(x: torch.Tensor) -> torch.Tensor:
        buf = x.new_zeros(x.shape[0], x.shape[1] + pad)
        buf[:, : x.shape[1]] = x
        return buf

    weights = torch.randn(case.b, device=base.left[0].device)
    runs = {}
    for name, fn, views in (
        ("reference", reference_backend, True),
        ("triton", triton_rows, True),
        ("contiguous", triton_rows, False),
    ):
        bufs_l = [wide(x).requires_grad_() for x in base.left]
        bufs_c = [wide(x).requires_grad_() for x in base.cands]
        cut = (lambda t, w: t[:, :w]) if views else (lambda t, w: t[:, :w].contiguous())
        p = replace(
            base, left=tuple(cut(t, x.shape[1]) for t, x in zip(bufs_l, base.left)),
            cands=tuple(cut(t, x.shape[1]) for t, x in zip(bufs_c, base.cands)),
            guide_left=tuple(cut(wide(x), x.shape[1]) for x in base.guide_left),
            guide_cands=tuple(cut(wide(x), x.shape[1]) for x in base.guide_cands),
        )  # fmt: skip
        if views:
            for x in (*p.left, *p.cands, *p.guide_left, *p.guide_cands):
                assert not x.is_contiguous() and x.stride(0) == x.shape[1] + pad
                if hasattr(gf, "aligned"):
                    assert gf.aligned(x) is x, "the launcher copied a 16-aligned strided view"
        out = fn(p)
        (weights * out.loss).sum().backward()
        runs[name] = (out, [t.grad for t in (*bufs_l, *bufs_c)])
    (ref, ref_g), (tri, tri_g), (con, con_g) = runs["reference"], runs["triton"], runs["contiguous"]
    tol = H.TOL[case.dtype]
    H.assert_close(tri.loss, ref.loss, tol, "loss")
    assert torch.equal(tri.masked, ref.masked), "masked counts"
    widths = [x.shape[1] for x in (*base.left, *base.cands)]
    for j, (g, r, w) in enumerate(zip(tri_g, ref_g, widths)):
        H.assert_close(g[:, :w], r[:, :w], tol, f"grad of operand {j}")
        assert not g[:, w:].any(), f"gradient outside the view of operand {j}"
    assert torch.equal(tri.loss, con.loss), "views and contiguous copies differ (loss)"
    for j, (g, c, w) in enumerate(zip(tri_g, con_g, widths)):
        assert torch.equal(g[:, :w], c[:, :w]), f"views and contiguous copies differ (grad {j})"
    return {"b": case.b, "n": case.b * case.world, "row_stride_pad": pad}


def _determinism(case) -> dict:
    """The same problem twice: loss, masked counts, above counts, thresholds and every
    gradient bitwise equal."""
    H = harness()
    base = H.make_problem(case, H.make_inputs(case, H.fresh_seed()))
    weights = torch.randn(case.b, device=base.left[0].device)
    outs = []
    for _ in range(2):
        p = replace(
            base,
            left=tuple(x.detach().clone().requires_grad_() for x in base.left),
            cands=tuple(x.detach().clone().requires_grad_() for x in base.cands),
        )
        out = triton_rows(p)
        (weights * out.loss).sum().backward()
        outs.append([out.loss, out.masked, out.above, out.threshold,
                     *[x.grad for x in leaves(p)]])  # fmt: skip
    names = ["loss", "masked", "above", "threshold"] + [f"grad {j}" for j in range(5)]
    differ = [n for n, x, y in zip(names, *outs) if not torch.equal(x, y)]
    assert not differ, f"two runs differ in {differ}"
    return {"b": case.b, "n": case.b * case.world, "compared": names}
