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
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from gist_ray.loss import gist_loss
from gist_ray.loss.functional import column_names
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


def dyadic(y: torch.Tensor) -> torch.Tensor:
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
            dyadic(x @ proj + noise * torch.randn(n, case.d_g, generator=gen)) for x in student
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


def _front(backend: str, case: Case, inputs: list[torch.Tensor], width: int | None = None,
           **extra):  # fmt: skip
    """``gist_loss`` of the inputs (student truncated to ``width`` first when given); ``extra``:
    more keyword arguments of gist_loss."""
    k = case.k
    leaves = [x.clone().requires_grad_() for x in inputs[: 2 + k]]
    student = [x[:, :width] for x in leaves] if width else leaves
    loss, stats = gist_loss(
        student[0], student[1], inputs[2 + k], inputs[3 + k], student[2:], inputs[4 + k :],
        temperature=case.temperature, margin=case.margin, margin_strategy=case.strategy,
        contrast_anchors=case.contrast_anchors, contrast_positives=case.contrast_positives,
        backend=backend, return_stats=True, **extra,
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
            assert math.isclose(stats[key], value, rel_tol=1e-12, abs_tol=1e-12), key
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
    dtype = case.dtype
    student = [torch.nn.functional.normalize(x.float(), dim=-1).to(dtype) for x in inputs[: 2 + k]]
    guide = [x.to(dtype) for x in inputs[2 + k :]]
    loc = slice(r * b, (r + 1) * b)
    segments, sources = build_segments(k, case.contrast_anchors, case.contrast_positives)
    column = {name: j for j, name in enumerate(column_names(2 + k))}
    return Problem(
        left=(student[0][loc], student[1][loc]),
        cands=tuple(student[column[s]] for s in sources),
        guide_left=(guide[0][loc], guide[1][loc]),
        guide_cands=tuple(guide[column[s]] for s in sources),
        segments=segments,
        offset=r * b,
        temperature=case.temperature,
        margin=case.margin,
        strategy=case.strategy,
    )


def _with_leaves(prob: Problem) -> Problem:
    return replace(
        prob,
        left=tuple(x.clone().requires_grad_() for x in prob.left),
        cands=tuple(x.clone().requires_grad_() for x in prob.cands),
    )


def check_problem(backend: Callable[[Problem], BackendOutput], case: Case) -> BackendOutput:
    """``backend(problem)`` against ``reference_backend``: loss, masked counts (exact),
    threshold, above (up to near-ties) and the gradients of ``Σ w_i·loss_i`` (random w) w.r.t.
    the left operands and every candidate tensor."""
    seed = fresh_seed()
    base = make_problem(case, make_inputs(case, seed))
    weights = torch.randn(case.b, generator=torch.Generator().manual_seed(seed + 1))
    weights = weights.to(case.device)
    tol = TOL[case.dtype]
    outs = {}
    for name, fn in [("reference", reference_backend), ("backend", backend)]:
        prob = _with_leaves(base)
        out = fn(prob)
        (weights * out.loss).sum().backward()
        outs[name] = (out, [x.grad for x in prob.left + prob.cands])
    (ref, ref_grads), (out, grads) = outs["reference"], outs["backend"]
    assert out.loss.dtype == torch.float32 and out.loss.shape == (case.b,)
    assert_close(out.loss, ref.loss, tol, "loss")
    assert out.masked.dtype == torch.int64 and torch.equal(out.masked, ref.masked), "masked"
    assert torch.equal(out.threshold, ref.threshold), "threshold"
    above_lo = reference_backend(base, above_slack=1e-3).above
    above_hi = reference_backend(base, above_slack=-1e-3).above
    assert out.above.dtype == torch.int64
    assert ((above_lo <= out.above) & (out.above <= above_hi)).all(), "above"
    names = ["anchor rows", "positive rows"] + [f"candidates {j}" for j in range(len(base.cands))]
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert g.dtype == case.dtype, f"grad of {name} is {g.dtype}"
        assert_close(g, g_ref, tol, f"grad of {name}")
    return out


# ----------------------------------------------------------------------------- duplicates, ties

TIE_GAP = 1e-5  # every pair that is not an exact tie is this far from its limit (in float64)


def tie_inputs(case: Case, seed: int) -> list[torch.Tensor]:
    """Inputs with duplicate texts (identical student and guide rows): positives copied to other
    rows' positives and negatives, anchors copied to other anchors. The guide is Gaussian (not
    dyadic), so a tie ``g = t_i`` is exact only where the two guide rows are identical; inputs
    are redrawn until every other pair is at least TIE_GAP from its limit."""
    for attempt in range(50):
        gen = torch.Generator().manual_seed(seed + attempt)
        n, k = case.world * case.b, case.k
        x = [torch.randn(n, case.d, generator=gen) for _ in range(2 + k)]
        x[1] = x[0] + 0.7 * torch.randn(n, case.d, generator=gen)
        proj = torch.randn(case.d, case.d_g, generator=gen)
        g = [xi @ proj + case.d**0.5 * torch.randn(n, case.d_g, generator=gen) for xi in x]
        rows = torch.randperm(n, generator=gen).tolist()
        for src, dst in zip(rows[: n // 5], rows[n // 5 : 2 * n // 5]):  # duplicate positives
            x[1][dst], g[1][dst] = x[1][src], g[1][src]
        for j, (src, dst) in enumerate(zip(rows[: n // 5], rows[2 * n // 5 : 3 * n // 5])):
            col = 2 + j % k if k else 1  # a negative that is another row's positive text
            x[col][dst], g[col][dst] = x[1][src], g[1][src]
        for src, dst in zip(rows[3 * n // 5 : 3 * n // 5 + 3], rows[-3:]):  # duplicate anchors
            x[0][dst], g[0][dst] = x[0][src], g[0][src]
        inputs = [t.to(case.dtype) for t in x + g]
        if _tie_gap(case, inputs) >= TIE_GAP:
            return [t.to(case.device) for t in inputs]
    raise AssertionError("could not draw inputs without near-ties")


def _guide_cosines(case: Case, inputs: list[torch.Tensor]):
    """Per segment (name, left slot, ``[b, N]`` float64 guide cosines, exact-tie mask) of the
    local rows, and ``t``; ties are pairs whose guide rows equal row i's positive's exactly."""
    k, b, r = case.k, case.b, case.rank
    raw = [x.cpu() for x in inputs[2 + k :]]
    guide = [torch.nn.functional.normalize(x.double(), dim=-1) for x in raw]
    loc = slice(r * b, (r + 1) * b)
    t = (guide[0][loc] * guide[1][loc]).sum(-1)
    segs, sources = build_segments(k, case.contrast_anchors, case.contrast_positives)
    column = {name: j for j, name in enumerate(column_names(2 + k))}
    out = []
    for seg in segs:
        gl, gc = guide[seg.left][loc], guide[column[sources[seg.cand]]]
        same = (raw[column[sources[seg.cand]]][None, :, :] == raw[1][loc][:, None, :]).all(-1)
        out.append((seg, gl @ gc.T, same & (seg.left == 0)))
    return out, t


def _tie_gap(case: Case, inputs: list[torch.Tensor]) -> float:
    cos, t = _guide_cosines(case, inputs)
    gaps = [(g - t[:, None]).abs()[~tie] for _, g, tie in cos]
    return min(float(x.min()) for x in gaps if x.numel())


def expected_masked(case: Case, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``[b, S]`` masked counts by the definition (margin 0): ``g > t_i`` strictly, an exact tie
    kept, the positive and the self-pairs never counted."""
    assert case.margin == 0
    cos, t = _guide_cosines(case, inputs)
    b, rows = case.b, torch.arange(case.b)
    counts = []
    for seg, g, tie in cos:
        masked = (g > t[:, None]) & ~tie
        if seg.diag:
            masked[rows, case.rank * b + rows] = False
        counts.append(masked.sum(1))
    return torch.stack(counts, 1)


def check_ties(backend: Callable[[Problem], BackendOutput], case: Case) -> None:
    """Masked counts per segment with duplicate texts: ``backend`` equals ``reference``, and
    both equal the definition."""
    inputs = tie_inputs(case, fresh_seed())
    expected = expected_masked(case, inputs)
    assert int(expected.sum()) > 0
    problem = make_problem(case, inputs)
    ref, out = reference_backend(problem), backend(problem)
    assert torch.equal(ref.masked.cpu(), expected), "reference"
    assert torch.equal(out.masked.cpu(), expected), "backend"
    assert_close(out.loss, ref.loss, TOL[case.dtype], "loss")


# ------------------------------------------------- 16-bit gradients on confident rows (float64)

CONFIDENT = (0.9, 0.995)  # the positive's softmax weight on the rows that are checked


def confident_inputs(dtype: torch.dtype, seed: int, b: int = 48, d: int = 64, d_g: int = 32):
    """Student rows whose positive takes 0.8-1.0 of the softmax (anchor-positive cosines
    0.4-0.8 at τ = 0.05), rounded to ``dtype``; dyadic guides (exact masks everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    a = unit(torch.randn(b, d, generator=gen))
    spread = torch.linspace(0.8, 2.2, b).unsqueeze(1)
    p = a + spread * unit(torch.randn(b, d, generator=gen))
    n = torch.randn(b, d, generator=gen)
    guide = [dyadic(torch.randn(b, d_g, generator=gen)) for _ in range(3)]
    return [x.to(dtype) for x in (a, p, n)], guide


def _segment_masks(guide: list[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
    """(left column, candidate column, dropped ``[b, b]``) for AP, AA, PP, AN by the definition
    (margin 0), in float64."""
    g = [torch.nn.functional.normalize(x.double(), dim=-1) for x in guide]
    b = g[0].shape[0]
    t = (g[0] * g[1]).sum(-1, keepdim=True)
    eye = torch.eye(b, dtype=torch.bool)
    out = []
    for left, cand, diag in ((0, 1, 1), (0, 0, 2), (1, 1, 2), (0, 2, 0)):
        drop = g[left] @ g[cand].T > t
        if diag == 1:
            drop &= ~eye
        if diag == 2:
            drop |= eye
        out.append((left, cand, drop))
    return out


def oracle_grads(student: list[torch.Tensor], guide, temperature: float):
    """float64 loss of every row, the positive's weight and the anchor and positive gradients."""
    leaves = [x.double().requires_grad_() for x in student]
    x = [torch.nn.functional.normalize(v, dim=-1) for v in leaves]
    scores = [(x[lf] @ x[c].T / temperature).masked_fill(drop, float("-inf"))
              for lf, c, drop in _segment_masks(guide)]  # fmt: skip
    scores = torch.cat(scores, 1)
    b = scores.shape[0]
    rows = torch.arange(b)
    loss = torch.logsumexp(scores, 1) - scores[rows, rows]
    loss.mean().backward()
    weight = torch.softmax(scores.detach(), 1)[rows, rows]
    return weight, leaves[0].grad, leaves[1].grad


def autocast_grads(student: list[torch.Tensor], guide, temperature: float, device: str = "cpu"):
    """The plain autocast recipe: float32 normalise, 16-bit GEMM (16-bit logits), float32
    masked cross-entropy. Returns the anchor and positive gradients (on the CPU)."""
    leaves = [x.clone().to(device).requires_grad_() for x in student]
    x = [torch.nn.functional.normalize(v.float(), dim=-1).to(v.dtype) for v in leaves]
    scores = [(x[lf] @ x[c].T).float().div(temperature).masked_fill(drop.to(device), -math.inf)
              for lf, c, drop in _segment_masks(guide)]  # fmt: skip
    scores = torch.cat(scores, 1)
    target = torch.arange(scores.shape[0], device=device)
    torch.nn.functional.cross_entropy(scores, target).backward()
    return leaves[0].grad.cpu(), leaves[1].grad.cpu()


def row_errors(grad: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (grad.double() - exact).norm(dim=1) / exact.norm(dim=1)


def check_confident_rows(backend: str, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Per-row relative error of the anchor and positive gradients of ``gist_loss`` against a
    float64 oracle on the same rounded inputs, on rows where the positive's weight is in
    CONFIDENT: at most twice the worst row error of the autocast recipe, in this very test."""
    tau = 0.05
    student, guide = confident_inputs(dtype, fresh_seed())
    weight, exact_a, exact_p = oracle_grads(student, guide, tau)
    rows = (weight >= CONFIDENT[0]) & (weight <= CONFIDENT[1])
    assert rows.sum() >= 8, f"only {int(rows.sum())} confident rows"
    ref_a, ref_p = autocast_grads(student, guide, tau, device)
    leaves = [x.clone().to(device).requires_grad_() for x in student]
    loss = gist_loss(leaves[0], leaves[1], guide[0].to(device), guide[1].to(device), [leaves[2]],
                     [guide[2].to(device)], temperature=tau, backend=backend)  # fmt: skip
    loss.backward()
    result = {}
    for name, ours, auto, exact in (
        ("anchor", leaves[0].grad.cpu(), ref_a, exact_a),
        ("positive", leaves[1].grad.cpu(), ref_p, exact_p),
    ):
        err, err_auto = row_errors(ours, exact)[rows], row_errors(auto, exact)[rows]
        result[name] = (float(err.max()), float(err_auto.max()))
        assert err.max() <= 2 * err_auto.max(), (
            f"{name} gradient: worst row error {float(err.max()):.3g} > 2 × autocast's "
            f"{float(err_auto.max()):.3g}"
        )
    print(result)
    return result


# ------------------------------------------------------ Matryoshka widths and hardness weighting


def check_matryoshka(
    backend: str,
    case: Case,
    dims: list[int],
    weights: list[float] | None = None,
    **extra,
) -> dict[str, float]:
    """``gist_loss(..., matryoshka_dims=dims, backend=backend)`` against the oracle: the
    weighted sum of independent ``reference`` losses of the student truncated to each width
    (each computing its own mask). Loss, per-width losses, the mask statistics (exactly those
    of the full-width loss) and every student gradient. ``extra``: more gist_loss settings
    (e.g. hardness), given to both."""
    inputs = make_inputs(case, fresh_seed())
    tol = TOL[case.dtype]
    coeffs = weights or [1.0] * len(dims)
    parts = [_front("reference", case, inputs, width=w, **extra) for w in dims]
    ref_loss = sum(c * loss for c, (loss, _, _) in zip(coeffs, parts))
    ref_grads = [sum(c * g[j] for c, (_, _, g) in zip(coeffs, parts)) for j in range(2 + case.k)]
    loss, stats, grads = _front(
        backend, case, inputs, matryoshka_dims=dims, matryoshka_weights=weights, **extra
    )
    assert_close(loss, ref_loss, tol, "loss")
    for w, (part, _, _) in zip(dims, parts):
        assert_close(torch.tensor(stats[f"loss/dim_{w}"]), part, tol, f"loss/dim_{w}")
    _, full_stats, _ = _front("reference", case, inputs, **extra)
    for key, value in full_stats.items():
        if key.startswith("mask_frac/") or key in ("threshold_mean", "no_negative_frac"):
            assert math.isclose(stats[key], value, rel_tol=1e-12, abs_tol=1e-12), key
    names = column_names(2 + case.k)
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert g.dtype == case.dtype, f"grad of {name} is {g.dtype}"
        assert_close(g, g_ref, tol, f"grad of {name}")
    return stats


def hardness_oracle(case: Case, inputs: list[torch.Tensor], alpha: float, mode: str):
    """The GIST loss with hardness weighting, straight from the definition in float64 (no code
    of gist_ray.loss): materialised AP | AA | PP | AN_1..k logits, the guide mask, then
    ``s/τ + α·sg(s)`` on the unmasked negatives ``mode`` selects among AP and AN (row i's own
    hard negatives: the diagonal of AN; in-batch ones: everything else but the positive).
    Returns the loss and the gradients of the student columns (one process, no gather)."""
    assert case.world == 1
    k, tau, b = case.k, case.temperature, case.b
    leaves = [x.double().requires_grad_() for x in inputs[: 2 + k]]
    x = [torch.nn.functional.normalize(v, dim=-1) for v in leaves]
    g = [torch.nn.functional.normalize(v.double(), dim=-1) for v in inputs[2 + k :]]
    t = (g[0] * g[1]).sum(-1, keepdim=True)
    limit = t - case.margin if case.strategy == "absolute" else t - t.abs() * case.margin
    eye = torch.eye(b, dtype=torch.bool)
    none = torch.zeros_like(eye)
    own = {"hard_negatives": (none, eye), "in_batch_negatives": (~eye, ~eye),
           "all_negatives": (~eye, ~none)}[mode]  # fmt: skip
    blocks = [(0, 1, "positive", own[0])]  # (left, candidate column, diagonal, weighted)
    blocks += [(0, 0, "self", none)] if case.contrast_anchors else []
    blocks += [(1, 1, "self", none)] if case.contrast_positives else []
    blocks += [(0, 2 + j, "", own[1]) for j in range(k)]
    logits = []
    for left, cand, diag, weighted in blocks:
        s = x[left] @ x[cand].T
        drop = g[left] @ g[cand].T > limit
        if diag == "positive":
            drop &= ~eye
        if diag == "self":
            drop |= eye
        z = s / tau + alpha * torch.where(weighted, s.detach(), 0.0)
        logits.append(z.masked_fill(drop, float("-inf")))
    scores = torch.cat(logits, 1)
    loss = (torch.logsumexp(scores, 1) - (x[0] * x[1]).sum(-1) / tau).mean()
    loss.backward()
    return loss.detach(), [v.grad for v in leaves]


def check_hardness(backend: str, case: Case, alpha: float, mode: str) -> None:
    """``gist_loss(..., hardness_alpha=alpha, hardness_mode=mode, backend=backend)`` against
    :func:`hardness_oracle`: loss and student gradients."""
    inputs = make_inputs(case, fresh_seed())
    tol = TOL[case.dtype]
    ref_loss, ref_grads = hardness_oracle(case, inputs, alpha, mode)
    loss, _, grads = _front(backend, case, inputs, hardness_alpha=alpha, hardness_mode=mode)
    assert_close(loss, ref_loss, tol, "loss")
    for name, g, g_ref in zip(column_names(2 + case.k), grads, ref_grads):
        assert g.dtype == case.dtype, f"grad of {name} is {g.dtype}"
        assert_close(g, g_ref, tol, f"grad of {name}")
