"""The optimizer and learning-rate schedule: AdamW, linear warm-up to ``train.lr``, then linear
decay to zero at the last step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from gist_ray.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Only what trains: with LoRA the frozen base weights get no optimizer state.
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """The schedule's multiplier of the peak learning rate at each step."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = math.ceil(cfg.warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total))
