"""The global pool across processes: W processes of b rows each, through
``gist_loss(gather=True)`` (the all-gather with gradient of gist_ray.core.distributed), must give
the loss and the gradients of one process holding all W·b rows (docs/loss.md "Global pool").

:func:`check_gather` starts W fresh Python processes (each runs :func:`main`):
one per GPU with NCCL on CUDA, gloo processes on the CPU. Every process draws the same global
batch (seeded), runs its own rows with the gather and the whole batch without it, and compares:
the mean of the W local losses with the one-process loss, and each local row's gradient, divided
by W (DDP averages gradients; the gather's backward already summed every rank's part), with the
one-process gradient of that row. The worst errors over the ranks come back as one record.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gist_ray.doctor.cases import Case, make_pool
from gist_ray.doctor.compare import one_line, rel_err, tolerance
from gist_ray.doctor.settings import DTYPE_NAMES, Settings

ROWS = {"cuda": 256, "cpu": 16}  # local rows per process
WIDTHS = {"cuda": (256, 128), "cpu": (32, 32)}  # student (unless Matryoshka says), guide
TIMEOUT_S = 300
# One rank (not `python -m` of this module: the package imports it first, and runpy warns).
WORKER = "import sys; from gist_ray.doctor.gather import main; sys.exit(main(*sys.argv[1:3]))"


def check_gather(
    settings: Settings, processes: int, device_type: str, dtype: torch.dtype,
    timeout: float = TIMEOUT_S,
) -> dict[str, Any]:  # fmt: skip
    """The record of the check (``ok``, errors, tolerance; ``error`` when a process failed)."""
    tol = tolerance(torch.device(device_type), dtype)
    b = ROWS[device_type]
    record: dict[str, Any] = {"case": "all-gather", "processes": processes, "b": b,
                              "pool": processes * b, "dtype": str(dtype).removeprefix("torch."),
                              "tolerance": tol}  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gist-ray-doctor-") as tmp:
        spec = {"settings": settings.to_dict(), "world": processes, "device": device_type,
                "dtype": record["dtype"], "b": b}  # fmt: skip
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        procs = []
        for rank in range(processes):
            log = open(Path(tmp) / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
            cmd = [sys.executable, "-c", WORKER, tmp, str(rank)]
            procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        timed_out = _wait([proc for proc, _ in procs], timeout)
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        record.update(_collect(Path(tmp), processes, timed_out, timeout))
    record["ok"] = "error" not in record and record["loss_err"] <= tol and record["grad_err"] <= tol
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _wait(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait until every process has ended, one has failed (the others would wait for it in
    the process group until their timeout), or ``timeout``; True on the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            return False
        time.sleep(0.1)
    return True


def _collect(tmp: Path, processes: int, timed_out: bool, timeout: float) -> dict[str, Any]:
    errors = []
    for rank in range(processes):
        path = tmp / f"error{rank}.json"
        if path.is_file():
            errors.append(json.loads(path.read_text()))
    if errors:
        first = errors[0]
        return {"error": f"rank {first['rank']}: {first['error']}", "traceback": first["traceback"]}
    result = tmp / "result.json"
    if timed_out or not result.is_file():
        tail = (tmp / "rank0.log").read_text(errors="replace")[-2000:]
        what = f"timed out after {timeout:g} s" if timed_out else "rank 0 wrote no result"
        return {"error": f"the {processes} processes {what}", "traceback": tail}
    return json.loads(result.read_text())


def _settings_kwargs(s: Settings) -> dict[str, Any]:
    return {
        "temperature": s.temperature, "margin": s.margin, "margin_strategy": s.margin_strategy,
        "contrast_anchors": s.contrast_anchors, "contrast_positives": s.contrast_positives,
        "matryoshka_dims": s.matryoshka_dims, "matryoshka_weights": s.matryoshka_weights,
        "hardness_alpha": s.hardness_alpha, "hardness_mode": s.hardness_mode,
    }  # fmt: skip


def _loss(xs: list[torch.Tensor], gs: list[torch.Tensor], s: Settings, gather: bool):
    from gist_ray.loss import gist_loss

    backend = s.backend_on(xs[0].device)
    return gist_loss(xs[0], xs[1], gs[0], gs[1], xs[2:], gs[2:], gather=gather,
                     backend=backend, **_settings_kwargs(s))  # fmt: skip


def _run_rank(tmp: Path, rank: int) -> None:
    spec = json.loads((tmp / "spec.json").read_text())
    settings = Settings.from_dict(spec["settings"])
    world, b, dtype = spec["world"], spec["b"], DTYPE_NAMES[spec["dtype"]]
    if spec["device"] == "cuda":
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend, init_method=f"file://{tmp / 'init'}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )  # fmt: skip
    try:
        d, d_g = WIDTHS[spec["device"]]
        d = settings.matryoshka_dims[0] if settings.matryoshka_dims else d
        case = Case("all-gather", b, world, rank, d, d_g, world * b)
        pool = make_pool(case, settings.negatives, settings.seed, device)
        local = slice(rank * b, (rank + 1) * b)
        names = list(pool.student)
        guide = [pool.guide[n] for n in names]
        xs = [pool.student[n][local].detach().to(dtype).requires_grad_() for n in names]
        loss = _loss(xs, [g[local] for g in guide], settings, gather=True)
        grads = torch.autograd.grad(loss, xs)
        full = [pool.student[n].detach().to(dtype).requires_grad_() for n in names]
        one = _loss(full, guide, settings, gather=False)
        one_grads = torch.autograd.grad(one, full)
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        mean /= world
        loss_err = (mean - one.float()).abs().item() / max(abs(one.item()), 1.0)
        grad_err = max(rel_err(g / world, e[local]) for g, e in zip(grads, one_grads))
        worst = torch.tensor([loss_err, grad_err], dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            out = {
                "one_process_loss": one.item(),
                "loss_err": worst[0].item(),
                "grad_err": worst[1].item(),
            }
            (tmp / "result.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def main(tmp: str, rank: str) -> int:
    try:
        _run_rank(Path(tmp), int(rank))
        return 0
    except Exception as e:  # noqa: BLE001 - reported to the parent
        err = {"rank": int(rank), "error": one_line(e), "traceback": traceback.format_exc()}
        (Path(tmp) / f"error{rank}.json").write_text(json.dumps(err))
        return 1
