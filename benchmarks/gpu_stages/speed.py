"""Stage 3: speed of the kernels, bf16 and fp32, at b query rows against N candidates per
segment (AP, AA, PP, AN1; defaults b = 8,192, N = 65,536, d = 768, d_g = 1,024), forward +
backward through the custom op.

FLOPs are counted minimally, ``2·b·(4N)·(3d + d_g)`` (student and guide tiles once, dL and dC
once; the backward's recompute of the student tile is not useful work), against a bf16 cuBLAS
rate measured in the same process (target: >= 40 %). Also: host syncs inside the loss (CUDA
sync debug mode set to raise), a torch.profiler table per kernel (``profile_bf16.txt``), and
the registers, spills and shared memory of every GIST kernel as compiled on this machine.
"""

from __future__ import annotations

import time

import torch

from gpu_stages.common import (
    DTYPES,
    Ctx,
    big_problem,
    compiled_kernels,
    free,
    sync,
    time_fwd_bwd,
    triton_rows,
)


def minimal_flops(b: int, n_total: int, d: int, d_g: int) -> float:
    return 2.0 * b * n_total * (3 * d + d_g)


def matmul_tflops(m: int, k: int, n: int, dev: str) -> float:
    """bf16 cuBLAS rate on [m, k] × [k, n] and on a square 8192³ (the better of the two)."""
    best = 0.0
    shapes = ((m, k, n), (8192, 8192, 8192)) if dev == "cuda" else ((m, k, n),)
    for mm, kk, nn in shapes:
        x = torch.randn(mm, kk, device=dev, dtype=torch.bfloat16)
        y = torch.randn(nn, kk, device=dev, dtype=torch.bfloat16)
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


def run(ctx: Ctx) -> None:
    a, dev = ctx.args, ctx.dev
    b, n, d, d_g = a.b, a.n, a.d, a.d_guide
    mm = ctx.case("bf16 matmul rate", lambda: {"tflops": round(matmul_tflops(b, d_g, n, dev), 3)})
    rate_mm = (mm or {}).get("tflops") or None  # no rate: no fraction (JSON has no NaN)
    for name in ("bf16", "fp32"):

        def timed(dtype=DTYPES[name]) -> dict:
            p = big_problem(b, n, d, d_g, dev, dtype)
            t = time_fwd_bwd(triton_rows, p, a.reps)
            rate = minimal_flops(b, 4 * n, d, d_g) / t["total_s"] / 1e12
            frac = round(rate / rate_mm, 3) if rate_mm else None
            return {"b": b, "n_per_segment": n, "segments": 4, "d": d, "d_g": d_g, **t,
                    "tflops_minimal": round(rate, 3), "bf16_matmul_tflops": rate_mm,
                    "fraction_of_matmul": frac}  # fmt: skip

        ctx.case(f"{name} fwd+bwd", timed)
    ctx.case("host syncs bf16", lambda: {"host_syncs": host_syncs(b, n, d, d_g, dev)})
    ctx.case("profile bf16", lambda: profile(ctx, b, n, d, d_g))
    ctx.put("kernels", compiled_kernels())


def host_syncs(b: int, n: int, d: int, d_g: int, dev: str) -> str:
    """Forward + backward with CUDA sync debugging set to raise on any host sync."""
    if dev != "cuda":
        return "n/a on cpu"
    p = big_problem(b, n, d, d_g, dev)
    triton_rows(p).loss.sum().backward()  # compiled already; warm
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_rows(p).loss.sum().backward()
        return "none"
    except RuntimeError as e:
        return f"sync: {str(e)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        del p
        free()


def profile(ctx: Ctx, b: int, n: int, d: int, d_g: int) -> dict:
    """One bf16 forward + backward under torch.profiler: the per-kernel table (device time on
    a GPU, CPU time under the interpreter), saved as profile_bf16.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dev = ctx.dev
    p = big_problem(b, n, d, d_g, dev)
    triton_rows(p).loss.mean().backward()  # warm
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        triton_rows(p).loss.mean().backward()
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=25)
    (ctx.out / "profile_bf16.txt").write_text(table + "\n", encoding="utf-8")
    rows = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:15]
    return {"table_file": "profile_bf16.txt", "sort": key, "top": [
        {"name": e.key[:120], "calls": e.count, "self_us": round(float(getattr(e, key, 0)), 1)}
        for e in rows]}  # fmt: skip
