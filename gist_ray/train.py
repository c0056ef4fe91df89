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
from gist_ray.config import SELF, Config, validate_loss_for
from gist_ray.data import TrainingSet, load_training_sets
from gist_ray.distributed import is_distributed, rank, world_size
from gist_ray.gradcache import backward_with_replay, embed_without_graph
from gist_ray.lora import prepare_student
from gist_ray.loss import GistLoss
from gist_ray.models import (
    Encoder,
    ModelSpec,
    check_prompt_columns,
    column_prompts,
    describe,
    guide_spec,
    load_encoder,
    own_prompts,
    saved_prompts,
)
from gist_ray.optim import build_optimizer, build_scheduler
from gist_ray.progress import StepLog
from gist_ray.self_guide import SelfGuide
from gist_ray.training_eval import TrainingEval, eval_due

log = logging.getLogger(__name__)

# A step's guide embeddings, given its dataset, row indices and texts (one list per column).
GuideFn = Callable[[int, list[int], list[list[str]]], list[torch.Tensor]]


def train_worker(
    cfg: Config,
    reporter: Reporter,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    guide_caches: list[str] | None = None,
) -> dict[str, Any]:
    """Train on this worker; rank 0 logs to MLflow and writes checkpoints. Returns a summary.
    ``guide_caches``: the datasets' guide cache folders the driver prepared (None: load or
    build them here)."""
    device = worker_device(cfg)
    seed_everything(cfg.train.seed + rank())  # per-rank dropout streams, reproducible
    sets = load_training_sets(cfg)
    student = load_encoder(ModelSpec.student(cfg), device)
    prepare_student(student, cfg)  # LoRA adapters, gradient checkpointing
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
    # Every eval.every steps a checkpoint is validated beside training (Ray Train's validation,
    # no barrier); without Ray rank 0 evaluates in line and keeps the best model.
    validates = getattr(reporter, "validates", False)
    evaluator = None
    if rank() == 0 and cfg.eval.source and cfg.eval.every and not validates:
        evaluator = TrainingEval(cfg, state.run_id)
    loss_fn = GistLoss.from_config(cfg.loss, gather=is_distributed())
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
    losses: list[float] = []  # this session's per-step losses, returned for tests and tools
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
        losses.append(metrics["loss"])
        step_log.step(state, metrics)
        validate = validates and eval_due(cfg, state.step, total)
        if eval_due(cfg, state.step, total) and not validates:  # before the checkpoint
            if evaluator is not None:
                scores = evaluator(student, state.step)
                step_log.add(state, {f"eval/{k}": v for k, v in scores.items()})
            if is_distributed():
                dist.barrier()  # the other ranks wait for rank 0's eval
        if checkpointer.due(state.step, total) or validate:
            report = {"step": state.step, "loss": metrics["loss"]}
            checkpointer.save(state, student, report, validate=validate)
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
    check_prompt_columns(cfg.model.prompts, "model.prompts", {s.name: s.columns for s in sets})
    out = []
    for s in sets:
        setting = cfg.model.prompts
        if s.spec.prompts is not None:
            setting = s.spec.prompts
            check_prompt_columns(setting, f"{s.spec.key}.prompts", {s.name: s.columns})
        by_col = column_prompts(setting, s.name, s.columns, own)
        out.append([by_col.get(c, "") for c in s.columns])
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
    )
    out.margin, out.margin_strategy = float("-inf"), "absolute"
    return out


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
    """The frozen guide (eval mode, no gradient) on ``device``; with ``model.guide: self`` the
    student as loaded (the student at step 0: a fresh LoRA adapter changes nothing)."""
    return load_encoder(guide_spec(cfg), device, frozen=True)


def make_self_guide(cfg: Config, student: Encoder) -> SelfGuide | None:
    """With ``model.guide: self``, the student's copy that guides it (before any checkpoint is
    restored: the frozen guide is the student at step 0, the EMA starts there)."""
    if cfg.model.guide != SELF:
        return None
    m = cfg.model
    log.info(
        "guide: the student itself (%s)",
        f"EMA, decay {m.self_guide_decay}" if m.self_guide == "ema" else "frozen at step 0",
    )
    return SelfGuide(student, m.self_guide, m.self_guide_decay)


def guide_prompts(cfg: Config, sets: list[TrainingSet]) -> list[dict[str, str]]:
    """Per dataset, the guide's prompt of each column: ``model.guide_prompts``, else the guide's
    own (read from its folder, so a cache hit needs no guide)."""
    from gist_ray.assets import resolve_model_path

    spec = guide_spec(cfg)
    if cfg.model.guide == SELF:  # the student's prompts
        own = saved_prompts(resolve_model_path(spec.name), spec.revision)
        by_col = student_prompts(cfg, sets, own)
        return [{c: p for c, p in zip(s.columns, ps) if p} for s, ps in zip(sets, by_col)]
    own = own_prompts(saved_prompts(resolve_model_path(spec.name), spec.revision))
    setting = cfg.model.guide_prompts
    check_prompt_columns(setting, "model.guide_prompts", {s.name: s.columns for s in sets})
    return [column_prompts(setting, s.name, s.columns, own) for s in sets]


def guide_source(
    cfg: Config,
    sets: list[TrainingSet],
    device: torch.device,
    guide_caches: list[str] | None = None,
    self_guide: SelfGuide | None = None,
) -> GuideFn:
    """Where a step's guide embeddings come from: the guide cache, memory-mapped (the folders in
    ``guide_caches``, else loaded or built here), or a guide forward every step when
    ``data.guide_cache`` is off or the guide is an EMA of the student."""
    prompts = guide_prompts(cfg, sets)
    live = self_guide is not None and self_guide.live
    if cfg.data.guide_cache and live:
        log.info("model.self_guide = ema changes the guide every step: no guide cache, live guide")
    if cfg.data.guide_cache and not live:
        from gist_ray.guide_cache import GuideCache

        folders = guide_caches or local_guide_cache(cfg, sets, prompts)
        caches = [GuideCache(f, s.rows) for f, s in zip(folders, sets)]
        return lambda d, idx, _columns: [caches[d].embeddings(c, idx) for c in sets[d].columns]
    guide = self_guide.encoder if self_guide is not None else load_guide(cfg, device)

    def live(d: int, _idx: list[int], columns: list[list[str]]) -> list[torch.Tensor]:
        return live_guide_embeddings(guide, columns, [prompts[d].get(c) for c in sets[d].columns])

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
    spec = guide_spec(cfg)
    settings: dict[str, object] = {
        "revision": spec.revision,
        "model_kwargs": spec.model_kwargs,
        "pooling": spec.pooling or "own",
        "max_seq_length": spec.max_seq_length or "own",
    }
    if cfg.model.guide == SELF:  # the student at step 0
        settings["self_guide"] = cfg.model.self_guide
    return settings


def local_guide_cache(
    cfg: Config, sets: list[TrainingSet], prompts: list[dict[str, str]]
) -> list[str]:
    """The guide cache folders, loaded or built without Ray (``torchrun``, one process): rank 0
    embeds the missing shards in its own process, the other ranks wait, then all open them."""
    from gist_ray import guide_cache
    from gist_ray.guide_embed import run_local

    folders = [None] * len(sets)
    if rank() == 0:
        folders = guide_cache.ensure(cfg, sets, prompts, run_local)
    if is_distributed():
        dist.broadcast_object_list(folders, src=0)
    return folders
