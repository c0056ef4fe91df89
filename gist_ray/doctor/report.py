"""The doctor's report on screen: the machine, a table of the checks, the speed figure, notes,
and the verdict (``OK`` or one ``FAILED`` line per failed check)."""

from __future__ import annotations

from typing import Any

COLUMNS = ("device", "backend", "plan", "dtype", "loss", "check", "size", "loss err", "grad err",
           "mask", "tol", "result")  # fmt: skip


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.1e}"


def _size(r: dict[str, Any]) -> str:
    if r.get("case") == "all-gather":
        return f"{r.get('processes', '?')}x b={r.get('b', '?')}"
    if "pool" not in r:
        return "-"
    seams = f" ({r['chunks']} chunks" + (f", {r['splits']} splits)" if "splits" in r else ")")
    return f"b={r['b']} pool={r['pool']}" + (seams if r.get("chunks", 1) > 1 else "")


def _row(r: dict[str, Any]) -> tuple[str, ...]:
    mask = r.get("mask_mismatch_rows")
    return (
        r.get("device", "-"), r.get("backend", "-"), r.get("plan", "-"), r.get("dtype", "-"),
        r.get("loss", "-"), r.get("case", "-"), _size(r), _num(r.get("loss_err")),
        _num(r.get("grad_err")), "-" if mask is None else "ok" if mask == 0 else f"{mask} rows",
        _num(r.get("tolerance")), "OK" if r["ok"] else "FAILED",
    )  # fmt: skip


def table(records: list[dict[str, Any]]) -> list[str]:
    rows = [COLUMNS, *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def failures(records: list[dict[str, Any]], where: str = "") -> list[str]:
    """One ``FAILED`` line per failed record (``where``: e.g. the node, put before it)."""
    lines = []
    for r in records:
        if r["ok"]:
            continue
        keys = ("device", "backend", "dtype", "case")
        what = " ".join([where] * bool(where) + [str(r[k]) for k in keys if r.get(k)])
        if "error" in r:
            why = r["error"]
        else:
            over = [f"{name} {r[key]:.2g} > {r['tolerance']:g}"
                    for key, name in (("loss_err", "loss error"), ("grad_err", "gradient error"))
                    if r.get(key) is not None and not r[key] <= r["tolerance"]]  # fmt: skip
            if r.get("mask_mismatch_rows"):
                over.append(f"masked counts differ on {r['mask_mismatch_rows']} rows")
            why = "; ".join(over)
        lines.append(f"FAILED {what}: {why}")
    return lines


def machine_lines(report: dict[str, Any], title: str = "") -> list[str]:
    """The table of one machine (a node of a cluster: ``title`` names it)."""
    v = report["versions"]
    lines = [title or f"gist-ray doctor on {report['host']}"]
    lines.append("  " + ", ".join(f"{k} {v[k] or 'none'}" for k in v))
    for g in report["gpus"]:
        lines.append(f"  GPU {g['index']}: {g['name']}, sm_{g['capability'].replace('.', '')}, "
                     f"{g['memory_gib']} GiB, {g['sms']} SMs")  # fmt: skip
    if not report["gpus"]:
        lines.append("  GPUs: none")
    lines.append("")
    lines += table(report["checks"])
    for s in report.get("speed", []):
        if "error" in s:
            lines.append(f"speed {s['device']}: not measured ({s['error']})")
            continue
        lines.append(
            f"speed {s['device']} (bf16, b={s['b']}, pool={s['pool']} x {s['segments']} segments, "
            f"d={s['d']}, d_g={s['d_g']}): kernel {s['kernel_ms']} ms forward+backward, "
            f"{s['speedup_vs_reference']}x the materialised bf16 reference "
            f"({s['reference_bf16_ms']} ms); {s['kernel_tflops']} TFLOP/s = "
            f"{s['fraction_of_matmul']:.0%} of a bf16 matmul ({s['matmul_bf16_tflops']} TFLOP/s)"
        )
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return lines


def verdict(machines: list[dict[str, Any]]) -> list[str]:
    """The last lines: ``verdict: OK`` or ``verdict: FAILED`` and a line per failed check."""
    cluster = len(machines) > 1 or "node_id" in machines[0]
    failed, total = [], 0
    for m in machines:
        total += len(m["checks"])
        failed += failures(m["checks"], f"node {m['node_ip']}" if cluster else "")
    on = f" on {len(machines)} node{'s' * (len(machines) > 1)}" if cluster else ""
    if not failed:
        return [f"verdict: OK ({total} checks passed{on})"]
    return [f"verdict: FAILED ({len(failed)} of {total} checks failed{on})", *failed]
