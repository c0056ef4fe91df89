"""One worker's forward and backward, and the gradient average across workers: the part of a
training step that needs only torch, the student and the loss (no data loading, no datasets,
no Ray), so benchmarks/gpu_check runs the very step training runs on a machine without them."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from gist_ray.core.distributed import is_distributed, world_size
from gist_ray.loss import GistLoss
from gist_ray.models.encoder import Encoder
from gist_ray.train.gradcache import backward_with_replay, embed_without_graph


def training_step(
    student: Encoder,
    loss_fn: GistLoss,
    columns: list[list[str]],
    guide_emb: list[torch.Tensor],
    mini_batch_size: int = 0,
    prompts: list[str] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward and backward on this worker's rows (no optimizer step). ``columns`` holds the
    anchor, positive and negative texts, ``guide_emb`` their guide embeddings, ``prompts`` the
    student's prompt per column ("" or None = none). With ``mini_batch_size`` the student runs
    under gradient caching (see gist_ray.train.gradcache)."""
    device = student.device
    prompts = prompts or [""] * len(columns)
    autocast = partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )
    if mini_batch_size:
        cached = [
            embed_without_graph(student, t, mini_batch_size, autocast, p or None)
            for t, p in zip(columns, prompts)
        ]
        emb = [c.embeddings for c in cached]
    else:
        with autocast():
            emb = [student.embed(texts, p or None) for texts, p in zip(columns, prompts)]
    loss, stats = loss_fn(emb, [g.to(device) for g in guide_emb])
    loss.backward()
    if mini_batch_size:
        for column in cached:
            backward_with_replay(student, column, mini_batch_size, autocast)
    return loss.detach(), stats


def average_gradients(model: torch.nn.Module) -> None:
    """Average parameter gradients over workers (what DDP does, kept explicit: it must also
    work with gradient caching's several backward passes)."""
    if not is_distributed():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
