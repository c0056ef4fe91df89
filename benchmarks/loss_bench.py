"""Forward+backward time and peak extra memory of the GIST loss backends.

    python benchmarks/loss_bench.py --sizes 1024 2048 4096 8192 --rounds 2 --out loss_bench.json

For every batch size b (pool N = b, no gather) and every backend (``reference``, ``chunked``,
``triton`` on CUDA, and ``st``: sentence-transformers' installed ``GISTEmbedLoss.forward`` on the
same embeddings) a fresh subprocess builds the inputs, then runs ``loss.backward()`` of
``gist_loss(...)`` once and reports:

* wall time and CPU time (``time.process_time``: on a shared machine the CPU time of a
  single-threaded run is much less sensitive to other jobs than its wall time). ``--rounds``
  repeats every backend in interleaved fresh processes and keeps the minimum.
* peak extra memory. CPU: the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus its resident set just before the call, inputs already built.
  torch's CPU allocator does not cache and large blocks are mmap-ed and unmapped on free, so this
  is what the loss really touches (plus a few MiB of interpreter noise): the memory an
  out-of-memory kill would see. CUDA: ``torch.cuda.max_memory_allocated()`` minus
  ``memory_allocated()`` before the call.

A backend whose estimated peak (see ``estimate_gib``) exceeds ``--mem-limit-gib`` is skipped
with "would need X GiB" rather than run into the OOM killer.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a plain checkout too


def kernels_shim() -> None:
    """Make ``gist_ray.kernels`` this checkout's ``kernels/`` folder without ``pip install``
    (setuptools maps it there; a plain checkout has no such mapping, and an editable install of
    another checkout would otherwise supply its own)."""
    import importlib.util

    import gist_ray

    if Path(gist_ray.__file__).resolve().parent != ROOT / "gist_ray":
        return  # an installed gist_ray: it maps its own kernels
    if "gist_ray.kernels" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "gist_ray.kernels", ROOT / "kernels" / "__init__.py",
        submodule_search_locations=[str(ROOT / "kernels")],
    )  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules["gist_ray.kernels"] = module
    spec.loader.exec_module(module)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BACKENDS = ("reference", "chunked", "triton", "st")


def estimate_gib(backend: str, b: int, n: int, d: int, d_g: int, k: int) -> float:
    """Rough peak extra memory, calibrated on the CPU runs of benchmarks/RESULTS.md. reference:
    about 6 fp32 matrices of b × (total candidates); st: about 8 fp32 b × n × max(d, d_g)
    products on top (its nn.CosineSimilarity broadcasts ``[b, 1, d] * [1, n, d]``); chunked and
    triton: a few tiles plus copies of the embeddings."""
    total = n * (3 + k)
    ref = 6 * b * total * 4
    if backend == "reference":
        return ref / 2**30
    if backend == "st":
        return (ref + 8 * b * n * max(d, d_g) * 4) / 2**30
    return (8 * 2**22 * 4 + 4 * (2 * b + total) * (d + d_g) * 4) / 2**30


def make_inputs(b: int, d: int, d_g: int, k: int, dtype, device, seed: int = 0):
    """Clustered student embeddings (same-topic candidates compete with the positive: loss ~2)
    and a guide that is a noisy random projection of them (some topic mates get masked)."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(max(2, b // 8), d, generator=g)

    def sample() -> torch.Tensor:
        pick = torch.randint(topics.shape[0], (b,), generator=g)
        return topics[pick] + 0.6 * torch.randn(b, d, generator=g)

    a = sample()
    student = [a, a + torch.randn(b, d, generator=g)] + [sample() for _ in range(k)]
    proj = torch.randn(d, d_g, generator=g) / d**0.5
    guide = [x @ proj + 0.8 * torch.randn(b, d_g, generator=g) for x in student]
    return [x.to(device, dtype) for x in student], [x.to(device, dtype) for x in guide]


def st_gist_loss(student, guide, temperature: float, margin: float):
    """sentence-transformers' own ``GISTEmbedLoss.forward`` on precomputed embeddings: the loss
    object is built without models and its ``embed_columns`` step is replaced by a function that
    returns the given embeddings (first call: student, second: guide, as in its forward)."""
    import torch.nn as nn
    from sentence_transformers.sentence_transformer.losses import gist_embed

    loss = object.__new__(gist_embed.GISTEmbedLoss)
    nn.Module.__init__(loss)
    loss.model, loss.guide = "student", "guide"
    loss.temperature, loss.margin, loss.margin_strategy = temperature, margin, "absolute"
    loss.contrast_anchors = loss.contrast_positives = True
    loss.gather_across_devices, loss.must_retokenize = False, False
    loss.similarity_fct = nn.CosineSimilarity(dim=-1)
    loss.cross_entropy_loss = nn.CrossEntropyLoss()
    original = gist_embed.embed_columns
    gist_embed.embed_columns = lambda model, features: student if model == "student" else guide
    try:
        return loss.forward([{} for _ in student], labels=None)
    finally:
        gist_embed.embed_columns = original


def _rss_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0]) / 1024


def _reset_peak(device: torch.device) -> float:
    """Reset the peak counter; return the current usage in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _rss_mib("VmRSS")


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib("VmHWM")


def run_one(args: argparse.Namespace) -> dict:
    """One backend at one size, in this process (the worker side)."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    b = args.size
    student, guide = make_inputs(b, args.d, args.d_guide, args.negatives, dtype, device)
    leaves = [x.requires_grad_() for x in student]
    if args.backend == "st":

        def step():
            return st_gist_loss(leaves, guide, args.temperature, args.margin)
    else:
        kernels_shim()
        from gist_ray.loss import gist_loss

        def step():
            return gist_loss(
                leaves[0], leaves[1], guide[0], guide[1], leaves[2:], guide[2:],
                temperature=args.temperature, margin=args.margin, backend=args.backend,
            )  # fmt: skip

    times, cpus, peaks, loss = [], [], [], None
    for _ in range(args.warmup if device.type == "cuda" else 0):
        step().backward()
    if device.type == "cpu" and args.backend != "st":
        # One tiny call first: the custom op's first call imports torch's dispatch machinery
        # (~150 MiB of Python modules), a one-time cost of the process, not of the loss.
        tiny = [x[:8].detach().clone().requires_grad_() for x in leaves]
        gist_loss(tiny[0], tiny[1], guide[0][:8], guide[1][:8], tiny[2:],
                  [g[:8] for g in guide[2:]], backend=args.backend).backward()  # fmt: skip
    for _ in range(args.repeats):
        for x in leaves:
            x.grad = None
        base = _reset_peak(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
        peaks.append(_peak(device) - base)
        loss = loss.item()
    return {"time_s": min(times), "cpu_s": min(cpus), "peak_mib": max(peaks), "loss": loss}


def machine(args: argparse.Namespace) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
    }
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    mem = Path("/proc/meminfo")
    if mem.exists():
        info["mem_gib"] = round(int(mem.read_text().split()[1]) / 2**20, 1)
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _measure(args: argparse.Namespace, backend: str, b: int) -> dict:
    """One worker process: one backend at one size."""
    cmd = [sys.executable, __file__, "--worker", backend, "--size", str(b)]
    return worker_json(cmd, args, WORKER_FLAGS)


def worker_json(cmd: list[str], args: argparse.Namespace, flags: tuple[str, ...]) -> dict:
    """Run a worker process (``cmd`` plus ``args``' ``flags`` as options); its last stdout line
    is its JSON result, or ``{"skipped": why}`` when it failed."""
    for flag in flags:
        cmd = cmd + [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_row(row: dict) -> None:
    head = f"{row['backend']:>10} {row['b']:>7} {row['candidates']:>8}"
    if "skipped" in row:
        print(f"{head}  {row['skipped']}", flush=True)
        return
    nan = float("nan")
    print(
        f"{head} {row['time_s']:>9.3f} {row['cpu_s']:>9.3f} {row['peak_mib']:>10.1f} "
        f"{row.get('time_vs_ref', nan):>8.2f} {row.get('cpu_vs_ref', nan):>8.2f} "
        f"{row.get('mem_vs_ref', nan):>8.3f} {row['loss']:>8.4f}",
        flush=True,
    )


WORKER_FLAGS = (
    "d", "d_guide", "negatives", "dtype", "device", "threads", "repeats", "warmup",
    "temperature", "margin",
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="b = N")
    ap.add_argument("--d", type=int, default=384, help="student dim")
    ap.add_argument("--d-guide", type=int, default=768, help="guide dim")
    ap.add_argument("--negatives", type=int, default=1, help="negative columns")
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=None, help="default: all that apply"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved fresh-process runs")
    ap.add_argument("--repeats", type=int, default=1, help="runs inside one process")
    ap.add_argument("--warmup", type=int, default=1, help="CUDA warm-up runs (autotuning)")
    ap.add_argument("--temperature", type=float, default=0.01)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--mem-limit-gib", type=float, default=20.0, help="skip runs estimated above")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.backend = args.worker
        print(json.dumps(run_one(args)))
        return

    backends = args.backends or [
        x for x in BACKENDS if x != "triton" or args.device.startswith("cuda")
    ]
    if args.negatives != 1 and "st" in backends:
        backends.remove("st")  # GISTEmbedLoss takes at most one negative column
    rows = []
    print(
        f"{'backend':>10} {'b=N':>7} {'cands':>8} {'wall s':>9} {'cpu s':>9} {'peak MiB':>10} "
        f"{'ref wall':>8} {'ref cpu':>8} {'ref mem':>8} {'loss':>8}",
        flush=True,
    )
    for b in args.sizes:
        runs: dict[str, list[dict]] = {}
        for backend in backends:
            need = estimate_gib(backend, b, b, args.d, args.d_guide, args.negatives)
            if need > args.mem_limit_gib:
                runs[backend] = [
                    {"skipped": f"would need ~{need:.0f} GiB (> {args.mem_limit_gib:g})"}
                ]
            else:
                runs[backend] = []
        # Rounds interleave the backends (each run a fresh process), so that a burst of load from
        # other jobs on a shared machine does not hit one backend only; the minimum is reported.
        for _ in range(args.rounds):
            for backend in backends:
                if not runs[backend] or "skipped" not in runs[backend][0]:
                    runs[backend].append(_measure(args, backend, b))
        ref = None
        for backend in backends:
            row = {"backend": backend, "b": b, "n": b, "candidates": b * (3 + args.negatives)}
            ok = [r for r in runs[backend] if "skipped" not in r]
            if ok:
                row.update(
                    time_s=min(r["time_s"] for r in ok), cpu_s=min(r["cpu_s"] for r in ok),
                    peak_mib=max(r["peak_mib"] for r in ok), loss=ok[-1]["loss"], rounds=len(ok),
                )  # fmt: skip
            else:
                row["skipped"] = runs[backend][0]["skipped"]
            if backend == "reference" and ok:
                ref = row
            if ref is not None and ok:
                row["time_vs_ref"] = row["time_s"] / ref["time_s"]
                row["cpu_vs_ref"] = row["cpu_s"] / ref["cpu_s"]
                row["mem_vs_ref"] = row["peak_mib"] / max(ref["peak_mib"], 1e-9)
            rows.append(row)
            _print_row(row)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker", "size")}
    result = {"machine": machine(args), "config": config, "results": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
