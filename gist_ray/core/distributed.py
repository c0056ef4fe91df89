"""Plain torch.distributed helpers (no Ray): rank queries and an all-gather with gradient.

The global pool of the GIST loss (docs/loss.md) all-gathers every candidate set with gradient.
The backward of an all-gather is a reduce-scatter: rank r gets the sum over ranks of the
gradient rows that came from it. Where the backend has a real reduce-scatter (NCCL) it is used;
gloo has none (its ``reduce_scatter_tensor`` is an all-reduce in disguise, twice the traffic),
so there an all-to-all moves each rank's block once and the owner sums the W blocks, the way
``torch.distributed.nn.functional.all_gather`` does it for backends without reduce-scatter.
Both send (W-1)/W of the gathered gradient per rank, where an all-reduce sends about twice that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the single-tensor collectives (the old names warn); torch < 2.13 has only
# the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# How the gather's backward reduces: "auto" (reduce-scatter, except all-to-all on gloo, which
# has no reduce-scatter), "reduce_scatter" or "all_to_all".
GATHER_BACKWARDS = ("auto", "reduce_scatter", "all_to_all")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous())
    return out


def reduce_scatter_rows(grad: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Row block ``rank`` of the sum over ranks of ``grad`` (``[world * b, ...]`` on every rank).

    Summation order is fixed per rank (NCCL: its ring; all-to-all: rank 0 first), so the result
    is the same on every run."""
    world, grad = dist.get_world_size(), grad.contiguous()
    rows = grad.shape[0] // world
    if mode not in GATHER_BACKWARDS:
        raise ValueError(f"gather backward {mode!r}: one of {', '.join(GATHER_BACKWARDS)}")
    if mode == "auto":
        mode = "all_to_all" if dist.get_backend() == dist.Backend.GLOO else "reduce_scatter"
    if mode == "reduce_scatter":
        out = grad.new_empty((rows, *grad.shape[1:]))
        _reduce_scatter_single(out, grad)
        return out
    blocks = torch.empty_like(grad)  # block r: rank r's gradient for this rank's rows
    dist.all_to_all_single(blocks, grad)
    return blocks.view(world, rows, *grad.shape[1:]).sum(0)


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward: :func:`reduce_scatter_rows`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mode: str) -> torch.Tensor:
        ctx.mode = mode
        return _gather_rows(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return reduce_scatter_rows(grad, ctx.mode), None


def all_gather_with_grad(x: torch.Tensor, backward: str = "auto") -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) along dim 0; identity on a single process."""
    if not is_distributed():
        return x
    if not x.requires_grad:
        return _gather_rows(x)
    return _AllGather.apply(x, backward)
