"""What the stages share: the context that records every case and writes the stage's JSON after
each one, problems, timing, a log of the kernel launches, and the compiled kernels' resources.

Stages use the public loss API (``gist_loss``, ``GistLoss``, the custom op's ``tiled_backend``)
and the comparison harness of the unit tests (tests/loss/harness.py: inputs, tolerances and
checks against the ``reference`` backend), on CUDA tensors, or under ``--smoke`` on CPU tensors
through the Triton interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpu_stages import write_json


@dataclass
class Ctx:
    stage: str
    out: Path
    smoke: bool
    deadline: float  # time.monotonic() after which a stage starts no new case
    args: argparse.Namespace
    result: dict = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)

    @property
    def dev(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        write_json(self.out / "stages" / f"{self.stage}.json", self.result)

    def put(self, key: str, value: Any) -> None:
        self.result.setdefault("data", {})[key] = value
        self.save()

    def save_traceback(self, case: str, text: str) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", case).strip("_")[:80]
        path = self.out / "tracebacks" / f"{self.stage}__{safe}.txt"
        path.write_text(text, encoding="utf-8")
        return str(path.relative_to(self.out))

    def case(self, name: str, fn: Callable[[], Any], min_s: float = 0.0) -> Any:
        """Run one case: ``{"ok", "s", ...}`` (a dict result is merged in), or the error and its
        traceback file; the stage's JSON is rewritten either way. Skipped (``ok`` false) when
        fewer than ``min_s`` seconds of the stage are left."""
        cases = self.result.setdefault("cases", {})
        if self.left() < min_s:
            cases[name] = {"ok": False, "skipped": f"stage time budget ({self.left():.0f} s left)"}
            print(f"[{self.stage}] {name}: skipped (time)", flush=True)
            self.save()
            return None
        print(f"[{self.stage}] {name} ...", flush=True)
        t0 = time.perf_counter()
        out = None
        try:
            out = fn()
            entry = {"ok": True, **(out if isinstance(out, dict) else {})}
        except Exception as e:  # record, go on with the next case
            text = traceback.format_exc()
            print(text, flush=True)
            entry = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500],
                     "traceback_file": self.save_traceback(name, text)}  # fmt: skip
        entry["s"] = round(time.perf_counter() - t0, 2)
        cases[name] = entry
        print(f"[{self.stage}] {name}: {'ok' if entry['ok'] else 'FAILED'} ({entry['s']} s)",
              flush=True)  # fmt: skip
        self.save()
        free()
        return out


def harness():
    """tests/loss/harness.py (inputs, tolerances, checks against ``reference``)."""
    import tests.loss.harness as H

    return H


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def train_backend(ctx: Ctx) -> str:
    """The loss backend of the training-path checks: what training uses (``auto``: the kernels
    on CUDA), under --smoke the kernels through the interpreter (``auto`` would pick chunked)."""
    return "triton" if ctx.smoke else "auto"


def triton_rows(p):
    from gist_ray.loss.op import tiled_backend

    return tiled_backend(p, backend="triton")


def gist_function():
    """The launchers module (imports triton; under --smoke TRITON_INTERPRET=1 is already set)."""
    from gist_ray.kernels import gist_function as gf

    return gf


def big_problem(b: int, n: int, d: int, d_g: int, dev: str, dtype=torch.bfloat16):
    """Random unit student rows and random guide rows: segments AP, AA, PP, AN1 over 3 distinct
    candidate tensors of ``n`` rows (built in place, no copies); the left rows are the first
    ``b`` candidates' copies, row i's positive is column i."""
    from gist_ray.loss.plan import Problem, build_segments

    def unit(rows: int, dim: int) -> torch.Tensor:
        x = torch.randn(rows, dim, device=dev, dtype=dtype)
        return x.div_(x.float().norm(dim=1, keepdim=True).to(dtype))

    segs, sources = build_segments(1, True, True)
    cands = tuple(unit(n, d).requires_grad_() for _ in sources)
    guide_cands = tuple(unit(n, d_g) for _ in sources)
    left = tuple(cands[j][:b].detach().clone().requires_grad_() for j in (1, 0))
    guide_left = (guide_cands[1][:b].clone(), guide_cands[0][:b].clone())
    return Problem(left, cands, guide_left, guide_cands, segs, 0, 0.01, 0.0, "absolute")


def leaves(p) -> list[torch.Tensor]:
    return [*p.left, *p.cands]


def clear_grads(p) -> None:
    for x in leaves(p):
        x.grad = None


def finite_sum(x: torch.Tensor) -> bool:
    """Whether every element is finite, without a full-size temporary (a NaN or an inf makes
    the float32 sum non-finite)."""
    return bool(torch.isfinite(torch.sum(x, dtype=torch.float32)))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float32)."""
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual.float() - expected).abs().max() / scale)


@contextlib.contextmanager
def launch_log() -> Iterator[list[dict]]:
    """Every kernel launch of the launchers while inside: kernel, grid and the TMA flag, as
    ``gist_function._launch`` receives them (the launches CUDA really runs, not a plan table).
    Empty when the launchers have no ``_launch`` (then the callers say so)."""
    gf = gist_function()
    launches: list[dict] = []
    original = getattr(gf, "_launch", None)
    if original is None:
        yield launches
        return

    def logged(kernel, grid, *args, **kwargs):
        fn = getattr(kernel, "fn", kernel)
        name = getattr(fn, "__name__", repr(kernel))
        grid = tuple(int(g) for g in grid)
        launches.append({"kernel": name, "grid": grid, "tma": kwargs.get("TMA")})
        return original(kernel, grid, *args, **kwargs)

    gf._launch = logged
    try:
        yield launches
    finally:
        gf._launch = original


def seams(launches: list[dict], segments: int) -> dict:
    """Column splits of the forward (its grid's second dimension) and backward chunks (launches
    of the backward kernel per segment) seen in a launch log."""
    fwd = [x for x in launches if x["kernel"] == "gist_fwd_kernel"]
    prob = [x for x in launches if x["kernel"] == "gist_prob_kernel"]
    splits = max((x["grid"][1] for x in fwd if len(x["grid"]) > 1), default=0)
    return {"launches": len(launches), "fwd_column_splits": splits,
            "bwd_chunks": len(prob) // max(segments, 1),
            "tma": sorted({str(x["tma"]) for x in launches})}  # fmt: skip


_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "STORE_BITS", "LOAD_BITS", "HARD", "TMA",
               "PRECISION")  # fmt: skip


def compiled_kernels() -> list[dict]:
    """Registers, spills and shared memory of every GIST kernel compiled (or loaded from
    Triton's cache) in this process, as the driver loaded them on this GPU: ``n_regs``,
    ``n_spills`` (Triton: the local-memory bytes per thread / 4) from the loaded binary,
    ``shared`` bytes from the metadata. Empty under the interpreter (nothing is compiled)."""
    gf = gist_function()
    if getattr(gf, "INTERPRETED", False):
        return []
    from gist_ray.kernels import gist_kernels as gk

    rows = []
    for name in ("gist_fwd_kernel", "gist_diag_kernel", "gist_prob_kernel"):
        fn = getattr(gk, name, None)
        for entry in (getattr(fn, "device_caches", None) or {}).values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for kernel in list(getattr(cache, "values", dict)()):
                md = getattr(kernel, "metadata", None)
                spills = getattr(kernel, "n_spills", None)
                rows.append({
                    "kernel": name, **_constexprs(fn, kernel),
                    "num_warps": getattr(md, "num_warps", None),
                    "num_stages": getattr(md, "num_stages", None),
                    "n_regs": getattr(kernel, "n_regs", None), "n_spills": spills,
                    "spill_bytes": None if spills is None else 4 * spills,
                    "shared_bytes": getattr(md, "shared", None),
                })  # fmt: skip
    return rows


def _constexprs(fn, kernel) -> dict:
    """The interesting constexprs of a compiled kernel (from its source's constants)."""
    out = {}
    try:
        names = list(getattr(fn, "arg_names", []))
        for key, value in getattr(kernel.src, "constants", {}).items():
            idx = key[0] if isinstance(key, tuple) and len(key) == 1 else key
            name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
            if name in _CONSTEXPRS:
                out[name] = value if isinstance(value, int | float | str | bool) else str(value)
    except Exception as e:  # noqa: BLE001 - metadata layouts differ between Triton versions
        out["constexprs_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def time_fwd_bwd(fn, p, reps: int, grad: torch.Tensor | None = None) -> dict:
    """Median (by total) forward and backward seconds of ``fn(p).loss`` over ``reps`` runs after
    one warm-up (compilation)."""

    def once() -> tuple[float, float]:
        clear_grads(p)
        sync()
        t0 = time.perf_counter()
        loss = fn(p).loss
        sync()
        t1 = time.perf_counter()
        (loss.mean() if grad is None else (loss * grad).sum()).backward()
        sync()
        return t1 - t0, time.perf_counter() - t1

    once()
    runs = sorted((once() for _ in range(max(reps, 1))), key=sum)
    fwd, bwd = runs[len(runs) // 2]
    return {"fwd_s": round(fwd, 4), "bwd_s": round(bwd, 4), "total_s": round(fwd + bwd, 4)}


def device_info(dev: str) -> dict:
    import triton

    info: dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                            "torch_cuda": torch.version.cuda}  # fmt: skip
    if dev != "cuda":
        return {**info, "device": "cpu (Triton interpreter)"}
    props = torch.cuda.get_device_properties(0)
    return {
        **info, "device": props.name, "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
        "smem_per_block_optin": getattr(props, "shared_memory_per_block_optin", None),
        "devices_visible": torch.cuda.device_count(),
    }  # fmt: skip
