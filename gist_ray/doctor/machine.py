"""Every check of one machine, as one JSON-able report (what ``gist-ray doctor`` prints, and what
each node of a cluster sends back).

On every GPU: each dtype's tile plan of the Triton kernel against the reference on the small
case, then on the seam-crossing case (small first: a fault in the largest case should not hide
what the smallest would have said), then the speed figure. On a machine without CUDA the chunked
backend (what training runs on the CPU) is checked the same way and the report says that the
kernel was not. With two or more GPUs (or ``processes`` set) the all-gather check follows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from gist_ray.doctor.cases import Case, cases
from gist_ray.doctor.compare import Backend, check_case, one_line
from gist_ray.doctor.environment import gpus, host, versions
from gist_ray.doctor.gather import check_gather
from gist_ray.doctor.settings import Settings
from gist_ray.loss.op import tiled

log = logging.getLogger(__name__)

NO_CUDA = (
    "no CUDA device: the Triton kernel was NOT checked; the chunked backend (what training "
    "runs on the CPU) was"
)


def _backend(name: str) -> Backend:
    return lambda problems: tiled(list(problems), name)


def _kernel_plan(dtype: torch.dtype, device: torch.device, case: Case) -> dict[str, Any]:
    """The Triton tile plan this dtype gets on this GPU, and the forward's column splits of the
    case (imports triton)."""
    from gist_ray.kernels.gist_function import column_splits, pick_plan

    plan = pick_plan(dtype, device)
    return {"plan": plan.name, "splits": column_splits(case.b, case.pool, plan.fwd, device)[0]}


def check_device(
    device: torch.device,
    settings: Settings,
    backend: Backend | None = None,
    progress: Callable[[str], None] = log.info,
) -> list[dict[str, Any]]:
    """The correctness records of one device: every dtype on the small case, then on the seams.
    ``backend``: what is checked (default: the tiled backend ``settings`` names for the device,
    through the custom op training calls)."""
    with _current(device):
        return _check_device(device, settings, backend, progress)


def _current(device: torch.device):
    """``device`` as the current CUDA device: Triton launches on the current device, whatever
    device the tensors are on."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_device(device, settings, backend, progress) -> list[dict[str, Any]]:
    name = settings.backend_on(device)
    run = backend or _backend(name)
    where = str(device) if device.type == "cuda" else "cpu"
    records = []
    for case in cases(device, settings):
        for dtype in settings.dtypes(device):
            dname = str(dtype).removeprefix("torch.")
            progress(f"checking {where} {name} {dname} {case.name} (b={case.b}, pool={case.pool})")
            extra: dict[str, Any] = {"device": where, "backend": name, "loss": settings.variant}
            if name == "triton":
                try:
                    extra.update(_kernel_plan(dtype, device, case))
                except Exception as e:  # noqa: BLE001 - reported as the check's failure
                    records.append({**extra, "case": case.name, "dtype": dname, "ok": False,
                                    "error": one_line(e)})  # fmt: skip
                    continue
            rec = check_case(case, dtype, device, settings, run, settings.seed)
            records.append({**extra, **rec})
    return records


def check_machine(
    settings: Settings,
    backend: Backend | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """The report of this machine: ``host``, ``versions``, ``gpus``, ``checks`` (records with
    ``ok``), ``speed`` (one figure per GPU), ``notes`` and ``ok`` (every check passed)."""
    report: dict[str, Any] = {"host": host(), "versions": versions(), "gpus": gpus(),
                              "checks": [], "speed": [], "notes": []}  # fmt: skip
    n_gpus = len(report["gpus"])
    devices = [torch.device("cuda", i) for i in range(n_gpus)] or [torch.device("cpu")]
    if not n_gpus:
        report["notes"].append(NO_CUDA)
    for device in devices:
        report["checks"] += check_device(device, settings, backend, progress)
    if n_gpus and settings.speed:
        for device in devices:
            progress(f"measuring the speed figure on {device}")
            try:
                from gist_ray.doctor.speed import speed

                with _current(device):
                    figure = speed(device, settings.backend_on(device))
                report["speed"].append({"device": str(device), **figure})
            except Exception as e:  # noqa: BLE001 - a figure, not a check
                report["speed"].append({"device": str(device), "error": one_line(e)})
    report["checks"] += _gather(settings, n_gpus, report["notes"], progress)
    report["ok"] = all(r["ok"] for r in report["checks"])
    return report


def _gather(settings: Settings, n_gpus: int, notes: list[str], progress) -> list[dict[str, Any]]:
    processes = settings.processes
    if processes is None:
        processes = n_gpus if n_gpus >= 2 else 0
    if processes < 2:
        what = "one GPU" if n_gpus == 1 else "no GPU" if not n_gpus else f"{n_gpus} GPUs"
        notes.append(f"{what}: the all-gather across processes was not checked "
                     "(--processes N checks it with N processes)")  # fmt: skip
        return []
    device_type = "cuda" if n_gpus else "cpu"
    where = {"device": device_type, "backend": settings.backend_on(torch.device(device_type)),
             "loss": settings.variant}  # fmt: skip
    if device_type == "cuda" and processes > n_gpus:
        return [{**where, "case": "all-gather", "ok": False,
                 "error": f"{processes} processes need {processes} GPUs; this machine has "
                          f"{n_gpus}"}]  # fmt: skip
    dtype = settings.dtypes(torch.device(device_type))[0]
    comm = "NCCL" if n_gpus else "gloo"
    progress(f"checking the all-gather with gradient: {processes} {comm} processes")
    return [{**where, **check_gather(settings, processes, device_type, dtype)}]
