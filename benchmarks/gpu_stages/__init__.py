"""The stages of benchmarks/gpu_check.py, one module each, run in order, each in its own process.

Importing this package imports nothing heavy (the driver never imports torch): a stage module is
imported only inside its own process (:mod:`.child`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str
    gpu_s: float  # timeout on a GPU (the six sum to 380 s of the 400 s budget)
    smoke_s: float  # timeout under --smoke (CPU, Triton interpreter)
    what: str


STAGES = (
    Stage("smoke", 45, 180, "a tiny bf16 case through gist_loss against reference"),
    Stage("correctness", 125, 480, "kernel against reference: seams, views, Matryoshka, "
          "hardness, sm_80 pointer plans, ties, determinism, the dtype training feeds"),
    Stage("speed", 55, 180, "bf16 and fp32 at b x N, a per-kernel profile, registers/spills"),
    Stage("references", 50, 180, "materialised fp32 and bf16 references: time and values"),
    Stage("max_n", 60, 180, "the largest N with finite loss and gradients at b"),
    Stage("train_step", 45, 300, "one training step of a tiny random BERT, with and without "
          "gradient caching (no Ray, no MLflow)"),
)  # fmt: skip


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON under a temporary name, then rename: a reader never sees half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
