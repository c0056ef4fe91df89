"""What the loss settings ``loss.compute_dtype`` and ``loss.backend`` become on a device
(docs/loss.md "Precision" and "Backends"): plain functions of the setting and the device, so a
CPU test can ask what a CUDA device would get.

* :func:`compute_dtype_for`: ``auto`` is bfloat16 on CUDA (the dtype the kernel's tiles and
  every figure in docs/kernel.md are for, whatever the model's last module returns) and float32
  elsewhere (the CPU backend computes in float32 anyway; fp32 keeps CPU results unchanged).
* :func:`choose_backend`: on CUDA the kernel is checked once per process on a small problem
  against the reference (:mod:`gist_ray.loss.probe`). With ``auto`` a failed check (an
  exception or a mismatch) falls back to ``chunked``, which the caller reports; with ``triton``
  it raises :class:`KernelCheckError`, one line.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from gist_ray.core.errors import GistRayError
from gist_ray.loss.op import tiled_backend
from gist_ray.loss.probe import probe, probe_isolated

COMPUTE_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float32", "float16")


def compute_dtype_for(setting: str, device: torch.device | str) -> torch.dtype:
    """The dtype the student's rows are cast to (before the gather) for ``loss.compute_dtype =
    setting`` on ``device`` (a device or its type, e.g. ``"cuda"``)."""
    if setting not in COMPUTE_DTYPES:
        raise ValueError(
            f"loss.compute_dtype: unknown dtype {setting!r}; allowed: {', '.join(COMPUTE_DTYPES)}"
        )
    if setting == "auto":
        is_cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if is_cuda else torch.float32
    return getattr(torch, setting)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KernelCheckError(GistRayError):
    """``loss.backend: triton`` and the kernel failed its check against the reference."""


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # what the loss runs: reference, chunked, triton (or a registered kernel)
    checked: bool = False  # the kernel passed its check against the reference in this process
    fallback: str | None = None  # auto: why the kernel failed its check (then chunked runs)


def choose_backend(
    setting: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    cuda: bool | None = None,
    kernel: str = "triton",
    dim: int = 64,
) -> BackendChoice:
    """The backend ``loss.backend = setting`` runs on ``device`` with embeddings of ``dtype``
    and width ``dim``. ``cuda`` (default: whether ``device`` is a CUDA device) says whether the
    kernel is the one to run: ``auto`` checks it then, else runs ``chunked``; ``triton`` checks
    it on CUDA (elsewhere it runs under the Triton interpreter, as the tests do, unchecked).
    ``kernel``: the registered tiled backend ``auto`` and ``triton`` mean
    (:func:`gist_ray.loss.op.register_kernel`; a test passes a failing one)."""
    cuda = torch.device(device).type == "cuda" if cuda is None else cuda
    if setting in ("reference", "chunked") or (setting == "auto" and not cuda):
        return BackendChoice("chunked" if setting == "auto" else setting)
    if not cuda:
        return BackendChoice(kernel)
    reason = check_kernel(kernel, torch.device(device), dtype, dim)
    if reason is None:
        return BackendChoice(kernel, checked=True)
    if setting == "auto":
        return BackendChoice("chunked", fallback=reason)
    raise KernelCheckError(
        f"loss.backend = {setting}: the {kernel} kernel failed its check against the reference "
        f"on {device} ({dtype_name(dtype)}): {reason}; set loss.backend: auto to train on "
        "chunked instead"
    )


@functools.cache
def check_kernel(kernel: str, device: torch.device, dtype: torch.dtype, dim: int) -> str | None:
    """:func:`~gist_ray.loss.probe.probe` of the tiled backend ``kernel``, once per process
    for each device, dtype and width: None when it agrees with the reference, else why not. A
    built-in kernel on CUDA is checked in a process of its own
    (:func:`~gist_ray.loss.probe.probe_isolated`): a fault there leaves this process's CUDA
    context usable for the fallback."""
    if device.type == "cuda" and kernel in ("triton", "chunked"):
        return probe_isolated(kernel, device, dtype, dim=dim)
    return probe(functools.partial(tiled_backend, backend=kernel), device, dtype, dim=dim)
