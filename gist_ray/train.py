"""The per-worker training function: plain torch.distributed, no Ray.

``train_worker`` runs on every worker (Ray's TorchTrainer calls it through
:mod:`gist_ray.launcher`; it also runs under ``torchrun`` or as a single process). The global
batch is split evenly; the loss gathers candidates across workers so each query sees the global
pool; gradients are averaged across workers by an explicit all-reduce.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from gist_ray import checkpoint as ckpt
from gist_ray import faults
from gist_ray.config import Config
from gist_ray.distributed import is_distributed, rank, world_size
from gist_ray.evaluate import eval_due
from gist_ray.gradcache import backward_with_replay, embed_without_graph
from gist_ray.loss import gist_loss
from gist_ray.models import Encoder, load_encoder

STAGING = "checkpoints-staging"  # rank 0 builds checkpoints here before reporting them


class Reporter(Protocol):
    """Where a worker sends metrics and checkpoints (Ray Train, or a local folder)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...


class LocalReporter:
    """Keeps the latest checkpoint under ``<output_dir>/checkpoints`` (runs without Ray)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir) / "checkpoints"

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir and rank() == 0:
            target = self.root / Path(checkpoint_dir).name
            if Path(checkpoint_dir).resolve() != target.resolve():
                # Copy beside the target, then rename: a crash never leaves a partial checkpoint.
                tmp = target.with_name(f".{target.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(checkpoint_dir, tmp)
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)

    def latest_checkpoint(self) -> str | None:
        found = sorted(self.root.glob("checkpoint-*")) if self.root.is_dir() else []
        return str(found[-1]) if found else None


@dataclass
class GlobalBatches:
    """Deterministic global batches: a seeded permutation per epoch, cut into global batches;
    each worker takes its contiguous slice. A step number alone fixes the data position."""

    num_rows: int
    batch_size: int
    seed: int
    _perm_cache: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def local_indices(self, step: int, rank: int, world: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm_cache = {epoch: torch.randperm(self.num_rows, generator=g)}
        rows = self._perm_cache[epoch][pos * self.batch_size : (pos + 1) * self.batch_size]
        b = self.batch_size // world
        return rows[rank * b : (rank + 1) * b].tolist()


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak, then linear decay to zero."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _average_gradients(model: torch.nn.Module) -> None:
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


def live_guide_embeddings(guide: Encoder, columns: list[list[str]]) -> list[torch.Tensor]:
    """The guide forward of one step, used when the guide cache is off."""
    with torch.no_grad():
        return [guide.embed(texts).float() for texts in columns]


def training_step(
    cfg: Config,
    student: Encoder,
    guide_emb: list[torch.Tensor],
    columns: list[list[str]],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward/backward on this worker's rows (no optimizer step). ``columns`` holds the
    anchor, positive and negative texts; ``guide_emb`` their guide embeddings. With
    ``train.mini_batch_size`` the student runs under gradient caching (see gist_ray.gradcache)."""
    lc, mini = cfg.loss, cfg.train.mini_batch_size
    autocast = partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    )
    if mini:
        cached = [embed_without_graph(student, texts, mini, autocast) for texts in columns]
        emb = [c.embeddings for c in cached]
    else:
        with autocast():
            emb = [student.embed(texts) for texts in columns]
    guide_emb = [g.to(device) for g in guide_emb]
    loss, stats = gist_loss(
        emb[0],
        emb[1],
        guide_emb[0],
        guide_emb[1],
        emb[2:],
        guide_emb[2:],
        temperature=lc.temperature,
        margin=lc.margin,
        margin_strategy=lc.margin_strategy,
        contrast_anchors=lc.contrast_anchors,
        contrast_positives=lc.contrast_positives,
        backend=lc.backend,
        gather=is_distributed(),
        return_stats=True,
    )
    loss.backward()
    if mini:
        for column in cached:
            backward_with_replay(student, column, mini, autocast)
    return loss.detach(), stats


def worker_device(cfg: Config) -> torch.device:
    """This worker's GPU when ``ray.use_gpu`` (Ray sets the visible device), else the CPU."""
    if cfg.ray.use_gpu and torch.cuda.is_available():
        return torch.device(f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")


def load_text_columns(cfg: Config) -> dict[str, list[str]]:
    """The training texts by column: anchor, positive, negative_1..k."""
    from gist_ray.data import load_pairs

    data = load_pairs(
        cfg.data.train, cfg.data.columns or None, cfg.data.max_examples or None, seed=cfg.train.seed
    )
    negatives = sorted(
        (c for c in data.column_names if c.startswith("negative_")), key=lambda c: int(c[9:])
    )
    return {c: data[c] for c in ["anchor", "positive", *negatives]}


def guide_loader(cfg: Config, device: torch.device) -> Callable[[], Encoder]:
    """Loads the frozen guide on demand (not at all when the guide cache is warm)."""

    def load() -> Encoder:
        guide = load_encoder(
            cfg.model.guide,
            cfg.model.guide_pooling,
            cfg.model.max_seq_length,
            frozen=True,
            key="model.guide",
        )
        return guide.to(device)

    return load


def build_guide_cache(
    cfg: Config, text_columns: dict[str, list[str]], load_guide
) -> dict[str, torch.Tensor]:
    """Load or build (on every worker, sharded) the guide embeddings of all training texts."""
    from gist_ray import guide_cache
    from gist_ray.assets import cache_root, resolve_model_path

    t0 = time.perf_counter()
    tensors, path, built = guide_cache.get_or_build(
        load_guide,
        cfg.data.train,
        resolve_model_path(cfg.model.guide),
        cfg.model.guide_pooling,
        cfg.model.max_seq_length,
        text_columns,
        cache_root(),
    )
    if rank() == 0:
        verb = "built" if built else "loaded"
        print(
            f"[gist-ray] guide cache {verb} in {time.perf_counter() - t0:.1f}s: {path}",
            flush=True,
        )
    return tensors


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def train_worker(
    cfg: Config, reporter: Reporter, run_id: str | None = None, tracking_uri: str | None = None
) -> dict[str, Any]:
    """Train on this worker; rank 0 logs to MLflow and writes checkpoints. Returns a summary."""
    r, world = rank(), world_size()
    device = worker_device(cfg)
    seed_everything(cfg.train.seed + r)  # per-rank dropout streams, reproducible
    text_columns = load_text_columns(cfg)
    names = list(text_columns)
    num_rows = len(text_columns["anchor"])

    student = load_encoder(cfg.model.student, cfg.model.pooling, cfg.model.max_seq_length)
    student.to(device).train()

    load_guide = guide_loader(cfg, device)
    guide, guide_cache = None, None
    if cfg.data.guide_cache:
        guide_cache = build_guide_cache(cfg, text_columns, load_guide)
    else:
        guide = load_guide()

    batches = GlobalBatches(num_rows, cfg.train.batch_size, cfg.train.seed)
    if batches.steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size = {cfg.train.batch_size} is larger than the dataset "
            f"({num_rows} rows)"
        )
    steps = total_steps(cfg, batches.steps_per_epoch)
    opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    warmup = math.ceil(cfg.train.warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    identity = ckpt.identity(cfg)

    step = 0
    pending: list = []  # checkpointed steps' metrics that may not have reached MLflow yet
    if r == 0:  # a worker killed mid-save leaves a half-written folder here
        shutil.rmtree(Path(cfg.output_dir) / STAGING, ignore_errors=True)
    latest = reporter.latest_checkpoint()
    if latest:
        from transformers import AutoModel

        model_dir, state = ckpt.load_checkpoint(latest, identity)
        student.model.load_state_dict(AutoModel.from_pretrained(model_dir).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        run_id = run_id or state.get("mlflow_run_id")
        pending = state.get("pending_metrics", [])
        if len(state["rng"]) != world:
            print(
                f"[gist-ray] note: checkpoint has {len(state['rng'])} RNG states for {world} "
                "workers; dropout will not replay exactly",
                flush=True,
            )
        # Each rank continues its own dropout stream (the data order is fixed by the step).
        ckpt.set_rng_state(state["rng"][r % len(state["rng"])])
        if r == 0:
            print(f"[gist-ray] resumed from {latest} at step {step}/{steps}", flush=True)

    logger = None
    if r == 0 and run_id and tracking_uri:
        from gist_ray.tracking import StepLogger

        logger = StepLogger(tracking_uri, run_id)
        logger.resume(pending)  # steps committed before a crash that never reached MLflow

    def checkpoint(metrics: dict[str, float]) -> None:
        # Every rank's RNG state goes into the checkpoint so a resumed run replays dropout.
        states = [None] * world
        if is_distributed():
            dist.all_gather_object(states, ckpt.rng_state())
        else:
            states = [ckpt.rng_state()]
        path = None
        if r == 0:
            path = str(
                ckpt.save_checkpoint(
                    Path(cfg.output_dir) / STAGING / f"checkpoint-{step:07d}",
                    student,
                    {
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "step": step,
                        "rng": states,
                        "mlflow_run_id": run_id,
                        "pending_metrics": logger.pending if logger else [],
                        "identity": identity,
                        "config": cfg.to_dict(),
                    },
                )
            )
        reporter.report(metrics, path)  # returns once the checkpoint is committed
        if logger:  # only now: a restart can no longer replay (and re-log) these steps
            logger.flush()

    evaluator = None  # eval.every: rank 0 evaluates, logs eval/* per step, keeps the best model
    if r == 0 and cfg.eval.source and cfg.eval.every:
        from gist_ray.evaluate import TrainingEval

        evaluator = TrainingEval(cfg, logger, run_id)

    local_b = cfg.train.batch_size // world
    t_start, step_at_start = time.perf_counter(), step
    metrics: dict[str, float] = {}
    losses: list[float] = []  # this session's per-step losses, returned for tests and tools
    if r == 0:
        print(
            f"[gist-ray] training {steps} steps, global batch {cfg.train.batch_size} "
            f"({world} worker(s) x {local_b}), {num_rows} rows, device {device}",
            flush=True,
        )
    while step < steps:
        t0 = time.perf_counter()
        idx = batches.local_indices(step, r, world)
        columns = [[text_columns[c][i] for i in idx] for c in names]
        opt.zero_grad(set_to_none=True)
        if guide_cache is not None:
            guide_emb = [guide_cache[c][idx] for c in names]
        else:
            guide_emb = live_guide_embeddings(guide, columns)
        loss, stats = training_step(cfg, student, guide_emb, columns, device)
        _average_gradients(student)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        step += 1
        if is_distributed():
            dist.all_reduce(loss)
            loss /= world
        dt = time.perf_counter() - t0
        metrics = {
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples_per_s": cfg.train.batch_size / dt,
            "step_time_s": dt,
            **{k: v for k, v in stats.items()},
        }
        losses.append(metrics["loss"])
        if r == 0 and (step % cfg.train.log_every == 0 or step == steps):
            elapsed = time.perf_counter() - t_start
            eta = elapsed / (step - step_at_start) * (steps - step)
            print(
                f"[gist-ray] step {step}/{steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
                f"{metrics['samples_per_s']:.1f} samples/s "
                f"mask {stats['mask_frac/all']:.3f} ETA {_fmt_eta(eta)}",
                flush=True,
            )
            if logger:
                logger.log_metrics(metrics, step)
        if eval_due(cfg, step, steps):  # before the checkpoint, which flushes the metrics
            if evaluator is not None:
                evaluator(student, step)
            if is_distributed():
                dist.barrier()  # the other ranks wait for rank 0's eval
        if step % cfg.train.checkpoint_every == 0 or step == steps:
            checkpoint({"step": step, "loss": metrics["loss"]})
        faults.maybe_fail(cfg.output_dir, r, step)  # test-only; no-op unless asked for
    return {
        "steps": step,
        "final_loss": metrics.get("loss"),
        "losses": losses,
        "run_id": run_id,
        "world_size": world,
        "pid": os.getpid(),
    }


def cache_guide_worker(cfg: Config) -> dict[str, Any]:
    """``gist-ray cache-guide`` on one worker: embed this worker's shard of the training texts
    with the guide; rank 0 writes the cache file. No training."""
    text_columns = load_text_columns(cfg)
    tensors = build_guide_cache(cfg, text_columns, guide_loader(cfg, worker_device(cfg)))
    return {"rows": len(next(iter(text_columns.values()))), "columns": list(tensors)}
