"""The comparison harness of the loss backends: random inputs, tolerances, and checks of a
backend against the ``reference`` oracle, through the public front end or on a Problem directly.
Used by tests/loss/test_chunked.py and tests/kernels/test_triton_kernel.py.

Inputs are fresh random draws each run; every check prints its seed, and
``GIST_TEST_SEED=<seed>`` replays it.

Guide embeddings are *dyadic*: 16 entries of ±1/4 and zeros elsewhere, so they are unit vectors
in every dtype and every guide similarity is a multiple of 1/16, exact in any summation order.
Each backend therefore makes exactly the reference's masking decisions (margin 0 makes exact
ties, which tests the strict ``>``) and masked counts are compared for equality. The guide is a
sign pattern of a random projection of the student (plus noise), so a realistic 5-30 % of the
candidates are masked. ``above`` compares logits against the positive's, so near-ties are
possible; it is checked against the reference with the positive logit shifted by ±1e-3.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, replace

import pytest
import torch

from gist_ray.loss import gist_loss
from gist_ray.loss.plan import BackendOutput, Problem, build_segments
from gist_ray.loss.reference import reference_backend

# Relative tolerance of losses and gradients per input dtype (fp32 backends differ from the
# reference only in summation order; 16-bit gradients are rounded to the input dtype).
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


# Every margin setting, and every combination of the contrast flags (anchors, positives).
MARGINS = [
    ("absolute", 0.0),
    ("absolute", 0.05),
    ("absolute", 0.2),
    ("relative", 0.05),
    ("relative", 0.2),
]
CONTRAST = [(True, True), (True, False), (False, True), (False, False)]


def fresh_seed() -> int:
    seed = int(os.environ.get("GIST_TEST_SEED") or random.randrange(2**31))
    print(f"seed={seed}  (replay: GIST_TEST_SEED={seed})")
    return seed


@dataclass(frozen=True)
class Case:
    b: int = 50  # local query rows
    world: int = 1  # pool = world * b rows; the local rows are rank `rank`'s slice
    rank: int = 0
    d: int = 48
    d_g: int = 40
    k: int = 1  # negative columns
    margin: float = 0.0
    strategy: str = "absolute"
    contrast_anchors: bool = True
    contrast_positives: bool = True
    dtype: torch.dtype = torch.float32
    guide_dtype: torch.dtype | None = None  # default: dtype
    all_masked: bool = False  # every candidate but the positive is masked, for every row
    temperature: float = 0.01
    device: str = "cpu"


def _dyadic(y: torch.Tensor) -> torch.Tensor:
    idx = y.abs().topk(16, dim=1).indices
    vals = torch.where(y.gather(1, idx) >= 0, 0.25, -0.25)
    return torch.zeros_like(y).scatter_(1, idx, vals)


def _masked_guides(n: int, k: int, d_g: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Guides where g(c, row i) > t_i = 1/2 for every candidate c but row i's positive.

    All share 12 coordinates of +1/4; row i adds a distinct 4-subset W_i of 12 more coordinates,
    negative in its anchor and positive in its positive (so g(a_i, p_i) = 8/16 while
    g(a_i, p_j) >= 9/16, g(a_i, a_j) >= 12/16 and g(p_i, p_j) >= 12/16); negatives add 4
    coordinates of their own (g(a_i, n_j) = 12/16)."""
    assert d_g >= 28 and n <= 495
    subsets = list(itertools.combinations(range(12, 24), 4))
    order = torch.randperm(len(subsets), generator=gen)[:n].tolist()
    ga, gp = torch.zeros(n, d_g), torch.zeros(n, d_g)
    ga[:, :12] = gp[:, :12] = 0.25
    for row, j in enumerate(order):
        ga[row, list(subsets[j])] = -0.25
        gp[row, list(subsets[j])] = 0.25
    gn = torch.zeros(n, d_g)
    gn[:, :12] = gn[:, 24:28] = 0.25
    return [ga, gp] + [gn.clone() for _ in range(k)]


def make_inputs(case: Case, seed: int) -> list[torch.Tensor]:
    """``[a, p, n_1..n_k, ga, gp, gn_1..gn_k]`` over the whole pool (``world * b`` rows)."""
    gen = torch.Generator().manual_seed(seed)
    n, d = case.world * case.b, case.d
    topics = torch.randn(max(2, n // 6), d, generator=gen)

    def sample() -> torch.Tensor:  # topic clusters, so that in-topic negatives compete
        pick = torch.randint(topics.shape[0], (n,), generator=gen)
        return topics[pick] + 0.6 * torch.randn(n, d, generator=gen)

    a = sample()
    student = [a, a + torch.randn(n, d, generator=gen)] + [sample() for _ in range(case.k)]
    if case.all_masked:
        guide = _masked_guides(n, case.k, case.d_g, gen)
    else:
        proj = torch.randn(d, case.d_g, generator=gen)
        noise = 0.8 * d**0.5
        guide = [
            _dyadic(x @ proj + noise * torch.randn(n, case.d_g, generator=gen)) for x in student
        ]
    guide_dtype = case.guide_dtype or case.dtype
    return [x.to(case.device, case.dtype) for x in student] + [
        x.to(case.device, guide_dtype) for x in guide
    ]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Max abs error within ``tol`` × the expected magnitude (floor 1: gradients of rows whose
    loss is 0, e.g. all-masked rows, are rounding noise around 0)."""
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} × {scale:.3g}"


# ---------------------------------------------------------------- through the public front end


def _front(backend: str, case: Case, inputs: list[torch.Tensor]):
    k = case.k
    leaves = [x.clone().requires_grad_() for x in inputs[: 2 + k]]
    loss, stats = gist_loss(
        leaves[0], leaves[1], inputs[2 + k], inputs[3 + k], leaves[2:], inputs[4 + k :],
        temperature=case.temperature, margin=case.margin, margin_strategy=case.strategy,
        contrast_anchors=case.contrast_anchors, contrast_positives=case.contrast_positives,
        backend=backend, return_stats=True,
    )  # fmt: skip
    loss.backward()
    return loss.detach(), stats, [x.grad for x in leaves]


def check_front_end(backend: str, case: Case) -> dict[str, float]:
    """``gist_loss(..., backend=backend)`` against ``backend="reference"``: loss, statistics
    (mask fractions exactly) and the gradients of anchor, positive and every negative."""
    inputs = make_inputs(case, fresh_seed())
    tol = TOL[case.dtype]
    ref_loss, ref_stats, ref_grads = _front("reference", case, inputs)
    loss, stats, grads = _front(backend, case, inputs)
    assert torch.isfinite(loss)
    assert_close(loss, ref_loss, tol, "loss")
    for key, value in ref_stats.items():
        if key == "positive_rank_mean":
            # A rival within rounding of the positive's logit may flip per backend (ties).
            assert abs(stats[key] - value) <= 1.0 + 1e-9, key
        else:
            assert stats[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    names = ["anchor", "positive"] + [f"negative_{j + 1}" for j in range(case.k)]
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert g.dtype == case.dtype, f"grad of {name} is {g.dtype}"
        assert_close(g, g_ref, tol, f"grad of {name}")
    return stats


# ------------------------------------------------------------- a backend on a Problem directly


def make_problem(case: Case, inputs: list[torch.Tensor]) -> Problem:
    """The Problem the front end would build on rank ``case.rank`` of ``case.world`` after the
    all-gather: local rows ``rank*b ..``, candidates from the whole pool, ``offset = rank*b``."""
    k, b, r = case.k, case.b, case.rank
    norm = [torch.nn.functional.normalize(x.float(), dim=-1).to(x.dtype) for x in inputs]
    a, p, ns = norm[0], norm[1], norm[2 : 2 + k]
    ga, gp, gns = norm[2 + k], norm[3 + k], norm[4 + k :]
    loc = slice(r * b, (r + 1) * b)
    segments = build_segments(b, a.shape[0], k, case.contrast_anchors, case.contrast_positives)
    pool = {"ap": (p, gp), "aa": (a, ga), "pp": (p, gp)}
    pool.update({f"an{j + 1}": (n, g) for j, (n, g) in enumerate(zip(ns, gns))})
    return Problem(
        left=torch.cat([a[loc], p[loc]]),
        guide_left=torch.cat([ga[loc], gp[loc]]),
        cand=torch.cat([pool[s.name][0] for s in segments]),
        guide_cand=torch.cat([pool[s.name][1] for s in segments]),
        threshold=(ga[loc].float() * gp[loc].float()).sum(-1),
        pos_logit=(a[loc].float() * p[loc].float()).sum(-1) / case.temperature,
        segments=segments,
        offset=r * b,
        temperature=case.temperature,
        margin=case.margin,
        strategy=case.strategy,
    )


def _with_leaves(prob: Problem) -> Problem:
    return replace(
        prob, left=prob.left.clone().requires_grad_(), cand=prob.cand.clone().requires_grad_()
    )


def check_problem(backend, case: Case) -> BackendOutput:
    """``backend(problem)`` against ``reference_backend``: lse, masked counts (exact), above
    (up to near-ties) and the gradients of ``Σ w_i·lse_i`` (random w) w.r.t. left and cand."""
    seed = fresh_seed()
    base = make_problem(case, make_inputs(case, seed))
    weights = torch.randn(case.b, generator=torch.Generator().manual_seed(seed + 1))
    weights = weights.to(case.device)
    tol = TOL[case.dtype]
    outs = {}
    for name, fn in [("reference", reference_backend), ("backend", backend)]:
        prob = _with_leaves(base)
        out = fn(prob)
        (weights * out.lse).sum().backward()
        outs[name] = (out, prob.left.grad, prob.cand.grad)
    (ref, ref_dl, ref_dc), (out, dl, dc) = outs["reference"], outs["backend"]
    assert out.lse.dtype == torch.float32 and out.lse.shape == (case.b,)
    assert_close(out.lse, ref.lse, tol, "lse")
    assert out.masked.dtype == torch.int64 and torch.equal(out.masked, ref.masked), "masked"
    above_lo = reference_backend(replace(base, pos_logit=base.pos_logit + 1e-3)).above
    above_hi = reference_backend(replace(base, pos_logit=base.pos_logit - 1e-3)).above
    assert out.above.dtype == torch.int64
    assert ((above_lo <= out.above) & (out.above <= above_hi)).all(), "above"
    assert dl.dtype == case.dtype and dc.dtype == case.dtype
    assert_close(dl, ref_dl, tol, "grad of left")
    assert_close(dc, ref_dc, tol, "grad of cand")
    return out
