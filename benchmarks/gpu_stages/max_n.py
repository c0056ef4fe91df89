"""Stage 5: the largest N (candidates per segment, 4 segments) whose forward + backward at b
query rows (default 8,192) gives a finite loss and finite gradients, within the stage's time.

N doubles from --n-start until a size fails (out of memory, non-finite values, wrong values or
a CUDA error) or --n-cap, then bisects between the last success and the first failure while time
is left. Each success is also spot-checked: the loss of the first and last 4 query rows against
a float32 computation of those rows alone (chunked over the candidates), which catches what
finiteness cannot (e.g. 32-bit offset overflow at large N). Target: N >= 2,000,000 on 80 GB.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from gpu_stages.common import Ctx, big_problem, finite_sum, free, leaves, sync, triton_rows

SPOT_ROWS = 4
TOL_BF16 = 5e-2


def spot_loss(p, rows: slice, chunk: int = 1 << 18) -> torch.Tensor:
    """float32 loss of query rows ``rows`` alone (``p.offset`` 0): every segment's candidates
    in chunks, masked log-sum-exp minus the positive's logit."""
    sub = replace(
        p,
        left=tuple(x[rows].detach() for x in p.left),
        guide_left=tuple(x[rows] for x in p.guide_left),
        offset=rows.start,
    )
    idx = torch.arange(sub.rows, device=sub.left[0].device)
    cols = sub.offset + idx

    def cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.float(), y.float()
        return (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1))

    gl, gc = sub.guide_left[sub.ap.left], sub.guide_cands[sub.ap.cand]
    t = cos(gl, gc[cols]).diagonal()
    pos = (sub.left[sub.ap.left].float() * sub.cands[sub.ap.cand][cols].float()).sum(1)
    lses = []
    for seg in sub.segments:
        L, GL = sub.left[seg.left], sub.guide_left[seg.left]
        C, GC = sub.cands[seg.cand], sub.guide_cands[seg.cand]
        for lo in range(0, C.shape[0], chunk):
            s = (L.float() @ C[lo : lo + chunk].detach().float().T) / sub.temperature
            drop = cos(GL, GC[lo : lo + chunk]) > (t - sub.margin)[:, None]
            hit = (cols >= lo) & (cols < lo + s.shape[1])
            if seg.diag and hit.any():
                r = idx[hit]
                drop[r, cols[hit] - lo] = seg.diag == 2
            lses.append(torch.logsumexp(s.masked_fill_(drop, -math.inf), 1))
    return torch.logsumexp(torch.stack(lses, 1), 1) - pos / sub.temperature


def trial(ctx: Ctx, n: int) -> dict:
    a = ctx.args
    b = a.b
    sync()
    t0 = time.perf_counter()
    try:
        p = big_problem(b, n, a.d, a.d_guide, ctx.dev)
        loss = triton_rows(p).loss
        loss.mean().backward()
        sync()
        secs = time.perf_counter() - t0
        if not finite_sum(loss) or not all(finite_sum(x.grad) for x in leaves(p)):
            return {"n": n, "fits": False, "why": "non-finite loss or gradient"}
        for x in leaves(p):
            x.grad = None
        worst = 0.0
        for rows in (slice(0, SPOT_ROWS), slice(b - SPOT_ROWS, b)):
            want = spot_loss(p, rows)
            got = loss[rows].detach()
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1)))
        if worst > TOL_BF16:
            return {"n": n, "fits": False, "why": f"wrong loss rows (rel err {worst:.3g})",
                    "s": round(secs, 2)}  # fmt: skip
        return {"n": n, "fits": True, "s": round(secs, 2), "spot_rel_err": round(worst, 5)}
    except torch.OutOfMemoryError:
        return {"n": n, "fits": False, "why": "out of memory"}
    finally:
        free()


def run(ctx: Ctx) -> None:
    a = ctx.args

    def search() -> dict:
        tried, good, bad, n = [], 0, None, a.n_start
        error = None
        while bad is None and n <= a.n_cap and ctx.left() > 0:
            try:
                r = trial(ctx, n)
            except Exception as e:  # a CUDA error poisons the process: stop searching
                r = {"n": n, "fits": False, "why": f"{type(e).__name__}: {e}"[:400]}
                error = r["why"]
            tried.append(r)
            ctx.put("tried", tried)
            good, bad, n = (n, None, 2 * n) if r["fits"] else (good, n, n)
            if error:
                break
        while bad is not None and not error and bad - good > max(good // 16, 64):
            if ctx.left() < 2 * max((t.get("s", 0) for t in tried), default=0) + 5:
                break
            mid = (good + bad) // 2 // 64 * 64
            r = trial(ctx, mid)
            tried.append(r)
            ctx.put("tried", tried)
            good, bad = (mid, bad) if r["fits"] else (good, mid)
        stopped = "failure" if bad is not None else "cap" if n > a.n_cap else "time"
        total = torch.cuda.get_device_properties(0).total_memory if ctx.dev == "cuda" else 0
        assert good > 0, f"no N fitted: {tried}"
        return {
            "b": a.b,
            "d": a.d,
            "d_g": a.d_guide,
            "segments": 4,
            "largest_n_fit": good,
            "first_n_failed": bad,
            "stopped_by": stopped,
            "device_gib": round(total / 2**30, 1),
            "cuda_error": error,
            "tried": tried,
        }

    ctx.case("largest N at b", search)
