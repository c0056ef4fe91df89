"""A quick check of a loss backend against the ``reference`` oracle on one small problem.

Training runs it once per process before it trusts the Triton kernel (gist_ray.loss.select);
a device check can run it on any backend, device and dtype. :func:`probe_isolated` runs it in a
fresh Python process: on a GPU a kernel fault such as an illegal address breaks the CUDA context
of the process it happens in for good, so the process that is to train on must not be the one
that finds it. The problem is fixed by its seed
and built on the CPU (the same inputs on every machine), then moved to the device:

* ``rows`` local query rows of a pool of ``world × rows`` candidates, the local rows being rank
  ``rank``'s (the positive of row i at column ``rank·rows + i``), one negative column, every
  segment (AP, AA, PP, AN); the default sizes are multiples of no tile size;
* student rows drawn around shared topics (so in-topic negatives compete), L2-normalised in
  float32 and rounded once to ``dtype``, as the front end does;
* *dyadic* guide rows (16 entries of ±1/4): unit vectors in every dtype whose dot products are
  multiples of 1/16, exact in any summation order, so a correct backend makes exactly the
  reference's masking decisions (margin 0.05 keeps every pair 1/80 away from its limit).

Compared: per-row losses, masked counts per segment (exactly), and the gradients of
``Σ_i w_i·loss_i`` (random ``w``) with respect to the left operands and every candidate tensor,
each within a tolerance relative to the reference's magnitude: the loss is float32 arithmetic on
the rounded inputs in every backend (1e-4, 1e-3 for 16-bit inputs: fast exponentials); 16-bit
gradients are rounded to the input dtype (the tolerances the backends' own tests use).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from gist_ray.loss.op import tiled_backend
from gist_ray.loss.plan import BackendOutput, Problem, build_segments
from gist_ray.loss.reference import reference_backend

# Max abs error allowed, relative to the reference's largest magnitude (floor 1), per dtype:
# of the per-row losses, and of the gradients.
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TEMPERATURE, MARGIN = 0.05, 0.05

Backend = Callable[[Problem], BackendOutput]


def probe(
    backend: Backend,
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    dim: int = 64,
    guide_dim: int = 48,
    rows: int = 37,
    world: int = 3,
    rank: int = 1,
    seed: int = 0,
) -> str | None:
    """Run ``backend`` (a function of a :class:`~gist_ray.loss.plan.Problem`, e.g.
    ``functools.partial(gist_ray.loss.op.tiled_backend, backend="triton")``) and the reference on
    the same small problem on ``device`` in ``dtype`` (float32, bfloat16 or float16), forward and
    backward. Returns None when they agree, else the reason in one line: the exception the
    backend raised (``"RuntimeError: ..."``) or the first quantity that differs and by how much.
    ``dim``/``guide_dim``: the student's and the guide's widths (``guide_dim`` >= 16)."""
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype {dtype}: one of {', '.join(map(str, TOLERANCE))}")
    base = problem(torch.device(device), dtype, dim, guide_dim, rows, world, rank, seed)
    weights = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 1))
    weights = weights.to(base.left[0].device)
    with torch.enable_grad():
        expected = _run(reference_backend, base, weights)
        try:
            got = _run(backend, base, weights)
        except Exception as e:  # noqa: BLE001 - whatever the backend raises is the finding
            return one_line(e)
    return compare(got, expected, LOSS_TOLERANCE[dtype], TOLERANCE[dtype])


def problem(
    device: torch.device, dtype: torch.dtype, dim: int, guide_dim: int, rows: int, world: int,
    rank: int, seed: int,
) -> Problem:  # fmt: skip
    """The probe's problem (see the module docstring), rank ``rank``'s view of the pool."""
    if guide_dim < 16:
        raise ValueError(f"guide_dim must be >= 16 (16 entries of 1/4), got {guide_dim}")
    gen = torch.Generator().manual_seed(seed)
    n = world * rows
    topics = torch.randn(max(2, n // 6), dim, generator=gen)

    def sample() -> torch.Tensor:
        pick = torch.randint(topics.shape[0], (n,), generator=gen)
        return topics[pick] + 0.6 * torch.randn(n, dim, generator=gen)

    anchor = sample()
    student = [anchor, anchor + torch.randn(n, dim, generator=gen), sample()]
    proj = torch.randn(dim, guide_dim, generator=gen)
    noise = 0.8 * dim**0.5
    guide = [_dyadic(x @ proj + noise * torch.randn(n, guide_dim, generator=gen)) for x in student]
    student = [F.normalize(x, dim=-1).to(device, dtype) for x in student]
    guide = [x.to(device, dtype) for x in guide]
    local = slice(rank * rows, (rank + 1) * rows)
    segments, sources = build_segments(1, True, True)
    column = {"anchor": 0, "positive": 1, "negative_1": 2}
    return Problem(
        left=(student[0][local], student[1][local]),
        cands=tuple(student[column[s]] for s in sources),
        guide_left=(guide[0][local], guide[1][local]),
        guide_cands=tuple(guide[column[s]] for s in sources),
        segments=segments,
        offset=rank * rows,
        temperature=TEMPERATURE,
        margin=MARGIN,
        strategy="absolute",
    )


def _dyadic(y: torch.Tensor) -> torch.Tensor:
    """Each row's 16 largest entries as ±1/4 (their signs), zeros elsewhere: a unit vector."""
    idx = y.abs().topk(16, dim=1).indices
    vals = torch.where(y.gather(1, idx) >= 0, 0.25, -0.25)
    return torch.zeros_like(y).scatter_(1, idx, vals)


def _run(backend: Backend, base: Problem, weights: torch.Tensor):
    """``backend``'s output on fresh leaves of ``base``, and the gradients of ``Σ w·loss``."""
    p = replace(
        base,
        left=tuple(x.clone().requires_grad_() for x in base.left),
        cands=tuple(x.clone().requires_grad_() for x in base.cands),
    )
    out = backend(p)
    (weights * out.loss.float()).sum().backward()
    return out, [x.grad for x in (*p.left, *p.cands)]


def compare(got, expected, loss_tol: float, tol: float) -> str | None:
    """The first difference between two ``(output, gradients)`` of :func:`_run`, or None."""
    (out, grads), (ref, ref_grads) = got, expected
    if out.loss.shape != ref.loss.shape:
        return f"loss has shape {tuple(out.loss.shape)}, expected {tuple(ref.loss.shape)}"
    reason = _differs("loss", out.loss, ref.loss, loss_tol)
    if reason:
        return reason
    if out.masked.shape != ref.masked.shape or not torch.equal(out.masked.cpu(), ref.masked.cpu()):
        rows = (out.masked.cpu() != ref.masked.cpu()).any(1).sum().item()
        return f"masked counts differ from the reference in {rows} of {ref.masked.shape[0]} rows"
    names = ["anchor rows", "positive rows"] + [f"candidates {j}" for j in range(len(grads) - 2)]
    for name, g, g_ref in zip(names, grads, ref_grads):
        if g is None:
            return f"no gradient reached the {name}"
        reason = _differs(f"gradient of the {name}", g, g_ref, tol)
        if reason:
            return reason
    return None


def _differs(what: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str | None:
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    if actual.shape != expected.shape:
        return f"{what} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if not torch.isfinite(actual).all():
        return f"{what} is not finite"
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    if err > tol * scale:
        return f"{what} differs from the reference by {err:.3g} (allowed {tol * scale:.3g})"
    return None


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def probe_isolated(
    backend: str, device: torch.device | str, dtype: torch.dtype, *, dim: int = 64,
    timeout_s: float = 300.0,
) -> str | None:  # fmt: skip
    """:func:`probe` of the tiled backend named ``backend`` (``"triton"``, ``"chunked"``; a
    fresh process knows no registered kernel) in a new Python process with this one's
    environment. A crash, a fault or a hang of the kernel costs that process only: it is then
    the reason (``"the check's process exited with code -11: ..."``, ``"... did not finish in
    300 s"``)."""
    root = str(Path(__file__).resolve().parents[2])  # the folder gist_ray is imported from
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    name = str(dtype).removeprefix("torch.")
    code = "from gist_ray.loss.probe import _main; _main()"
    cmd = [sys.executable, "-c", code, backend, str(device), name, str(dim)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return f"the check's process did not finish in {timeout_s:g} s"
    out = done.stdout.strip().splitlines()
    if done.returncode == 0 and out:
        return json.loads(out[-1])["reason"]
    err = done.stderr.strip().splitlines()
    text = f"the check's process exited with code {done.returncode}" + (
        f": {err[-1]}" if err else ""
    )
    return text if len(text) <= 300 else text[:297] + "..."


def _main() -> None:
    """``python -c ... BACKEND DEVICE DTYPE DIM``: print ``{"reason": ...}`` (probe_isolated)."""
    backend, device, dtype, dim = sys.argv[1:5]
    fn = functools.partial(tiled_backend, backend=backend)
    print(json.dumps({"reason": probe(fn, device, getattr(torch, dtype), dim=int(dim))}))
