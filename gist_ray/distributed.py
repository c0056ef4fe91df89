"""Plain torch.distributed helpers (no Ray): rank queries and an all-gather that keeps gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; the backward pass sums each rank's slice of
    the incoming gradient over all ranks (a reduce-scatter) and hands it back to its owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no reduce_scatter
        r = dist.get_rank()
        return grad[r * ctx.rows : (r + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) along dim 0; identity on a single process."""
    if not is_distributed():
        return x
    if not x.requires_grad:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)
    return _AllGather.apply(x)
