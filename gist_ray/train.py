"""The per-worker training function: plain torch.distributed, no Ray.

:func:`train_worker` runs on every worker (Ray's TorchTrainer calls it through
:mod:`gist_ray.launcher`; it also runs under ``torchrun`` or as a single process). The global
batch is split evenly; the loss gathers candidates across workers so each query sees the global
pool; gradients are averaged across workers by an explicit all-reduce.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gist_ray import faults
from gist_ray.batches import GlobalBatches
from gist_ray.checkpoint import Checkpointer, Reporter, TrainState
from gist_ray.config import Config, validate_loss_for
from gist_ray.data import TrainingSet, load_training_sets
from gist_ray.distributed import is_distributed, rank, world_size
from gist_ray.gradcache import backward_with_replay, embed_without_graph
from gist_ray.loss import GistLoss
from gist_ray.models import (
    Encoder,
    ModelSpec,
    check_prompt_columns,
    column_prompts,
    describe,
    load_encoder,
    own_prompts,
    saved_prompts,
)
from gist_ray.optim import build_optimizer, build_scheduler
from gist_ray.progress import StepLog
from gist_ray.training_eval import TrainingEval, eval_due

log = logging.getLogger(__name__)

# A step's guide embeddings, given its dataset, row indices and texts (one list per column).
GuideFn = Callable[[int, list[int], list[list[str]]], list[torch.Tensor]]


def train_worker(
    cfg: Config, reporter: Reporter, run_id: str | None = None, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Train on this worker; rank 0 logs to MLflow and writes checkpoints. Returns a summary."""
    device = worker_device(cfg)
    seed_everything(cfg.train.seed + rank())  # per-rank dropout streams, reproducible
    sets = load_training_sets(cfg)
    student = load_encoder(ModelSpec.student(cfg), device)
    student.train()
    validate_loss_for(cfg, student.dim, max(len(s.texts) - 2 for s in sets))
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
    guide = guide_source(cfg, sets, device)
    batches = GlobalBatches.for_config(cfg, sets)
    total = batches.total_steps(cfg)

    opt = build_optimizer(student, cfg.train)
    state = TrainState(opt, build_scheduler(opt, cfg.train, total), run_id)
    checkpointer = Checkpointer(cfg, reporter)
    checkpointer.restore(state, student)
    step_log = StepLog(cfg, state, total, tracking_uri)
    evaluator = None  # rank 0 evaluates every eval.every steps and keeps the best model
    if rank() == 0 and cfg.eval.source and cfg.eval.every:
        evaluator = TrainingEval(cfg, state.run_id)
    loss_fn = GistLoss.from_config(cfg.loss, gather=is_distributed())

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
    losses: list[float] = []  # this session's per-step losses, returned for tests and tools
    while state.step < total:
        t0 = time.perf_counter()
        d, idx = batches.local(state.step, rank(), world_size())
        texts = sets[d].texts
        columns = [[texts[c][i] for i in idx] for c in texts]
        metrics = optimizer_step(
            cfg, student, loss_fn, state, columns, guide(d, idx, columns), prompts[d]
        )
        dt = time.perf_counter() - t0
        metrics.update(samples_per_s=cfg.train.batch_size / dt, step_time_s=dt)
        if len(sets) > 1:  # which dataset this step trained on, and its loss
            metrics[f"loss/{metric_safe(sets[d].name)}"] = metrics["loss"]
        losses.append(metrics["loss"])
        step_log.step(state, metrics)
        if eval_due(cfg, state.step, total):  # before the checkpoint, which flushes the metrics
            if evaluator is not None:
                scores = evaluator(student, state.step)
                step_log.add(state, {f"eval/{k}": v for k, v in scores.items()})
            if is_distributed():
                dist.barrier()  # the other ranks wait for rank 0's eval
        if checkpointer.due(state.step, total):
            checkpointer.save(state, student, {"step": state.step, "loss": metrics["loss"]})
            step_log.committed(state)
        faults.maybe_fail(cfg.output_dir, rank(), state.step)  # test-only; no-op unless asked
    return {
        "steps": state.step,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "run_id": state.run_id,
        "world_size": world_size(),
        "pid": os.getpid(),
    }


def metric_safe(name: str) -> str:
    """A dataset name as MLflow accepts it in a metric name."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)


def student_prompts(
    cfg: Config, sets: list[TrainingSet], model_prompts: dict[str, str]
) -> list[list[str]]:
    """Per dataset, the student's prompt of each column in loss order ("" = none): the
    dataset's own ``prompts``, else ``model.prompts``, else the model's own (``model_prompts``,
    its prompts by name). A prompt for a column the data lacks is a ConfigError."""
    own = own_prompts(model_prompts)
    check_prompt_columns(cfg.model.prompts, "model.prompts", {s.name: list(s.texts) for s in sets})
    out = []
    for s in sets:
        setting = cfg.model.prompts
        if s.spec.prompts is not None:
            setting = s.spec.prompts
            check_prompt_columns(setting, f"{s.spec.key}.prompts", {s.name: list(s.texts)})
        by_col = column_prompts(setting, s.name, list(s.texts), own)
        out.append([by_col.get(c, "") for c in s.texts])
    return out


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
    under gradient caching (see gist_ray.gradcache)."""
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_device(cfg: Config) -> torch.device:
    """This worker's GPU when ``ray.use_gpu`` (Ray sets the visible device), else the CPU."""
    if cfg.ray.use_gpu and torch.cuda.is_available():
        return torch.device(f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- the guide


def load_guide(cfg: Config, device: torch.device) -> Encoder:
    """The frozen guide (eval mode, no gradient) on ``device``."""
    return load_encoder(ModelSpec.guide(cfg), device, frozen=True)


def guide_prompts(cfg: Config, sets: list[TrainingSet]) -> list[dict[str, str]]:
    """Per dataset, the guide's prompt of each column: ``model.guide_prompts``, else the guide's
    own (read from its folder, so a cache hit needs no guide)."""
    from gist_ray.assets import resolve_model_path

    spec = ModelSpec.guide(cfg)
    own = own_prompts(saved_prompts(resolve_model_path(spec.name), spec.revision))
    setting = cfg.model.guide_prompts
    check_prompt_columns(setting, "model.guide_prompts", {s.name: list(s.texts) for s in sets})
    return [column_prompts(setting, s.name, list(s.texts), own) for s in sets]


def guide_source(cfg: Config, sets: list[TrainingSet], device: torch.device) -> GuideFn:
    """Where a step's guide embeddings come from: the guide cache (built or loaded now), or a
    guide forward every step when ``data.guide_cache`` is off."""
    prompts = guide_prompts(cfg, sets)
    if cfg.data.guide_cache:
        caches = build_guide_cache(cfg, sets, prompts, device)
        return lambda d, idx, _columns: [caches[d][c][idx] for c in sets[d].texts]
    guide = load_guide(cfg, device)

    def live(d: int, _idx: list[int], columns: list[list[str]]) -> list[torch.Tensor]:
        return live_guide_embeddings(guide, columns, [prompts[d].get(c) for c in sets[d].texts])

    return live


def live_guide_embeddings(
    guide: Encoder, columns: list[list[str]], prompts: list[str | None] | None = None
) -> list[torch.Tensor]:
    """The guide forward of one step, used when the guide cache is off."""
    prompts = prompts or [None] * len(columns)
    with torch.no_grad():
        return [guide.embed(texts, p).float() for texts, p in zip(columns, prompts)]


def guide_settings(cfg: Config) -> dict[str, object]:
    """The guide's settings that, with its files and the prompts, fix its embeddings."""
    spec = ModelSpec.guide(cfg)
    return {
        "revision": spec.revision,
        "model_kwargs": spec.model_kwargs,
        "pooling": spec.pooling or "own",
        "max_seq_length": spec.max_seq_length or "own",
    }


def build_guide_cache(
    cfg: Config, sets: list[TrainingSet], prompts: list[dict[str, str]], device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Load or build (on every worker, sharded) the guide embeddings of every dataset's texts;
    the guide itself is loaded only when a cache must be built, and only once."""
    from gist_ray import guide_cache
    from gist_ray.assets import cache_root, resolve_model_path

    loaded: list[Encoder] = []

    def guide_once() -> Encoder:
        if not loaded:
            loaded.append(load_guide(cfg, device))
        return loaded[0]

    out = []
    for s, p in zip(sets, prompts):
        t0 = time.perf_counter()
        tensors, path, built = guide_cache.get_or_build(
            guide_once,
            s.spec.source,
            resolve_model_path(cfg.model.guide),
            guide_settings(cfg),
            s.texts,
            p,
            cache_root(),
        )
        verb = "built" if built else "loaded"
        log.info("guide cache of %r %s in %.1fs: %s", s.name, verb, time.perf_counter() - t0, path)
        out.append(tensors)
    return out


def cache_guide_worker(cfg: Config) -> dict[str, Any]:
    """``gist-ray cache-guide`` on one worker: embed this worker's shard of the training texts
    with the guide; rank 0 writes the cache files. No training."""
    sets = load_training_sets(cfg)
    caches = build_guide_cache(cfg, sets, guide_prompts(cfg, sets), worker_device(cfg))
    return {"rows": sum(s.rows for s in sets), "columns": [list(c) for c in caches]}
