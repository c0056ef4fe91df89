"""The compile gate (kernels/compile_check.py): every kernel variant the launchers can pick
compiles for sm_90a and sm_80 without a GPU, the 16-bit ones (hardness-weighted forwards
included) spill nothing, the backward stores its P tile with vector stores, and shared memory
fits. Compiling needs a process without ``TRITON_INTERPRET`` (this one has it set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gist_ray.kernels import compile_check
from gist_ray.kernels.gist_function import PLANS, plan_for

ROOT = Path(__file__).resolve().parents[2]
ARCH_MAJOR = {"sm_90a": 9, "sm_80": 8}


def test_variant_table_is_what_the_launchers_pick():
    """The gate's table is exactly plan_for's choice on each gated architecture, for every
    dtype and kernel; and plan_for never picks a plan that does not fit the device."""
    gated = compile_check.variants(["sm_90a", "sm_80"])
    table = {(v.plan, v.arch, v.dtype, v.kernel) for v in gated}
    expected = set()
    for arch, major in ARCH_MAJOR.items():
        for dtype, itemsize in compile_check.ITEMSIZE.items():
            plan = plan_for(itemsize, major, compile_check.SMEM_LIMIT[arch])
            expected |= {(plan.name, arch, dtype, k) for k in compile_check.KERNELS}
    assert table == expected
    for plan in PLANS.values():
        with pytest.raises(RuntimeError, match="no GIST tile plan"):
            plan_for(2 if "16bit" in plan.name else 4, 9, plan.smem - 1)
    assert plan_for(2, 12, 99 * 1024).name == "sm80-16bit"  # a newer GPU with less smem
    assert plan_for(2, 10, 227 * 1024).name == "sm90-16bit"


def _gate(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the gate in a process without TRITON_INTERPRET; its return and variant records."""
    out = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "gist_ray.kernels.compile_check", *args, "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000,
    )  # fmt: skip
    print(proc.stdout[-6000:])
    return proc, json.loads(out.read_text())["variants"]


def _check_stores(v: dict) -> None:
    """The backward's only global stores are its P tile's: all 16-byte vector stores (P's row
    stride is one multiple of 16 for every chunk; scalar ``st.global.b16`` before)."""
    if KERNELS_P[v["kernel"]]:
        what = f"{v['plan']} {v['kernel']} {v['arch']} {v['dtype']}"
        assert v["scalar_stores"] == 0 and v["vector_stores"] > 0, f"{what}: {v}"


KERNELS_P = {k: name == "gist_prob_kernel" for k, (name, _, _) in compile_check.KERNELS.items()}


def test_global_store_count_reads_ptx():
    ptx = """
    @%p1 st.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };
    @%p2 st.global.b16 [ %rd2 + 0 ], { %rs1 };
    st.global.b32 [ %rd3 + 0 ], %r5;
    @%p3 st.global.v2.b32 [ %rd4 + 0 ], { %r6, %r7 };
    ld.global.v4.b32 { %r8, %r9, %r10, %r11 }, [ %rd5 + 0 ];
    """
    assert compile_check.global_stores(ptx) == (2, 2)


def test_backward_stores_vectorise_and_hard_forwards_fit(tmp_path):
    """The gate on the variants these two properties are about (bf16, both architectures,
    ~30 s): the backward's P stores are vector stores, and the hardness-weighted and
    bit-loading forwards spill nothing (on sm_90a with Triton 3.9, 296 / 220 B before the
    hardness branch became one select; with 3.6, 224 B in ``fwd_load`` before the widths that
    load the bits stopped counting the mask)."""
    kernels = ("bwd", "bwd_recompute", "fwd_hard", "fwd_load", "fwd_load_hard")
    proc, variants = _gate(tmp_path, "--arch", "sm_90a", "--arch", "sm_80", "--dtype", "bf16",
                           *(a for k in kernels for a in ("--kernel", k)))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {v["kernel"] for v in variants} == set(kernels) and len(variants) == 10
    for v in variants:
        assert not v["error"], v
        _check_stores(v)
        assert v["spill_stores"] == v["spill_loads"] == 0, v


@pytest.mark.slow
def test_every_variant_compiles_without_spills(tmp_path):
    """48 variants, 2-4 minutes on 2 cores (more on a loaded machine)."""
    proc, variants = _gate(tmp_path, "--arch", "sm_90a", "--arch", "sm_80")
    assert len(variants) == len(compile_check.variants(["sm_90a", "sm_80"]))
    failed = [(v["plan"], v["kernel"], v["error"]) for v in variants if v["error"]]
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = {p.name: p for p in PLANS.values()}
    for v in variants:
        what = f"{v['plan']} {v['kernel']} {v['arch']} {v['dtype']}"
        if v["dtype"] in ("fp16", "bf16"):  # hardness-weighted forwards included
            assert v["spill_stores"] == 0 and v["spill_loads"] == 0, f"{what} spills"
        _check_stores(v)
        assert v["smem"] <= plans[v["plan"]].smem, f"{what}: {v['smem']} B > the plan's smem"
        assert v["smem"] <= compile_check.SMEM_LIMIT[v["arch"]], f"{what} overflows smem"
