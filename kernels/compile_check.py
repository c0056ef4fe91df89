"""Compile gate: compile every kernel variant the launchers can pick, without a GPU.

    python -m gist_ray.kernels.compile_check --arch sm_90a --arch sm_80 --json FILE

The Triton interpreter the tests run on never compiles, so it hides dtype errors, register
spills and shared-memory overflow. Triton compiles for NVIDIA targets on any machine
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``) and its ``ptxas -v``
reports registers, spills and shared memory; this module does that for every variant:

* kernels: forward (storing the mask bits, recomputing them, or loading them: the narrower
  Matryoshka widths), backward (reading them or recomputing the guide tile) and the diagonal
  kernel;
* dtypes: float32, float16, bfloat16 (one dtype for every operand: the launchers refuse mixed
  student/guide dtypes, the front end casts);
* every tile plan of :data:`gist_function.PLANS` on the architecture that picks it
  (:func:`gist_function.plan_for`): the sm90 plans on sm_90a, the sm80 plans on sm_80;
* GEMM operands as the plan passes them: TMA tensor descriptors (sm90 plans) or pointers
  (sm80 plans), with the one specialisation the launchers let the JIT make: operands 16-byte
  aligned, widths and row strides multiples of 16 (``gist_function.aligned`` pads anything
  else); every other pointer and integer argument is marked not to specialise.

Must run without ``TRITON_INTERPRET`` (the tests start it in a subprocess). Exit status 1 if
any variant fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

ARCHS = {"sm_90a": 90, "sm_80": 80}  # GPUTarget capability; sm_90 compiles as sm_90a
SMEM_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}  # opt-in shared memory per block
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
# Kernel variant -> (kernel name, constexpr flags, which of the plan's tile configs it uses).
KERNELS = {
    "fwd": ("gist_fwd_kernel", {"STORE_BITS": True, "LOAD_BITS": False, "HARD": False}, "fwd"),
    "fwd_recompute": (
        "gist_fwd_kernel",
        {"STORE_BITS": False, "LOAD_BITS": False, "HARD": False},
        "fwd",
    ),
    # a narrower Matryoshka width: the mask from the widest width's bits, no guide tile
    "fwd_load": ("gist_fwd_kernel", {"STORE_BITS": False, "LOAD_BITS": True, "HARD": False}, "fwd"),
    # hardness weighting (loss.hardness_alpha > 0): the widest width and a narrower one
    "fwd_hard": ("gist_fwd_kernel", {"STORE_BITS": True, "LOAD_BITS": False, "HARD": True}, "fwd"),
    "fwd_load_hard": (
        "gist_fwd_kernel",
        {"STORE_BITS": False, "LOAD_BITS": True, "HARD": True},
        "fwd",
    ),
    "bwd": ("gist_prob_kernel", {"LOAD_BITS": True}, "bwd"),
    "bwd_recompute": ("gist_prob_kernel", {"LOAD_BITS": False}, "fwd"),
    "diag": ("gist_diag_kernel", {}, "fwd"),
}
PICKABLE = {"sm90": ("sm_90a",), "sm80": ("sm_80",)}  # plan family -> archs (plan_for)
# GEMM operands: under TMA, tensor descriptors with the blocks TileConfig.descriptors gives them.
OPERANDS = {"L": "block_m", "GL": "block_m", "C": "block_n", "GC": "block_n"}
FP32_PTRS = ("RL", "RC", "LIMIT", "POS", "LSE_PART", "T_OUT", "POS_OUT", "LSE", "W")
# 16-byte aligned / multiples of 16 (gist_function.aligned; the backward's P buffer and its row
# stride, gist_function._backward)
ALIGNED = ("L", "GL", "C", "GC", "d", "d_g", "stride_l", "stride_gl", "stride_c", "stride_gc",
           "P", "stride_p")  # fmt: skip


@dataclass
class Variant:
    plan: str
    kernel: str
    arch: str
    dtype: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem: int | None = None
    scalar_stores: int | None = None  # st.global without .v2/.v4 in the PTX
    vector_stores: int | None = None
    compile_s: float | None = None
    error: str | None = None


def variants(archs: list[str]) -> list[Variant]:
    from gist_ray.kernels.gist_function import PLANS

    out = []
    for (itemsize, family), plan in PLANS.items():
        for arch in (a for a in PICKABLE[family] if a in archs):
            for dtype in (d for d in DTYPES if ITEMSIZE[d] == itemsize):
                for kernel, (_, _, which) in KERNELS.items():
                    c = getattr(plan, which)
                    out.append(Variant(
                        plan.name, kernel, arch, dtype, c.block_m, c.block_n, c.block_k,
                        c.num_warps, c.num_stages, plan.tma,
                    ))  # fmt: skip
    return out


def _signature(fn, dtype: str, v: Variant) -> tuple[dict, dict, dict]:
    from gist_ray.kernels.gist_function import FP32_PRECISION

    constexprs = {"BLOCK_M": v.block_m, "BLOCK_N": v.block_n, "BLOCK_K": v.block_k,
                  "BLOCK_KG": v.block_k, "UPCAST": False,
                  "PRECISION": FP32_PRECISION if dtype == "fp32" else "tf32",
                  "TMA": v.tma}  # fmt: skip
    constexprs.update(KERNELS[v.kernel][1])
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in OPERANDS and v.tma:
            rows = getattr(v, OPERANDS[name])
            sig[name] = f"tensordesc<{DTYPES[dtype]}[{rows}, {v.block_k}]>"
            continue  # a descriptor takes no alignment attribute
        elif name in OPERANDS or name == "P":
            sig[name] = f"*{DTYPES[dtype]}"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in ("MASKED_PART", "ABOVE_PART", "BITS"):
            sig[name] = "*i32"
        elif name in ("inv_tau", "hard_off", "hard_diag"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if name in ALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _ptxas(arch: str, ptx: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(ARCHS[arch]).path, "-v", f"--gpu-name={arch}", src, "-o", src + ".o"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def global_stores(ptx: str) -> tuple[int, int]:
    """(scalar, vector) global store instructions of a kernel's PTX: the backward's P tile
    must leave as 16-byte ``st.global.v4`` stores, not one ``st.global.b16`` per entry."""
    ops = re.findall(r"\bst\.global(?:\.[a-z0-9]+)+", ptx)
    vector = sum(".v2." in op or ".v4." in op or ".v8." in op for op in ops)
    return len(ops) - vector, vector


def compile_variant(v: Variant) -> Variant:
    import triton
    from gist_ray.kernels import gist_kernels
    from gist_ray.kernels.gist_function import TileConfig
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = KERNELS[v.kernel][0]
    fn = getattr(gist_kernels, name)
    start = time.perf_counter()
    try:
        sig, constexprs, attrs = _signature(fn, v.dtype, v)
        compiled = triton.compile(
            ASTSource(fn, sig, constexprs, attrs),
            target=GPUTarget("cuda", ARCHS[v.arch], 32),
            options=TileConfig(v.block_m, v.block_n, v.block_k, v.num_warps, v.num_stages).options,
        )
        ptx = compiled.asm["ptx"]
        v.scalar_stores, v.vector_stores = global_stores(ptx)
        log = _ptxas(v.arch, ptx)
        v.registers = int(re.search(r"Used (\d+) registers", log).group(1))
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        v.spill_stores, v.spill_loads = int(spills.group(1)), int(spills.group(2))
        v.smem = int(compiled.metadata.shared)  # Triton's shared memory is all dynamic
    except Exception as e:  # record and go on: the gate reports every failure at once
        v.error = f"{type(e).__name__}: {e}"[:1500]
    v.compile_s = round(time.perf_counter() - start, 2)
    return v


def run(archs: list[str], jobs: int, kernels=None, dtypes=None) -> list[Variant]:
    todo = [v for v in variants(archs) if (not kernels or v.kernel in kernels)
            and (not dtypes or v.dtype in dtypes)]  # fmt: skip
    if jobs <= 1:
        return [compile_variant(v) for v in todo]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_variant, todo))


def summary(results: list[Variant]) -> str:
    lines = [f"{'plan':<12}{'kernel':<14}{'arch':<8}{'dtype':<6}{'tile':<17}"
             f"{'regs':>5}{'spill':>7}{'smem KiB':>9}{'st s/v':>8}{'compile s':>10}"]  # fmt: skip
    for v in results:
        tile = f"{v.block_m}x{v.block_n}x{v.block_k}/{v.num_warps}w{v.num_stages}s"
        if v.error:
            lines.append(f"{v.plan:<12}{v.kernel:<14}{v.arch:<8}{v.dtype:<6}{tile:<17}"
                         f"  ERROR {v.error.splitlines()[0][:80]}")  # fmt: skip
            continue
        lines.append(
            f"{v.plan:<12}{v.kernel:<14}{v.arch:<8}{v.dtype:<6}{tile:<17}{v.registers:>5}"
            f"{v.spill_stores:>7}{v.smem / 1024:>9.1f}"
            f"{f'{v.scalar_stores}/{v.vector_stores}':>8}{v.compile_s:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", choices=list(ARCHS), help="repeatable")
    ap.add_argument("--json", help="write every variant's record here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--kernel", action="append", choices=list(KERNELS), help="only these")
    ap.add_argument("--dtype", action="append", choices=list(DTYPES), help="only these")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter never compiles)")
        return 2
    archs = args.arch or list(ARCHS)
    start = time.perf_counter()
    results = run(archs, args.jobs, args.kernel, args.dtype)
    elapsed = time.perf_counter() - start
    print(summary(results))
    failed = [v for v in results if v.error]
    print(f"{len(results)} variants, {len(failed)} failed, {elapsed:.0f} s with {args.jobs} jobs")
    if args.json:
        record = {"archs": archs, "elapsed_s": round(elapsed, 1), "jobs": args.jobs,
                  "variants": [asdict(v) for v in results]}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
