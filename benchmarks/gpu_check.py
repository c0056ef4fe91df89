"""One short GPU check of the Triton GIST kernels: speed, correctness, references, size.

    timeout 540 python3 benchmarks/gpu_check.py --out gpu_check.json   (or benchmarks/gpu_check.sh)

Needs torch and triton only: it imports gist_ray.loss, gist_ray.kernels and the test harness
(tests/loss/harness.py) from this checkout, no install, and records that neither pulled in Ray,
MLflow or datasets. The JSON is rewritten after every stage, so a kill keeps what finished;
stages are skipped once ``--budget-s`` (default 480 s) is spent. Stages, most important first:

1. speed: bf16, b = 8192 query rows against N = 65,536 candidates per segment, segments AP, AA,
   PP, AN1, d = 768, d_g = 1024, forward + backward through the custom op. FLOPs counted
   minimally: ``2·b·(4N)·(3d + d_g)`` (student and guide tiles once, dL and dC once; the
   backward's recompute of the student tile is not useful work), against a bf16 cuBLAS rate
   measured in the same run (target >= 40 %). Also: any host sync inside the loss
   (``torch.cuda.set_sync_debug_mode("error")``).
2. correctness on CUDA, through the harness the CPU tests use: triton against reference in
   fp32 / fp16 / bf16 (gathered-style problem: b < N, column offset, odd sizes), duplicate-text
   ties (t_i through the same MMA path as g), 16-bit gradients on confident rows against
   float64 (<= 2× the autocast recipe), the backward that recomputes the mask.
3. references: a materialised fp32 implementation and a materialised bf16 one (bf16 GEMMs, fp32
   masked log-sum-exp: what autocast gives) at the largest N both fit, and the speed-up of
   triton there (targets >= 5× fp32, >= 2× bf16).
4. size: the largest N per segment whose forward + backward fits at b = 8192 (target:
   N >= 2,000,000 candidates).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from loss_bench import kernels_shim  # noqa: E402

kernels_shim()
from gist_ray.loss.op import tiled_backend  # noqa: E402
from gist_ray.loss.plan import Problem, build_segments  # noqa: E402

START = time.perf_counter()
DEV = "cuda"  # "cpu" only for --smoke (a dry run under TRITON_INTERPRET=1, tiny sizes)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def elapsed() -> float:
    return time.perf_counter() - START


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def triton_rows(p: Problem):
    return tiled_backend(p, backend="triton")


def big_problem(b: int, n: int, d: int, d_g: int, dtype=torch.bfloat16) -> Problem:
    """Random unit student rows, random guide rows; segments AP, AA, PP, AN1 over 3 distinct
    candidate tensors of n rows (built in place, no copies)."""

    def unit(rows: int, dim: int) -> torch.Tensor:
        x = torch.randn(rows, dim, device=DEV, dtype=dtype)
        return x.div_(x.float().norm(dim=1, keepdim=True).to(dtype))

    segs, sources = build_segments(1, True, True)
    cands = tuple(unit(n, d).requires_grad_() for _ in sources)
    guide_cands = tuple(unit(n, d_g) for _ in sources)
    left = tuple(cands[j][:b].detach().clone().requires_grad_() for j in (1, 0))
    guide_left = (guide_cands[1][:b].clone(), guide_cands[0][:b].clone())
    return Problem(left, cands, guide_left, guide_cands, segs, 0, 0.01, 0.0, "absolute")


def minimal_flops(b: int, n_total: int, d: int, d_g: int) -> float:
    return 2.0 * b * n_total * (3 * d + d_g)


def time_fwd_bwd(fn, p: Problem, reps: int) -> dict:
    def once() -> tuple[float, float]:
        for x in (*p.left, *p.cands):
            x.grad = None
        sync()
        t0 = time.perf_counter()
        loss = fn(p).loss.mean()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1

    once()  # warm-up: compilation
    runs = sorted((once() for _ in range(reps)), key=sum)
    fwd, bwd = runs[len(runs) // 2]
    return {"fwd_s": round(fwd, 4), "bwd_s": round(bwd, 4), "total_s": round(fwd + bwd, 4)}


def matmul_tflops(m: int, k: int, n: int) -> float:
    """bf16 cuBLAS rate on [m, k] × [k, n] and on a square 8192³ (the better of the two)."""
    best = 0.0
    for mm, kk, nn in ((m, k, n), (8192, 8192, 8192)):
        x = torch.randn(mm, kk, device=DEV, dtype=torch.bfloat16)
        y = torch.randn(nn, kk, device=DEV, dtype=torch.bfloat16)
        for _ in range(3):
            x @ y.T
        sync()
        t = time.perf_counter()
        for _ in range(10):
            x @ y.T
        sync()
        best = max(best, 2 * mm * kk * nn * 10 / (time.perf_counter() - t) / 1e12)
        del x, y
    return best


def host_syncs(p: Problem) -> str:
    """Run forward + backward with CUDA sync debugging set to raise on any host sync."""
    if DEV != "cuda":
        return "n/a on cpu"
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_rows(p).loss.sum().backward()
        return "none"
    except RuntimeError as e:
        return f"sync: {str(e)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def materialised(p: Problem, dtype: torch.dtype):
    """What a plain PyTorch user writes: every b × N matrix in ``dtype`` (bf16 GEMMs give bf16
    logits), masks, float32 masked log-sum-exp minus the positive's logit."""
    rows = torch.arange(p.rows, device=p.left[0].device)
    t = None
    scores = []
    for seg in p.segments:
        gl, gc = p.guide_left[seg.left].to(dtype), p.guide_cands[seg.cand].to(dtype)
        g = (gl @ gc.T).float() / (gl.float().norm(dim=1)[:, None] * gc.float().norm(dim=1))
        if t is None:
            t = g[rows, p.offset + rows].clone()
        s = (p.left[seg.left].to(dtype) @ p.cands[seg.cand].to(dtype).T).float() / p.temperature
        drop = g > (t - p.margin)[:, None]
        del g
        if seg.diag == 1:
            drop[rows, p.offset + rows] = False
        if seg.diag == 2:
            drop[rows, p.offset + rows] = True
        scores.append(s.masked_fill_(drop, -math.inf))
    pos = scores[0][rows, p.offset + rows]
    return torch.logsumexp(torch.cat(scores, 1), 1) - pos


class _Rows:
    def __init__(self, loss):
        self.loss = loss


def reference_rows(dtype: torch.dtype):
    return lambda p: _Rows(materialised(p, dtype))


def stage_speed(a) -> dict:
    b, n, d, d_g = a.b, a.n, a.d, a.d_guide
    mm = matmul_tflops(b, d_g, n) if DEV == "cuda" else float("nan")
    p = big_problem(b, n, d, d_g)
    t = time_fwd_bwd(triton_rows, p, a.reps)
    rate = minimal_flops(b, 4 * n, d, d_g) / t["total_s"] / 1e12
    syncs = host_syncs(p)
    del p
    free()
    return {"b": b, "n_per_segment": n, "segments": 4, "d": d, "d_g": d_g, **t,
            "tflops_minimal": round(rate, 1), "bf16_matmul_tflops": round(mm, 1),
            "fraction_of_matmul": round(rate / mm, 3), "target_met": rate / mm >= 0.40,
            "host_syncs": syncs}  # fmt: skip


def stage_correctness(a) -> dict:
    import tests.loss.harness as H

    cases = []
    small = {"b": 30, "d": 40, "d_g": 48} if a.smoke else {"b": 300, "d": 200, "d_g": 300}

    def record(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            out = fn()
            cases.append({"case": name, "ok": True, "s": round(time.perf_counter() - t, 1),
                          **({"errors": out} if isinstance(out, dict) else {})})  # fmt: skip
        except Exception as e:  # report and go on
            cases.append({"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})

    for name, dtype in DTYPES.items():
        case = H.Case(world=4, rank=2, k=1, margin=0.05, dtype=dtype, device=DEV, **small)
        record(f"problem {name}", lambda c=case: H.check_problem(triton_rows, c) and None)
        record(f"front end {name}", lambda c=case: H.check_front_end("triton", c) and None)
    for name in ("bf16", "fp16"):
        record(f"confident rows {name}",
               lambda n=name: H.check_confident_rows("triton", DTYPES[n], DEV))  # fmt: skip
    for name in ("fp32", "bf16"):
        case = H.Case(b=small["b"], world=2, rank=1, k=2, dtype=DTYPES[name], device=DEV)
        record(f"ties {name}", lambda c=case: H.check_ties(triton_rows, c))

    def recompute():
        import gist_ray.loss.plan as plan

        old, plan.MASK_BITS_FRACTION = plan.MASK_BITS_FRACTION, 0.0
        try:
            case = H.Case(world=2, rank=1, k=1, dtype=torch.bfloat16, device=DEV, **small)
            H.check_problem(triton_rows, case)
        finally:
            plan.MASK_BITS_FRACTION = old

    record("backward recomputes the mask", recompute)
    return {"ok": all(c["ok"] for c in cases), "cases": cases}


def stage_references(a) -> dict:
    b, d, d_g = a.b, a.d, a.d_guide
    for n in (a.n, a.n // 2, a.n // 4, a.n // 8, a.n // 16):
        try:
            p32 = big_problem(b, n, d, d_g, torch.float32)
            ref32 = time_fwd_bwd(reference_rows(torch.float32), p32, 1)
            del p32
            free()
            p = big_problem(b, n, d, d_g)
            ref16 = time_fwd_bwd(reference_rows(torch.bfloat16), p, 1)
            tri = time_fwd_bwd(triton_rows, p, 2)
        except torch.OutOfMemoryError:
            free()
            continue
        free()
        s32, s16 = ref32["total_s"] / tri["total_s"], ref16["total_s"] / tri["total_s"]
        return {"b": b, "n_per_segment": n, "fp32_reference_s": ref32["total_s"],
                "bf16_reference_s": ref16["total_s"], "triton_s": tri["total_s"],
                "speedup_vs_fp32": round(s32, 2), "speedup_vs_bf16": round(s16, 2),
                "target_met": s32 >= 5 and s16 >= 2}  # fmt: skip
    return {"error": "no reference fitted"}


def stage_max_n(a) -> dict:
    b, d, d_g = a.b, a.d, a.d_guide

    def fits(n: int) -> tuple[bool, float]:
        ok, secs = False, 0.0
        try:
            p = big_problem(b, n, d, d_g)
            sync()
            t = time.perf_counter()
            triton_rows(p).loss.mean().backward()
            sync()
            ok, secs = True, time.perf_counter() - t
        except torch.OutOfMemoryError:
            pass
        free()  # after the except clause: its traceback no longer pins the tensors
        return ok, secs

    good, bad, tried, n = 0, None, [], a.n_start
    while bad is None and elapsed() < a.budget_s and n <= a.n_cap:
        ok, secs = fits(n)
        tried.append({"n": n, "fits": ok, "s": round(secs, 2)})
        good, bad, n = (n, None, n * 2) if ok else (good, n, n)
    for _ in range(3):  # refine between the last fit and the first miss
        if bad is None or elapsed() > a.budget_s:
            break
        mid = (good + bad) // 2 // 4096 * 4096
        ok, secs = fits(mid)
        tried.append({"n": mid, "fits": ok, "s": round(secs, 2)})
        good, bad = (mid, bad) if ok else (good, mid)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if DEV == "cuda" else 0
    return {"b": b, "d": d, "d_g": d_g, "segments": 4, "largest_n_fit": good,
            "first_n_failed": bad, "device_gib": round(total, 1),
            "target_met": good >= 2_000_000, "tried": tried}  # fmt: skip


def summary_lines(s: dict) -> list[str]:
    head = f"device {s['device']}  torch {s['torch']}  triton {s['triton']}  "
    lines = [head + f"elapsed {s.get('elapsed_s', 0):.0f} s  heavy imports {s['heavy_imports']}"]
    sp = s.get("speed", {})
    if isinstance(sp, dict) and "tflops_minimal" in sp:
        lines.append(f"speed   {sp['tflops_minimal']} TFLOP/s minimal = "
                     f"{sp['fraction_of_matmul']:.0%} of bf16 matmul {sp['bf16_matmul_tflops']}"
                     f" (target 40%: {sp['target_met']})  fwd {sp['fwd_s']} s bwd {sp['bwd_s']}"
                     f" s  host syncs: {sp['host_syncs']}")  # fmt: skip
    c = s.get("correctness", {})
    if isinstance(c, dict) and "cases" in c:
        bad = [x["case"] for x in c["cases"] if not x["ok"]]
        lines.append(f"correct {len(c['cases']) - len(bad)}/{len(c['cases'])} cases ok"
                     + (f"; FAILED: {', '.join(bad)}" if bad else ""))  # fmt: skip
    r = s.get("references", {})
    if isinstance(r, dict) and "speedup_vs_fp32" in r:
        lines.append(f"refs    N={r['n_per_segment']}: {r['speedup_vs_fp32']}× fp32, "
                     f"{r['speedup_vs_bf16']}× bf16 materialised (targets 5×, 2×)")  # fmt: skip
    m = s.get("max_n", {})
    if isinstance(m, dict) and "largest_n_fit" in m:
        lines.append(f"size    largest N per segment at b={m['b']}: {m['largest_n_fit']:,} "
                     f"(×4 segments; target 2,000,000: {m['target_met']})")  # fmt: skip
    for key in ("speed", "correctness", "references", "max_n"):
        if isinstance(s.get(key), str):
            lines.append(f"{key}: {s[key][:200]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--b", type=int, default=8192)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--d-guide", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=480, help="start no stage after this")
    ap.add_argument("--n-start", type=int, default=262144, help="size search: first N")
    ap.add_argument("--n-cap", type=int, default=1 << 23, help="size search: stop here")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run (TRITON_INTERPRET=1)")
    ap.add_argument("--stages", default="speed,correctness,references,max_n",
                    help="comma-separated subset, in this order")  # fmt: skip
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    global DEV
    if a.smoke:
        DEV = "cpu"
        a.b, a.n, a.d, a.d_guide, a.reps, a.n_start, a.n_cap = 40, 96, 40, 48, 1, 64, 256
    import triton

    s: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
               "torch": torch.__version__, "triton": triton.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    stages = [("speed", stage_speed), ("correctness", stage_correctness),
              ("references", stage_references), ("max_n", stage_max_n)]  # fmt: skip
    for name, fn in stages:
        if name not in a.stages.split(","):
            continue
        if elapsed() > a.budget_s:
            s[name] = "skipped: time budget"
        else:
            try:
                s[name] = fn(a)
            except Exception as e:  # report and go on: one JSON with whatever worked
                s[name] = f"error: {type(e).__name__}: {e} | {traceback.format_exc()[-800:]}"
            free()
        s["heavy_imports"] = [m for m in ("ray", "mlflow", "datasets") if m in sys.modules]
        s["elapsed_s"] = round(elapsed(), 1)
        print(f"[{elapsed():6.1f}s] {name}: {json.dumps(s[name])[:600]}", flush=True)
        if a.out:
            a.out.write_text(json.dumps(s, indent=2) + "\n")
    print("\n".join(["", "=" * 100, *summary_lines(s), "=" * 100]))


if __name__ == "__main__":
    main()
