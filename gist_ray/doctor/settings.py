"""What ``gist-ray doctor`` checks: the loss settings of a run and the dtypes its embeddings
reach the loss in. Plain values (JSON-able), so the same settings travel to every node of a Ray
cluster; the command fills them from a config (gist_ray.commands.doctor)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from gist_ray.loss import validate_loss_args

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Settings:
    temperature: float = 0.01
    margin: float = 0.0
    margin_strategy: str = "absolute"
    contrast_anchors: bool = True
    contrast_positives: bool = True
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] | None = None
    hardness_alpha: float = 0.0
    hardness_mode: str = "hard_negatives"
    negatives: int = 1  # hard-negative columns (AN segments) of the checked problems
    # the tiled backend checked on CUDA: "chunked" checks the chunked backend there, anything
    # else the Triton kernel (the CPU always runs chunked)
    backend: str = "auto"
    # dtypes checked on CUDA and on the CPU (the student's embeddings as they reach the loss)
    cuda_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    cpu_dtypes: tuple[str, ...] = ("float32",)
    # processes of the all-gather check; None = one per GPU where there are two or more
    processes: int | None = None
    speed: bool = True  # the speed figure on each GPU
    seed: int = 0

    def __post_init__(self) -> None:
        validate_loss_args(
            self.temperature, self.margin, self.margin_strategy, self.backend,
            self.matryoshka_dims, self.matryoshka_weights, self.hardness_alpha,
            self.hardness_mode,
        )  # fmt: skip
        for name in (*self.cuda_dtypes, *self.cpu_dtypes):
            if name not in DTYPE_NAMES:
                raise ValueError(f"dtype {name!r}: one of {', '.join(DTYPE_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        tuples = ("matryoshka_dims", "cuda_dtypes", "cpu_dtypes")
        fixed = {k: tuple(v) if k in tuples else v for k, v in values.items()}
        if fixed.get("matryoshka_weights") is not None:
            fixed["matryoshka_weights"] = tuple(fixed["matryoshka_weights"])
        return cls(**fixed)

    def backend_on(self, device: torch.device) -> str:
        if device.type == "cuda" and self.backend != "chunked":
            return "triton"
        return "chunked"

    def dtypes(self, device: torch.device) -> list[torch.dtype]:
        names = self.cuda_dtypes if device.type == "cuda" else self.cpu_dtypes
        return [DTYPE_NAMES[n] for n in names]

    @property
    def variant(self) -> str:
        """The kernel variants these settings run: ``plain``, Matryoshka widths, hardness."""
        parts = []
        if self.matryoshka_dims:
            parts.append("widths " + "/".join(map(str, self.matryoshka_dims)))
        if self.hardness_alpha:
            parts.append(f"hardness {self.hardness_alpha:g} {self.hardness_mode}")
        return ", ".join(parts) or "plain"

    @property
    def weights(self) -> list[float]:
        dims = self.matryoshka_dims or (0,)
        return list(self.matryoshka_weights or [1.0] * len(dims))
