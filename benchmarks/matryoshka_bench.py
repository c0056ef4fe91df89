"""Cost of Matryoshka widths: forward+backward time and peak extra memory of the loss alone.

    python benchmarks/matryoshka_bench.py --b 1024 --dims 384 256 128 64 32 --rounds 2 \
        --out benchmarks/matryoshka_cpu.json

Three ways, side by side, each run in a fresh subprocess on the same inputs (b = N rows, one
negative column, d = 384 student, d_g = 768 guide; helpers and the memory measurement of
benchmarks/loss_bench.py):

* ``one``: the plain GIST loss at the full width (what training without Matryoshka costs);
* ``mrl``: ``gist_loss(..., matryoshka_dims=dims)``: every width's loss, one guide mask;
* ``naive``: the sum of ``len(dims)`` independent ``gist_loss`` calls on the truncated student,
  each computing its own guide mask: what sentence-transformers' ``MatryoshkaLoss`` wrapped
  around ``GISTEmbedLoss`` does (it reruns the whole inner loss, guide included, per width),
  here with the same backend, so that the difference is the shared mask alone;
* ``st`` (``--with-st``): sentence-transformers' own ``MatryoshkaLoss(GISTEmbedLoss)``
  arithmetic on the same embeddings (its GISTEmbedLoss.forward once per truncated width);
  it materialises ``b × N × d`` products, so only small b fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_bench import (  # noqa: E402
    _peak,
    _reset_peak,
    kernels_shim,
    machine,
    make_inputs,
    st_gist_loss,
    worker_json,
)

MODES = ("one", "mrl", "naive", "st")


def _loss(mode: str, leaves, guide, args):
    from gist_ray.loss import gist_loss

    kw = {"temperature": args.temperature, "backend": args.backend}
    if mode == "one":
        return gist_loss(leaves[0], leaves[1], guide[0], guide[1], leaves[2:], guide[2:], **kw)
    if mode == "mrl":
        return gist_loss(leaves[0], leaves[1], guide[0], guide[1], leaves[2:], guide[2:],
                         matryoshka_dims=args.dims, **kw)  # fmt: skip
    total = 0.0
    for w in args.dims:
        x = [t[:, :w] for t in leaves]
        if mode == "naive":
            total = total + gist_loss(x[0], x[1], guide[0], guide[1], x[2:], guide[2:], **kw)
        else:  # st: its cosine similarity normalises the truncated rows itself
            total = total + st_gist_loss(x, guide, args.temperature, 0.0)
    return total


def run_one(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    kernels_shim()
    student, guide = make_inputs(args.b, args.d, args.d_guide, args.negatives, torch.float32,
                                 torch.device("cpu"))  # fmt: skip
    leaves = [x.requires_grad_() for x in student]
    tiny = [x[:8].detach().clone().requires_grad_() for x in leaves]  # one-time op imports
    _loss("one", tiny, [g[:8] for g in guide], args).backward()
    times, cpus, peaks = [], [], []
    for _ in range(args.repeats):
        for x in leaves:
            x.grad = None
        base = _reset_peak(torch.device("cpu"))
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = _loss(args.worker, leaves, guide, args)
        loss.backward()
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
        peaks.append(_peak(torch.device("cpu")) - base)
    grad_norm = float(sum(x.grad.double().norm() ** 2 for x in leaves) ** 0.5)
    return {"time_s": min(times), "cpu_s": min(cpus), "peak_mib": max(peaks),
            "loss": float(loss), "grad_norm": grad_norm}  # fmt: skip


FLAGS = ("b", "d", "d_guide", "negatives", "threads", "repeats", "temperature", "backend")


def _measure(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--dims", *map(str, args.dims)]
    return worker_json(cmd, args, FLAGS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--b", type=int, default=1024, help="rows = pool size N")
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 256, 128, 64, 32])
    ap.add_argument("--d", type=int, default=384, help="student dim")
    ap.add_argument("--d-guide", type=int, default=768, help="guide dim")
    ap.add_argument("--negatives", type=int, default=1)
    ap.add_argument("--backend", default="chunked", choices=["chunked", "reference"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved fresh-process runs")
    ap.add_argument("--repeats", type=int, default=1, help="runs inside one process")
    ap.add_argument("--temperature", type=float, default=0.01)
    ap.add_argument("--with-st", action="store_true", help="also sentence-transformers' own")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(args)))
        return
    modes = [m for m in MODES if m != "st" or args.with_st]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):  # interleaved: a burst of load does not hit one mode only
        for mode in modes:
            runs[mode].append(_measure(args, mode))
    print(f"b = N = {args.b}, d = {args.d}, d_g = {args.d_guide}, k = {args.negatives}, "
          f"widths {args.dims}, backend {args.backend}")  # fmt: skip
    print(f"{'mode':>6} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9} {'cpu ÷ one':>9} "
          f"{'loss':>9} {'|grad|':>9}")  # fmt: skip
    rows, one = [], None
    for mode in modes:
        ok = [r for r in runs[mode] if "skipped" not in r]
        if not ok:
            rows.append({"mode": mode, "skipped": runs[mode][0]["skipped"]})
            print(f"{mode:>6}  failed: {runs[mode][0]['skipped']}")
            continue
        row = {"mode": mode, "time_s": min(r["time_s"] for r in ok),
               "cpu_s": min(r["cpu_s"] for r in ok), "peak_mib": max(r["peak_mib"] for r in ok),
               "loss": ok[-1]["loss"], "grad_norm": ok[-1]["grad_norm"],
               "rounds": len(ok)}  # fmt: skip
        one = one or row
        row["cpu_vs_one"] = row["cpu_s"] / one["cpu_s"]
        rows.append(row)
        print(
            f"{mode:>6} {row['time_s']:>8.2f} {row['cpu_s']:>8.2f} {row['peak_mib']:>9.1f} "
            f"{row['cpu_vs_one']:>9.2f} {row['loss']:>9.4f} {row['grad_norm']:>9.4f}"
        )
    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    result = {"machine": machine(argparse.Namespace(threads=args.threads, device="cpu")),
              "config": config, "results": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
