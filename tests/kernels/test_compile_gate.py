"""The compile gate (kernels/compile_check.py): every kernel variant the launchers can pick
compiles for sm_90a and sm_80 without a GPU, the 16-bit ones spill nothing, and shared memory
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


@pytest.mark.slow
def test_every_variant_compiles_without_spills(tmp_path):
    """~30 variants, 1-3 minutes on 2 cores (more on a loaded machine)."""
    out = tmp_path / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "gist_ray.kernels.compile_check", "--arch", "sm_90a", "--arch",
         "sm_80", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000,
    )  # fmt: skip
    print(proc.stdout[-6000:])
    record = json.loads(out.read_text())
    variants = record["variants"]
    assert len(variants) == len(compile_check.variants(["sm_90a", "sm_80"]))
    failed = [(v["plan"], v["kernel"], v["error"]) for v in variants if v["error"]]
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = {p.name: p for p in PLANS.values()}
    for v in variants:
        what = f"{v['plan']} {v['kernel']} {v['arch']} {v['dtype']}"
        # The hardness-weighted forward (loss.hardness_alpha > 0) is a variant of its own and
        # may spill (benchmarks/RESULTS.md); every other 16-bit variant must not.
        if v["dtype"] in ("fp16", "bf16") and not v["kernel"].endswith("_hard"):
            assert v["spill_stores"] == 0 and v["spill_loads"] == 0, f"{what} spills"
        assert v["smem"] <= plans[v["plan"]].smem, f"{what}: {v['smem']} B > the plan's smem"
        assert v["smem"] <= compile_check.SMEM_LIMIT[v["arch"]], f"{what} overflows smem"
