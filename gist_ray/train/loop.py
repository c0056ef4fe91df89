"""The per-worker training function: plain torch.distributed, no Ray.

:func:`train_worker` runs on every worker (Ray's TorchTrainer calls it through
:mod:`gist_ray.launch.trainer`; it also runs under ``torchrun`` or as a single process). The global
batch is split evenly; the loss gathers candidates across workers so each query sees the global
pool; gradients are averaged across workers by an explicit all-reduce.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gist_ray.config import Config, validate_loss_for
from gist_ray.core.distributed import is_distributed, rank, world_size
from gist_ray.data.batches import GlobalBatches
from gist_ray.data.training import load_training_sets
from gist_ray.guide.source import guide_source, make_self_guide
from gist_ray.loss import GistLoss
from gist_ray.models.encoder import Encoder, describe, load_encoder
from gist_ray.models.lora import prepare_student
from gist_ray.models.prompts import student_prompts
from gist_ray.models.spec import ModelSpec
from gist_ray.train.checkpoint import Checkpointer, Reporter, TrainState
from gist_ray.train.evaluation import eval_due
from gist_ray.train.loss_choice import LossTarget, worker_loss
from gist_ray.train.optim import build_optimizer, build_scheduler
from gist_ray.train.progress import StepLog
from gist_ray.train.step import average_gradients, training_step

log = logging.getLogger(__name__)

# Called after every optimizer step with the step number and its metrics (train_worker's on_step).
StepHook = Callable[[int, dict[str, float]], None]


def train_worker(
    cfg: Config,
    reporter: Reporter,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    guide_caches: list[str] | None = None,
    on_step: StepHook | None = None,
    loss_target: LossTarget | None = None,
) -> dict[str, Any]:
    """Train on this worker; rank 0 logs to MLflow and writes checkpoints. Returns a summary.
    ``guide_caches``: the datasets' guide cache folders the driver prepared (None: load or
    build them here). ``on_step(step, metrics)`` is called after every optimizer step, once the
    step's checkpoint (if any) is written: how callers watch the run (per-step losses, fault
    injection) without the loop knowing them. ``loss_target``: what the loss's dtype and backend
    are decided for (None: this worker's device; see gist_ray.train.loss_choice)."""
    device = worker_device(cfg)
    seed_everything(cfg.train.seed + rank())  # per-rank dropout streams, reproducible
    sets = load_training_sets(cfg)
    student = load_encoder(ModelSpec.student(cfg), device)
    prepare_student(student.model, cfg)  # LoRA adapters, gradient checkpointing
    student.train()
    validate_loss_for(cfg, student.dim, max(len(s.columns) - 2 for s in sets))
    d = describe(student)
    log.info(
        "student %s: %s (pooling %s), dim %d, max length %s (training truncation %s), prompts %s",
        cfg.model.student,
        " -> ".join(d["modules"]),
        d["pooling"],
        d["dim"],
        d["max_seq_length"],
        d["train_max_seq_length"],
        d["prompts"] or "none",
    )
    prompts = student_prompts(cfg, sets, student.model.prompts)
    self_guide = make_self_guide(cfg, student)  # None unless model.guide: self
    guide = guide_source(cfg, sets, device, guide_caches, self_guide)
    batches = GlobalBatches.for_config(cfg, sets)
    total = batches.total_steps(cfg)

    opt = build_optimizer(student, cfg.train)
    state = TrainState(opt, build_scheduler(opt, cfg.train, total), run_id)
    if self_guide is not None and self_guide.live:
        state.parts["self_guide"] = self_guide  # the EMA weights go into every checkpoint
    checkpointer = Checkpointer(cfg, reporter)
    checkpointer.restore(state, student)
    step_log = StepLog(cfg, state, total, tracking_uri)
    loss_fn = worker_loss(
        cfg, device, student.dim, step_log, gather=is_distributed(), target=loss_target
    )
    warmup_loss = unmasked(loss_fn)

    log.info(
        "training %d steps, global batch %d (%d worker(s) x %d), %d rows in %d dataset(s), "
        "device %s",
        total,
        cfg.train.batch_size,
        world_size(),
        cfg.train.batch_size // world_size(),
        batches.num_rows,
        len(sets),
        device,
    )
    final_loss = None
    while state.step < total:
        t0 = time.perf_counter()
        d, idx = batches.local(state.step, rank(), world_size())
        columns = sets[d].texts_at(idx)  # read on demand from the memory-mapped data
        step_loss = warmup_loss if state.step < cfg.train.guide_warmup_steps else loss_fn
        metrics = optimizer_step(
            cfg, student, step_loss, state, columns, guide(d, idx, columns), prompts[d]
        )
        if self_guide is not None:
            self_guide.update()
        dt = time.perf_counter() - t0
        metrics.update(samples_per_s=cfg.train.batch_size / dt, step_time_s=dt)
        if len(sets) > 1:  # which dataset this step trained on, and its loss
            metrics[f"loss/{metric_safe(sets[d].name)}"] = metrics["loss"]
        final_loss = metrics["loss"]
        step_log.step(state, metrics)
        # Every eval.every steps a checkpoint is validated by the reporter (Ray Train's
        # validation beside training, or the local reporter's validator on rank 0).
        validate = eval_due(cfg, state.step, total)
        if checkpointer.due(state.step, total) or validate:
            report = {"step": state.step, "loss": metrics["loss"]}
            checkpointer.save(state, student, report, validate=validate)
            step_log.committed(state)
        if on_step is not None:
            on_step(state.step, metrics)
    checkpointer.close()
    return {
        "steps": state.step,
        "final_loss": final_loss,
        "run_id": state.run_id,
        "world_size": world_size(),
        "pid": os.getpid(),
    }


def metric_safe(name: str) -> str:
    """A dataset name as MLflow accepts it in a metric name."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)


def optimizer_step(
    cfg: Config,
    student: Encoder,
    loss_fn: GistLoss,
    state: TrainState,
    columns: list[list[str]],
    guide_emb: list[torch.Tensor],
    prompts: list[str] | None = None,
) -> dict[str, float]:
    """One step: forward/backward, gradients averaged over workers, clipped, applied."""
    state.optimizer.zero_grad(set_to_none=True)
    loss, stats = training_step(
        student, loss_fn, columns, guide_emb, cfg.train.mini_batch_size, prompts
    )
    average_gradients(student)
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    widths = {k: v for k, v in stats.items() if k.startswith("loss/dim_")}
    if is_distributed():  # the loss, and each Matryoshka width's, over every worker's rows
        dist.all_reduce(loss)
        loss /= world_size()
        for v in widths.values():
            dist.all_reduce(v)
            v /= world_size()
    return {
        "loss": loss.item(),
        "lr": lr,
        "grad_norm": float(grad_norm),
        **{k: float(v) for k, v in stats.items()},
    }


def unmasked(loss_fn: GistLoss) -> GistLoss:
    """The same loss with nothing masked: plain InfoNCE over the same candidates, for the guide
    warm-up. GistLoss has no switch for it: an absolute margin of -inf puts every row's mask
    limit at +inf, which no guide similarity exceeds (on every backend: ``g > limit`` is false,
    the kernels' ``g <= limit`` true)."""
    out = GistLoss(
        temperature=loss_fn.temperature,
        contrast_anchors=loss_fn.contrast_anchors,
        contrast_positives=loss_fn.contrast_positives,
        backend=loss_fn.backend,
        gather=loss_fn.gather,
        compute_dtype=loss_fn.compute_dtype,
    )
    out.margin, out.margin_strategy = float("-inf"), "absolute"
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_device(cfg: Config) -> torch.device:
    """This worker's GPU when ``ray.use_gpu`` (Ray sets the visible device), else the CPU."""
    if cfg.ray.use_gpu and torch.cuda.is_available():
        return torch.device(f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")
