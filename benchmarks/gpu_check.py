"""One short GPU check of the Triton GIST kernel: correctness, speed, size. Prints a JSON summary.

    timeout 300 python benchmarks/gpu_check.py --out gpu_check.json   (or benchmarks/gpu_check.sh)

Needs torch and triton only: it imports gist_ray.loss and gist_ray.kernels from this checkout
(no ``pip install`` needed) and checks that neither pulls in Ray, MLflow or datasets.

1. correctness: ``triton`` against ``reference`` on CUDA for fp32 (tl.dot in tf32x3), fp16 and
   bf16, on a gathered-style problem (b < N, column offset, 4 segments, odd d and d_g) and
   through the public ``gist_loss``: lse / loss, masked counts (exact: the guide embeddings are
   dyadic, so guide similarities are exact in any precision), gradients.
2. speed: bf16, b = 8192 query rows against N = 65,536 candidates per segment, segments AP, AA,
   PP, AN1, d = 768, d_g = 1024; TFLOP/s counting 2·b·(4N)·(4d + 2d_g) for forward + backward,
   against a bf16 matmul rate measured in the same run (target: >= 40 %).
3. reference: time at the largest N (same b) it fits, and the speed-up of triton there (>= 5×).
4. size: the largest N (per segment, 4 segments) whose forward + backward fits at b = 8192,
   d = 768 (target: N >= 2,000,000).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_bench import kernels_shim  # noqa: E402  (also puts the repo root on sys.path)

kernels_shim()
from gist_ray.loss import gist_loss  # noqa: E402
from gist_ray.loss.plan import Problem, build_segments  # noqa: E402
from gist_ray.loss.reference import reference_backend  # noqa: E402
from gist_ray.loss.triton_backend import triton_backend  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}
START = time.perf_counter()
# "cpu" only for --smoke (a dry run of this script under TRITON_INTERPRET=1, tiny sizes).
DEV = "cuda"
OOM = torch.cuda.OutOfMemoryError


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def elapsed() -> float:
    return time.perf_counter() - START


def dyadic(x: torch.Tensor) -> torch.Tensor:
    """16 entries of ±1/4 at the largest |x|: unit vectors with exact dot products."""
    idx = x.abs().topk(16, dim=1).indices
    vals = torch.where(x.gather(1, idx) >= 0, 0.25, -0.25).to(x.dtype)
    return torch.zeros_like(x).scatter_(1, idx, vals)


def small_problem(dtype, b=300, world=4, rank=2, k=1, d=200, d_g=300, margin=0.05) -> Problem:
    """A gathered-style problem: local rows ``rank*b ..`` of a pool of ``world*b``."""
    n, dev = world * b, DEV
    g = torch.Generator(device=dev).manual_seed(0)
    topics = torch.randn(n // 8, d, device=dev, generator=g)

    def sample():
        pick = torch.randint(topics.shape[0], (n,), device=dev, generator=g)
        return topics[pick] + 0.6 * torch.randn(n, d, device=dev, generator=g)

    a = sample()
    student = [a, a + torch.randn(n, d, device=dev, generator=g)] + [sample() for _ in range(k)]
    proj = torch.randn(d, d_g, device=dev, generator=g)
    guide = [
        dyadic(x @ proj + 0.8 * d**0.5 * torch.randn(n, d_g, device=dev, generator=g))
        for x in student
    ]
    student = [F.normalize(x, dim=-1).to(dtype) for x in student]
    guide = [x.to(dtype) for x in guide]
    loc = slice(rank * b, (rank + 1) * b)
    segs = build_segments(b, n, k, True, True)
    pool = {"ap": 1, "aa": 0, "pp": 1} | {f"an{j + 1}": 2 + j for j in range(k)}
    return Problem(
        left=torch.cat([student[0][loc], student[1][loc]]),
        guide_left=torch.cat([guide[0][loc], guide[1][loc]]),
        cand=torch.cat([student[pool[s.name]] for s in segs]),
        guide_cand=torch.cat([guide[pool[s.name]] for s in segs]),
        threshold=(guide[0][loc].float() * guide[1][loc].float()).sum(-1),
        pos_logit=(student[0][loc].float() * student[1][loc].float()).sum(-1) / 0.01,
        segments=segs, offset=rank * b, temperature=0.01, margin=margin, strategy="absolute",
    )  # fmt: skip


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def check_problem(name: str, dtype_name: str, **kw) -> dict:
    base = small_problem(DTYPES[dtype_name], **kw)
    w = torch.randn(base.rows, device=DEV)
    res = {}
    for key, fn in (("ref", reference_backend), ("tri", triton_backend)):
        p = replace(
            base, left=base.left.clone().requires_grad_(), cand=base.cand.clone().requires_grad_()
        )
        out = fn(p)
        (w * out.lse).sum().backward()
        res[key] = (out, p.left.grad, p.cand.grad)
    (ro, rl, rc), (to, tl_, tc) = res["ref"], res["tri"]
    r = {
        "case": name,
        "dtype": dtype_name,
        "lse_max_abs": (to.lse - ro.lse).abs().max().item(),
        "masked_mismatches": int((to.masked != ro.masked).sum().item()),
        "above_max_diff": int((to.above - ro.above).abs().max().item()),
        "dleft_rel": rel_err(tl_, rl),
        "dcand_rel": rel_err(tc, rc),
        "finite": bool(
            torch.isfinite(to.lse).all() and torch.isfinite(tl_).all() and torch.isfinite(tc).all()
        ),
    }
    tol = TOL[dtype_name]
    r["ok"] = bool(
        r["finite"] and r["lse_max_abs"] < tol * 10 and r["masked_mismatches"] == 0
        and r["dleft_rel"] < tol and r["dcand_rel"] < tol and r["above_max_diff"] <= 1
    )  # fmt: skip
    return r


def check_front_end(dtype_name: str, b=257, d=384, d_g=768) -> dict:
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device=DEV).manual_seed(1)
    emb = [torch.randn(b, d, device=DEV, generator=g) for _ in range(3)]
    emb[1] = emb[0] + emb[1]
    guide = [dyadic(torch.randn(b, d_g, device=DEV, generator=g)) for _ in range(3)]
    guide[1] = dyadic(guide[0] + 0.5 * guide[1])
    out = {}
    for backend in ("reference", "triton"):
        leaves = [x.to(dtype).clone().requires_grad_() for x in emb]
        loss, stats = gist_loss(
            leaves[0], leaves[1], guide[0].to(dtype), guide[1].to(dtype), [leaves[2]],
            [guide[2].to(dtype)], margin=0.05, backend=backend, return_stats=True,
        )  # fmt: skip
        loss.backward()
        out[backend] = (loss.item(), stats, [x.grad for x in leaves])
    (rl, rs, rg), (tl_, ts, tg) = out["reference"], out["triton"]
    r = {
        "case": "gist_loss",
        "dtype": dtype_name,
        "loss_ref": rl,
        "loss_triton": tl_,
        "mask_frac_equal": all(rs[k] == ts[k] for k in rs if k.startswith("mask_frac")),
        "grad_rel": max(rel_err(x, y) for x, y in zip(tg, rg)),
    }
    r["ok"] = bool(
        abs(rl - tl_) <= TOL[dtype_name] * max(1, abs(rl))
        and r["mask_frac_equal"]
        and r["grad_rel"] < TOL[dtype_name]
    )
    return r


def big_problem(b: int, n: int, d: int, d_g: int, dtype=torch.bfloat16) -> Problem:
    """Random unit embeddings, 4 segments (AP, AA, PP, AN1) of n columns, built in place."""

    def unit(rows: int, dim: int) -> torch.Tensor:
        x = torch.randn(rows, dim, device=DEV, dtype=dtype)
        return x.div_(x.float().norm(dim=1, keepdim=True).to(dtype))

    segs = build_segments(b, n, 1, True, True)
    cand, guide_cand = unit(4 * n, d), unit(4 * n, d_g)
    left, guide_left = unit(2 * b, d), unit(2 * b, d_g)
    return Problem(
        left=left.requires_grad_(), guide_left=guide_left, cand=cand.requires_grad_(),
        guide_cand=guide_cand,
        threshold=(guide_left[:b].float() * guide_cand[:b].float()).sum(-1),
        pos_logit=(left[:b].detach().float() * cand[:b].detach().float()).sum(-1) / 0.01,
        segments=segs, offset=0, temperature=0.01, margin=0.0, strategy="absolute",
    )  # fmt: skip


def time_fwd_bwd(fn, p: Problem, reps: int) -> dict:
    def once() -> tuple[float, float]:
        p.left.grad = p.cand.grad = None
        sync()
        t0 = time.perf_counter()
        loss = (fn(p).lse - p.pos_logit).mean()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1

    once()  # warm-up: compilation and autotuning
    runs = sorted((once() for _ in range(reps)), key=sum)
    fwd, bwd = runs[len(runs) // 2]
    return {"fwd_s": fwd, "bwd_s": bwd, "total_s": fwd + bwd}


def matmul_rate(d: int, n: int, b: int) -> float:
    """bf16 TFLOP/s of cuBLAS on the kernel's shapes ([b, d] × [d, n]) and on a square 8192³."""
    best = 0.0
    for m, k, nn in ((b, d, n), (8192, 8192, 8192) if DEV == "cuda" else (b, d, n)):
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        y = torch.randn(nn, k, device=DEV, dtype=torch.bfloat16)
        for _ in range(3):
            x @ y.T
        sync()
        t = time.perf_counter()
        for _ in range(10):
            x @ y.T
        sync()
        best = max(best, 2 * m * k * nn * 10 / (time.perf_counter() - t) / 1e12)
        del x, y
    return best


def flops(b: int, n: int, d: int, d_g: int) -> float:
    return 2.0 * b * (4 * n) * (4 * d + 2 * d_g)


def _free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def fits(b: int, n: int, d: int, d_g: int) -> tuple[bool, float]:
    """Does one triton forward + backward fit? Returns (fits, seconds)."""

    def once() -> float:
        p = big_problem(b, n, d, d_g)
        sync()
        t = time.perf_counter()
        (triton_backend(p).lse - p.pos_logit).mean().backward()
        sync()
        return time.perf_counter() - t

    result = (False, 0.0)
    try:
        result = (True, once())
    except OOM:
        pass
    _free()  # after the except clause: its traceback no longer pins the tensors
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=8192)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--d-guide", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=240, help="skip stages after this")
    ap.add_argument("--n-cap", type=int, default=1 << 24, help="stop the size search here")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run (TRITON_INTERPRET=1)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        args.b, args.n, args.d, args.d_guide, args.reps, args.n_cap = 40, 96, 40, 48, 1, 192
    b, n, d, d_g = args.b, args.n, args.d, args.d_guide
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)"
    summary: dict = {"device": name, "torch": torch.__version__}
    import triton

    summary["triton"] = triton.__version__
    summary["heavy_imports"] = [m for m in ("ray", "mlflow", "datasets") if m in sys.modules]

    def stage(name, fn):
        if elapsed() > args.budget_s:
            summary[name] = "skipped: time budget"
        else:
            try:
                summary[name] = fn()
            except Exception as e:  # report and go on: one JSON with whatever worked
                summary[name] = f"error: {type(e).__name__}: {e}"[:2000]
        print(f"[{elapsed():6.1f}s] {name}: {json.dumps(summary[name])}", flush=True)

    small = {"b": 30, "d": 40, "d_g": 48} if args.smoke else {}

    def correctness():
        rows = [check_problem("gathered b of 4b, rank 2", x, **small) for x in DTYPES]
        rows += [check_front_end(x, **small) for x in DTYPES]
        return {"ok": all(r["ok"] for r in rows), "cases": rows}

    stage("correctness", correctness)

    def speed():
        mm = matmul_rate(d_g, n, b)
        p = big_problem(b, n, d, d_g)
        t = time_fwd_bwd(triton_backend, p, args.reps)
        rate = flops(b, n, d, d_g) / t["total_s"] / 1e12
        return {"b": b, "n_per_segment": n, "d": d, "d_g": d_g, **t, "tflops": rate,
                "bf16_matmul_tflops": mm, "fraction_of_matmul": rate / mm,
                "target_met": rate / mm >= 0.40}  # fmt: skip

    stage("speed", speed)
    stage(
        "correctness_tuned_shape",
        # b × segment columns >= AUTOTUNE_MIN_WORK: the autotuned tiles of the speed stage.
        lambda: check_problem(
            "autotuned tiles",
            "bf16",
            b=40 if args.smoke else 2048,
            world=2 if args.smoke else 16,
            rank=1 if args.smoke else 5,
            d=d,
            d_g=d_g,
        ),  # fmt: skip
    )

    def reference():
        def compare(nn: int) -> dict:
            p = big_problem(b, nn, d, d_g)
            ref = time_fwd_bwd(reference_backend, p, 2)
            tri = time_fwd_bwd(triton_backend, p, 2)
            speedup = ref["total_s"] / tri["total_s"]
            return {"n_per_segment": nn, "reference_s": ref["total_s"],
                    "triton_s": tri["total_s"], "speedup": speedup,
                    "target_met": speedup >= 5}  # fmt: skip

        for nn in (n, n // 2, n // 4, n // 8, n // 16):
            result = None
            try:
                result = compare(nn)
            except OOM:
                pass
            _free()
            if result is not None:
                return result
        return "reference did not fit at any tried size"

    stage("reference", reference)

    def max_n():
        good, bad, tried = 0, None, []
        nn = n
        while bad is None and elapsed() < args.budget_s and nn <= args.n_cap:
            ok, secs = fits(b, nn, d, d_g)
            tried.append({"n": nn, "fits": ok, "s": round(secs, 3)})
            if ok:
                good, nn = nn, nn * 2
            else:
                bad = nn
        for _ in range(3):  # refine between the last fit and the first miss
            if bad is None or elapsed() > args.budget_s:
                break
            mid = (good + bad) // 2 // 4096 * 4096
            ok, secs = fits(b, mid, d, d_g)
            tried.append({"n": mid, "fits": ok, "s": round(secs, 3)})
            good, bad = (mid, bad) if ok else (good, mid)
        return {"b": b, "d": d, "d_g": d_g, "largest_n_fit": good, "first_n_failed": bad,
                "target_met": good >= 2_000_000, "tried": tried}  # fmt: skip

    stage("max_n", max_n)
    summary["heavy_imports"] = [m for m in ("ray", "mlflow", "datasets") if m in sys.modules]
    summary["elapsed_s"] = elapsed()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
