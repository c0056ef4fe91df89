"""The GPU check of the Triton GIST kernels: one run on a device machine that cannot be wasted.

    python benchmarks/gpu_check.py                 # on a CUDA machine; results in $OUT (or --out)
    python benchmarks/gpu_check.py --smoke --out DIR   # CPU, Triton interpreter, tiny sizes (CI)

How it is built (docs/gpu.md has the full description and the device command line):

* ``header.json`` is written before anything runs: versions, ``nvidia-smi``, arguments, time.
* Each stage (``gpu_stages/<stage>.py``) runs in its own Python process with its own timeout,
  so a CUDA fault, a hang or an out-of-memory kill loses that stage only. A stage writes its
  results after every case; this driver merges them into ``gpu_check.json`` (atomically, temp
  name then rename) after every stage, with the targets against the measured values.
* A stage that hangs dumps every thread's Python traceback (``faulthandler``) before it is
  stopped; a crash (abort, segfault) dumps its traceback too. Each stage's log is
  ``stages/<stage>.log``, the whole run's ``gpu_check.log``, every failure's traceback
  ``tracebacks/<stage>[__<case>].txt``, all under the output folder.
* Stages, in order: smoke → correctness → speed → references → max_n → train_step, at most
  400 s in all (per-stage timeouts sum within it), so a rerun fits while the machine is warm.

This driver imports neither torch nor gist_ray (it only starts processes), and no stage imports
Ray, MLflow or datasets (the GPU machine has none of them); ``--block`` hides them from the
stages to prove it (tests/test_gpu_check.py). ``GPU_CHECK_FAULT=<stage>:abort|hang|raise`` is a
test-only fault injection: that stage aborts, hangs or raises when it starts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # gpu_stages, then gist_ray and tests from this checkout

from gpu_stages import STAGES, write_json  # noqa: E402  (imports nothing heavy)
from gpu_stages.report import summary_lines, targets  # noqa: E402

BUDGET_S = 400  # the whole run on a GPU; the stages' timeouts sum within it
SMOKE_BUDGET_S = 1500  # under the interpreter on a small shared CPU machine
MIN_STAGE_S = 15  # a stage that would get less than this is skipped
PACKAGES = ("torch", "triton", "transformers", "sentence-transformers", "tokenizers", "numpy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="output folder (default: $OUT, else ./gpu_check_out)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU dry run: Triton interpreter, tiny sizes, every stage and code path",
    )
    ap.add_argument(
        "--stages",
        default=",".join(s.name for s in STAGES),
        help="comma-separated subset, run in the fixed order",
    )
    ap.add_argument("--budget-s", type=float, help=f"whole run (default {BUDGET_S} s on a GPU)")
    ap.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="override one stage's timeout (repeatable)",
    )
    ap.add_argument(
        "--block",
        default="",
        help="comma-separated modules the stages must not find (e.g. "
        "ray,mlflow,datasets: the GPU machine has none of them)",
    )
    ap.add_argument("--b", type=int, default=8192, help="speed/references/max_n: query rows")
    ap.add_argument("--n", type=int, default=65536, help="speed: candidates per segment")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--d-guide", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-start", type=int, default=262144, help="max_n: first N tried")
    ap.add_argument("--n-cap", type=int, default=1 << 23, help="max_n: never beyond this")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # run one stage (this script's children)
    ap.add_argument("--child-timeout", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.b, a.n, a.d, a.d_guide, a.reps, a.n_start, a.n_cap = 40, 96, 40, 48, 1, 64, 256
    a.out = (a.out or Path(os.environ.get("OUT") or "gpu_check_out")).resolve()
    return a


def stage_args(a: argparse.Namespace) -> list[str]:
    """The arguments every child gets (its stage and timeout are added)."""
    args = ["--out", str(a.out), "--b", str(a.b), "--n", str(a.n), "--d", str(a.d),
            "--d-guide", str(a.d_guide), "--reps", str(a.reps), "--n-start", str(a.n_start),
            "--n-cap", str(a.n_cap), "--block", a.block]  # fmt: skip
    return args + (["--smoke"] if a.smoke else [])


class Log:
    """Lines to the console and to gpu_check.log."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w", encoding="utf-8")  # one run per output folder
        self.start = time.monotonic()

    def __call__(self, line: str) -> None:
        text = f"[{time.monotonic() - self.start:6.1f}s] {line}"
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def raw(self, text: str) -> None:
        self.file.write(text)
        self.file.flush()


def _run(cmd: list[str], timeout: float = 20) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return (proc.stdout.strip() or proc.stderr.strip())[:2000]
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {type(e).__name__}: {e}"[:300]


def header(a: argparse.Namespace, plan: list[tuple[str, float]], budget: float) -> dict:
    """Everything known before a stage runs, without importing torch (no CUDA context here:
    the stages get the whole device)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    smi = "n/a (smoke)" if a.smoke else _run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
         "--format=csv,noheader"])  # fmt: skip
    return {
        "script": "benchmarks/gpu_check.py",
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "smoke (CPU, TRITON_INTERPRET=1)" if a.smoke else "gpu",
        "argv": sys.argv, "args": {k: str(v) for k, v in vars(a).items() if k != "child"},
        "host": socket.gethostname(), "python": platform.python_version(),
        "platform": platform.platform(), "versions": versions, "nvidia_smi": smi,
        **_git(),
        "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET",
                                               "TRITON_CACHE_DIR", "GPU_CHECK_FAULT")},
        "budget_s": budget, "stages": [{"name": n, "timeout_s": t} for n, t in plan],
    }  # fmt: skip


def _git() -> dict:
    """The commit and whether tracked files differ from it (None: not a git checkout, as a
    device machine's copy of the working tree may be)."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if not commit or " " in commit:
        return {"git": None, "git_dirty": None}
    return {
        "git": commit,
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
    }


def child_env(a: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONFAULTHANDLER"] = "1"
    if a.smoke:
        env["TRITON_INTERPRET"] = "1"  # before triton is imported in the child
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def run_stage(a: argparse.Namespace, name: str, timeout: float, log: Log) -> dict:
    """One stage in its own process group; its status from the exit and its own JSON."""
    stage_json = a.out / "stages" / f"{name}.json"
    stage_log = a.out / "stages" / f"{name}.log"
    stage_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name,
           "--child-timeout", str(timeout), *stage_args(a)]  # fmt: skip
    start = time.monotonic()
    with stage_log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(a),
                                cwd=ROOT, start_new_session=True)  # fmt: skip
        timed_out = False
        try:
            # The child dumps its tracebacks and exits by itself at `timeout` (faulthandler);
            # this is the backstop for a process that cannot even do that.
            rc = proc.wait(timeout + 10)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            rc = proc.wait()
        except BaseException:  # the driver itself is stopped: take the stage down with it
            _kill(proc)
            raise
    wall = time.monotonic() - start
    result = _read_json(stage_json)
    cases = result.get("cases", {})
    text = stage_log.read_text(encoding="utf-8", errors="replace")
    log.raw(f"----- stage {name} log -----\n{text}\n----- end of stage {name} log -----\n")
    timed_out = timed_out or (result.get("state") != "done" and wall >= timeout - 5)
    if rc == 0 and result.get("state") == "done":
        failed = [c for c, v in cases.items() if not v.get("ok") and not v.get("skipped")]
        skipped = [c for c, v in cases.items() if v.get("skipped")]
        status = "failed" if failed else "partial" if skipped else "ok"
    elif result.get("state") == "error":  # the stage raised outside a case (it saved why)
        status = "error"
    else:
        status = "timeout" if timed_out else "crashed"
    if status in ("timeout", "crashed"):
        tb = a.out / "tracebacks" / f"{name}.txt"
        tb.write_text(f"stage {name}: {status}, exit status {rc}, {wall:.1f} s\n\n{text[-20000:]}")
        result.setdefault("traceback_file", str(tb.relative_to(a.out)))
    if status in ("timeout", "crashed", "error"):
        log(f"{name}: {status} (exit status {rc}); last lines of its log:")
        for line in text.splitlines()[-25:]:
            log(f"    {line}")
    return {**result, "status": status, "exit_status": rc, "wall_s": round(wall, 1),
            "timeout_s": round(timeout, 1)}  # fmt: skip


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_plan(a: argparse.Namespace) -> list[tuple[str, float]]:
    chosen = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = sorted(set(chosen) - {s.name for s in STAGES})
    if unknown:
        names = ", ".join(s.name for s in STAGES)
        raise SystemExit(f"gpu_check: --stages: unknown {', '.join(unknown)}; allowed: {names}")
    overrides = {}
    for item in a.timeout:
        name, _, secs = item.partition("=")
        try:
            overrides[name] = float(secs)
        except ValueError:
            raise SystemExit(f"gpu_check: --timeout {item!r}: expected STAGE=SECONDS") from None
    return [(s.name, overrides.get(s.name, s.smoke_s if a.smoke else s.gpu_s))
            for s in STAGES if s.name in chosen]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        from gpu_stages.child import run_child

        return run_child(a)
    for sub in ("stages", "tracebacks"):
        (a.out / sub).mkdir(parents=True, exist_ok=True)
    plan = stage_plan(a)
    for name, _ in plan:  # a rerun into the same folder: no stale traceback of these stages
        for old in (a.out / "tracebacks").glob(f"{name}*.txt"):
            old.unlink()
    budget = a.budget_s or (SMOKE_BUDGET_S if a.smoke else BUDGET_S)
    log = Log(a.out / "gpu_check.log")
    head = header(a, plan, budget)
    write_json(a.out / "header.json", head)
    log(f"gpu_check ({head['mode']}) -> {a.out}; stages {', '.join(n for n, _ in plan)}; "
        f"budget {budget:.0f} s")  # fmt: skip
    merged = {"header": head, "stages": {}, "targets": [], "complete": False}
    path = a.out / "gpu_check.json"
    write_json(path, merged)
    start = time.monotonic()
    # Stopped from outside (`timeout`, SIGTERM): the running stage is killed with its process
    # group and the JSON says so.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for name, timeout in plan:
        left = budget - (time.monotonic() - start)
        if left < MIN_STAGE_S:
            why = f"time budget ({left:.0f} s left)"
            merged["stages"][name] = {"status": "skipped", "reason": why}
            log(f"{name}: skipped, {left:.0f} s of the budget left")
        else:
            log(f"{name}: start (timeout {min(timeout, left):.0f} s)")
            try:
                merged["stages"][name] = run_stage(a, name, min(timeout, left), log)
            except (SystemExit, KeyboardInterrupt):
                merged["stages"][name] = {"status": "interrupted"}
                write_json(path, merged)
                log(f"{name}: interrupted; stopping")
                raise
            st = merged["stages"][name]
            log(f"{name}: {st['status']} in {st['wall_s']} s")
        merged["targets"] = targets(merged)
        merged["elapsed_s"] = round(time.monotonic() - start, 1)
        write_json(path, merged)
    merged["complete"] = True
    merged["summary"] = summary_lines(merged)
    write_json(path, merged)
    log("\n".join(["", "=" * 100, *merged["summary"], "=" * 100]))
    ok = all(s.get("status") == "ok" for s in merged["stages"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
