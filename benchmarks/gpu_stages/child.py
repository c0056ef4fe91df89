"""One stage in its own process: import blocker, fault handler, fault injection, the stage.

The stage's stdout and stderr are its log (the driver opens ``stages/<stage>.log`` for them);
``faulthandler`` writes there on a crash (abort, segfault) and, at the stage's timeout, dumps
every thread's traceback and exits (a hang: a CUDA kernel that never returns, a deadlock).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import importlib.abc
import os
import signal
import sys
import time
import traceback

HEAVY = ("ray", "mlflow", "datasets")  # absent on the GPU machine: no stage may import them
FAULTS = ("abort", "hang", "raise")  # GPU_CHECK_FAULT=<stage>:<fault>, for tests only


class _Hidden:
    """A ``sys.meta_path`` finder that wraps another one and does not find the blocked
    top-level packages, nor their distributions: to the stage they are not installed, as on the
    GPU machine (transformers and sentence-transformers probe for them and carry on)."""

    def __init__(self, finder, blocked: frozenset[str]) -> None:
        self.finder, self.blocked = finder, blocked

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.finder, "find_distributions", None)
        if find is None:
            return iter(())
        blocked = {b.replace("_", "-") for b in self.blocked}
        return (d for d in find(*args, **kwargs)
                if (d.metadata["Name"] or "").lower().replace("_", "-") not in blocked)  # fmt: skip

    def invalidate_caches(self) -> None:
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


def block(modules: str) -> list[str]:
    names = frozenset(m.strip() for m in modules.split(",") if m.strip())
    if names:
        sys.meta_path[:] = [_Hidden(f, names) for f in sys.meta_path]
    return sorted(names)


def inject_fault(stage: str) -> None:
    """``GPU_CHECK_FAULT=<stage>:abort|hang|raise`` (tests only): fail this stage on purpose."""
    spec = os.environ.get("GPU_CHECK_FAULT", "")
    name, _, fault = spec.partition(":")
    if name != stage:
        return
    print(f"GPU_CHECK_FAULT: injecting {fault!r} into stage {stage}", flush=True)
    if fault == "abort":
        os.abort()
    if fault == "hang":
        while True:
            time.sleep(1)
    if fault == "raise":
        raise RuntimeError("GPU_CHECK_FAULT: injected error")
    raise SystemExit(f"GPU_CHECK_FAULT: unknown fault {fault!r}; allowed: {', '.join(FAULTS)}")


def run_child(a: argparse.Namespace) -> int:
    from gpu_stages.common import Ctx

    blocked = block(a.block)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: a traceback on demand
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    timeout = a.child_timeout or 600.0
    # A hang: dump every thread's traceback, then exit, a little before the driver's deadline.
    faulthandler.dump_traceback_later(max(timeout - 3, 1), exit=True, file=sys.stderr)
    ctx = Ctx(a.child, a.out, a.smoke, time.monotonic() + max(timeout - 8, 1), a)
    ctx.result.update(state="running", blocked=blocked, pid=os.getpid())
    ctx.save()
    print(f"stage {a.child}: pid {os.getpid()}, timeout {timeout:.0f} s, blocked {blocked}",
          flush=True)  # fmt: skip
    rc = 0
    try:
        inject_fault(a.child)
        module = importlib.import_module(f"gpu_stages.{a.child}")
        module.run(ctx)
    except BaseException as e:  # the stage as a whole failed: keep what it recorded
        text = traceback.format_exc()
        print(text, flush=True)
        ctx.result["error"] = f"{type(e).__name__}: {e}"[:1000]
        ctx.result["traceback_file"] = ctx.save_traceback("stage", text)
        rc = 1
    faulthandler.cancel_dump_traceback_later()
    ctx.result["heavy_imports"] = [m for m in HEAVY if m in sys.modules]
    ctx.result["elapsed_s"] = round(time.monotonic() - ctx.start, 1)
    ctx.result["state"] = "done" if rc == 0 else "error"
    ctx.save()
    return rc
