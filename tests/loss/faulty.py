"""Tiled kernels for the tests of the kernel check (gist_ray.loss.probe, gist_ray.loss.select):
``chunked`` with one fault each, run through the same custom op as the real kernels
(:func:`gist_ray.loss.op.register_kernel`), plus one that records what reaches it."""

from __future__ import annotations

import itertools

import torch

from gist_ray.loss import chunked
from gist_ray.loss.op import register_kernel

_names = itertools.count()


class Raising:
    """Fails the way a kernel on an unsupported GPU does."""

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, problems):
        self.calls += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    def backward(self, problems, grad, lse, bits):
        raise AssertionError("no backward without a forward")


class Recording:
    """``chunked``, recording the dtype and row count of the left operands it gets."""

    def __init__(self) -> None:
        self.calls = 0
        self.seen: list[tuple[torch.dtype, int]] = []

    def forward(self, problems):
        self.calls += 1
        self.seen += [(x.dtype, x.shape[0]) for p in problems for x in (*p.left, *p.cands)]
        return chunked.forward(problems)

    def backward(self, problems, grad, lse, bits):
        return chunked.backward(problems, grad, lse, bits)


class WrongLoss(Recording):
    """Every row's loss 1 % too high."""

    def forward(self, problems):
        loss, *rest = super().forward(problems)
        return (loss * 1.01, *rest)


class WrongMask(Recording):
    """One row's masked count off by one (the loss itself right)."""

    def forward(self, problems):
        loss, masked, *rest = super().forward(problems)
        masked = masked.clone()
        masked[0, 0] += 1
        return (loss, masked, *rest)


class WrongGradient(Recording):
    """The gradient of the anchor rows 10 % too large."""

    def backward(self, problems, grad, lse, bits):
        dleft, dcands = chunked.backward(problems, grad, lse, bits)
        return [dleft[0] * 1.1, *dleft[1:]], dcands


def register(kernel) -> str:
    """Register ``kernel`` under a fresh backend name (the check is cached per name)."""
    name = f"test-{type(kernel).__name__.lower()}-{next(_names)}"
    register_kernel(name, lambda: kernel)
    return name
