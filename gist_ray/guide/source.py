"""The guide during training: the frozen guide model (or the student guiding itself), and where
a step's guide embeddings come from: the guide cache, memory-mapped, or a guide forward per
step."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from gist_ray.config import SELF, Config
from gist_ray.core.distributed import is_distributed, rank
from gist_ray.data.training import TrainingSet
from gist_ray.models.encoder import Encoder, load_encoder
from gist_ray.models.prompts import guide_prompts
from gist_ray.models.self_guide import SelfGuide
from gist_ray.models.spec import guide_spec

log = logging.getLogger(__name__)

# A step's guide embeddings, given its dataset, row indices and texts (one list per column).
GuideFn = Callable[[int, list[int], list[list[str]]], list[torch.Tensor]]


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
        from gist_ray.guide.cache import GuideCache

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


def local_guide_cache(
    cfg: Config, sets: list[TrainingSet], prompts: list[dict[str, str]]
) -> list[str]:
    """The guide cache folders, loaded or built without Ray (``torchrun``, one process): rank 0
    embeds the missing shards in its own process, the other ranks wait, then all open them."""
    from gist_ray.guide import build
    from gist_ray.guide.embed import run_local

    folders = [None] * len(sets)
    if rank() == 0:
        folders = build.ensure(cfg, sets, prompts, run_local)
    if is_distributed():
        dist.broadcast_object_list(folders, src=0)
    return folders
