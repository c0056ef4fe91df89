"""The targets of issue 21 against the measured values, and the one-screen summary, from the
merged results (whatever stages finished). Imports nothing heavy: the driver uses it."""

from __future__ import annotations

TARGET_B, TARGET_N = 8192, 65536


def _case(merged: dict, stage: str, case: str) -> dict:
    return merged.get("stages", {}).get(stage, {}).get("cases", {}).get(case) or {}


def _target(text: str, measured, met: bool | None, applies: bool, at: str) -> dict:
    return {"target": text, "measured": measured, "met": met if applies else None,
            "applies": applies, "at": at}  # fmt: skip


def targets(merged: dict) -> list[dict]:
    gpu = merged.get("header", {}).get("mode") == "gpu"
    out = []
    sp = _case(merged, "speed", "bf16 fwd+bwd")
    frac = sp.get("fraction_of_matmul")
    at = f"b={sp.get('b')}, N={sp.get('n_per_segment')}"
    ok_size = sp.get("b") == TARGET_B and sp.get("n_per_segment") == TARGET_N
    out.append(
        _target(
            ">= 40 % of the measured bf16 matmul rate at b = 8,192, N = 65,536 (bf16)",
            frac,
            None if frac is None else frac >= 0.40,
            gpu and ok_size,
            at,
        )
    )
    ref = _case(merged, "references", "materialised fp32 and bf16 references vs the kernel")
    at = f"b={ref.get('b')}, N={ref.get('n_per_segment')}"
    s32, s16 = ref.get("speedup_vs_fp32"), ref.get("speedup_vs_bf16")
    out.append(
        _target(
            ">= 5x the fp32 materialised reference", s32, None if s32 is None else s32 >= 5, gpu, at
        )
    )
    out.append(
        _target(
            ">= 2x the bf16 materialised reference", s16, None if s16 is None else s16 >= 2, gpu, at
        )
    )
    mx = _case(merged, "max_n", "largest N at b")
    n = mx.get("largest_n_fit")
    gib = mx.get("device_gib") or 0
    out.append(
        _target(
            "N >= 2,000,000 at b = 8,192 on 80 GB",
            n,
            None if n is None else n >= 2_000_000,
            gpu and mx.get("b") == TARGET_B and 75 <= gib <= 100,
            f"b={mx.get('b')}, {gib} GiB, stopped by {mx.get('stopped_by')}",
        )
    )
    dt = _case(merged, "correctness", "dtype training feeds the loss")
    k = dt.get("kernel_input")
    out.append(
        _target(
            "training feeds the kernel bf16 on CUDA (docs/loss.md Precision)",
            k,
            None if k is None else k == "bfloat16",
            gpu,
            f"model returns {dt.get('model_output')}, loss gets {dt.get('loss_input')}",
        )
    )
    return out


def summary_lines(merged: dict) -> list[str]:
    head = merged.get("header", {})
    v = head.get("versions", {})
    dev = merged.get("stages", {}).get("smoke", {}).get("data", {}).get("device", {})
    lines = [f"gpu_check {head.get('mode')}  {head.get('time_utc')}  device "
             f"{dev.get('device', head.get('nvidia_smi'))}  torch {v.get('torch')}  "
             f"triton {v.get('triton')}  elapsed {merged.get('elapsed_s')} s"]  # fmt: skip
    for name, st in merged.get("stages", {}).items():
        cases = st.get("cases", {})
        bad = [c for c, x in cases.items() if not x.get("ok") and not x.get("skipped")]
        skipped = [c for c, x in cases.items() if x.get("skipped")]
        line = f"{name:<12}{st.get('status', '?'):<9}{st.get('wall_s', '-')!s:>6} s  "
        line += f"{len(cases) - len(bad) - len(skipped)}/{len(cases)} cases ok"
        if bad:
            line += "; FAILED: " + ", ".join(bad)
        if skipped:
            line += f"; {len(skipped)} skipped (time)"
        if st.get("error"):
            line += f"; error: {st['error'][:150]}"
        if st.get("heavy_imports"):
            line += f"; imported {st['heavy_imports']}"
        lines.append(line)
    for t in merged.get("targets", []):
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        lines.append(f"target  {t['target']}: {t['measured']} -> {verdict} ({t['at']})")
    return lines
