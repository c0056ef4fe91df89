"""What the machine is: versions (gist-ray, Python, torch, triton, CUDA, the NVIDIA driver) and
each GPU (name, SM capability, memory). Reads package metadata, torch and the driver's own files;
imports nothing else."""

from __future__ import annotations

import platform
import shutil
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

DRIVER_FILE = Path("/proc/driver/nvidia/version")


def _version_of(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. 550.54.15), or None where there is none."""
    if DRIVER_FILE.is_file():
        first_line = (DRIVER_FILE.read_text(errors="replace").splitlines() or [""])[0]
        for word in first_line.split():
            if word[:1].isdigit() and word.count(".") >= 1:
                return word
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        first = out.stdout.strip().splitlines()[:1]
        return first[0].strip() if out.returncode == 0 and first else None
    return None


def versions() -> dict[str, str | None]:
    return {
        "gist-ray": _version_of("gist-ray"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version_of("triton"),
        "cuda": torch.version.cuda,  # the CUDA torch was built with; None on a CPU build
        "driver": driver_version(),
    }


def gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({
            "index": i,
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
        })  # fmt: skip
    return out


def host() -> str:
    return socket.gethostname()
