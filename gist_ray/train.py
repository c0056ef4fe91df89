"""The per-worker training function: plain torch.distributed, no Ray.

``train_worker`` runs on every worker (Ray's TorchTrainer calls it through
:mod:`gist_ray.launcher`; it also runs under ``torchrun`` or as a single process). The global
batch is split evenly; the loss gathers candidates across workers so each query sees the global
pool; gradients are averaged across workers by an explicit all-reduce.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from gist_ray import checkpoint as ckpt
from gist_ray.config import Config
from gist_ray.distributed import is_distributed, rank, world_size
from gist_ray.loss import gist_loss
from gist_ray.models import Encoder, load_encoder


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
                import shutil

                shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)

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


def embed_columns(encoder: Encoder, columns: list[list[str]]) -> list[torch.Tensor]:
    return [encoder.embed(texts) for texts in columns]


def training_step(
    cfg: Config,
    student: Encoder,
    guide: Encoder,
    columns: list[list[str]],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward/backward on this worker's rows (no optimizer step). ``columns`` holds
    anchors, positives, then each negative column."""
    lc = cfg.loss
    with torch.no_grad():
        guide_emb = embed_columns(guide, columns)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        emb = embed_columns(student, columns)
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
    return loss.detach(), stats


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
    from gist_ray.data import load_pairs

    r, world = rank(), world_size()
    device = torch.device(
        f"cuda:{torch.cuda.current_device()}"
        if cfg.ray.use_gpu and torch.cuda.is_available()
        else "cpu"
    )
    seed_everything(cfg.train.seed + r)  # per-rank dropout streams, reproducible
    data = load_pairs(
        cfg.data.train, cfg.data.columns or None, cfg.data.max_examples or None, seed=cfg.train.seed
    )
    neg_cols = sorted(c for c in data.column_names if c.startswith("negative_"))
    names = ["anchor", "positive", *neg_cols]
    text_columns = {c: data[c] for c in names}

    student = load_encoder(cfg.model.student, cfg.model.pooling, cfg.model.max_seq_length)
    guide = load_encoder(
        cfg.model.guide,
        cfg.model.guide_pooling,
        cfg.model.max_seq_length,
        frozen=True,
        key="model.guide",
    )
    student.to(device).train()
    guide.to(device)

    batches = GlobalBatches(len(data), cfg.train.batch_size, cfg.train.seed)
    if batches.steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size = {cfg.train.batch_size} is larger than the dataset "
            f"({len(data)} rows)"
        )
    steps = total_steps(cfg, batches.steps_per_epoch)
    opt = torch.optim.AdamW(
        student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    warmup = math.ceil(cfg.train.warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps))
    identity = {
        "student": cfg.model.student,
        "guide": cfg.model.guide,
        "batch_size": cfg.train.batch_size,
        "train": cfg.data.train,
    }

    step = 0
    latest = reporter.latest_checkpoint()
    if latest:
        from transformers import AutoModel

        model_dir, state = ckpt.load_checkpoint(latest, identity)
        student.model.load_state_dict(AutoModel.from_pretrained(model_dir).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        run_id = state.get("mlflow_run_id") or run_id
        ckpt.set_rng_state(state["rng"][r] if r < len(state["rng"]) else state["rng"][0])
        if r == 0:
            print(f"[gist-ray] resumed from {latest} at step {step}/{steps}", flush=True)

    logger = None
    if r == 0 and run_id and tracking_uri:
        from gist_ray.tracking import RunLogger

        logger = RunLogger(tracking_uri, run_id)

    def checkpoint(metrics: dict[str, float]) -> None:
        # Every rank's RNG state goes into the checkpoint so a resumed run replays dropout.
        states = [None] * world
        if is_distributed():
            dist.all_gather_object(states, ckpt.rng_state())
        else:
            states = [ckpt.rng_state()]
        path = None
        if r == 0:
            root = Path(cfg.output_dir) / "checkpoints-staging"
            path = str(
                ckpt.save_checkpoint(
                    root / f"checkpoint-{step:07d}",
                    student,
                    {
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "step": step,
                        "rng": states,
                        "mlflow_run_id": run_id,
                        "identity": identity,
                        "config": cfg.to_dict(),
                    },
                )
            )
        reporter.report(metrics, path)

    local_b = cfg.train.batch_size // world
    t_start, step_at_start = time.perf_counter(), step
    metrics: dict[str, float] = {}
    if r == 0:
        print(
            f"[gist-ray] training {steps} steps, global batch {cfg.train.batch_size} "
            f"({world} worker(s) x {local_b}), {len(data)} rows, device {device}",
            flush=True,
        )
    while step < steps:
        t0 = time.perf_counter()
        idx = batches.local_indices(step, r, world)
        columns = [[text_columns[c][i] for i in idx] for c in names]
        opt.zero_grad(set_to_none=True)
        loss, stats = training_step(cfg, student, guide, columns, device)
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
        if step % cfg.train.checkpoint_every == 0 or step == steps:
            checkpoint({"step": step, "loss": metrics["loss"]})
    return {
        "steps": step,
        "final_loss": metrics.get("loss"),
        "run_id": run_id,
        "world_size": world,
        "pid": os.getpid(),
    }
