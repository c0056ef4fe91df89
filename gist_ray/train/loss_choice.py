"""The loss a worker trains with: ``loss.compute_dtype`` and ``loss.backend`` decided for its
device (:mod:`gist_ray.loss.select`: on CUDA the kernel is checked once against the reference,
and ``auto`` falls back to ``chunked`` when it fails), then said once on the console and recorded
as MLflow tags through the step log (rank 0): ``gist_ray.loss_compute_dtype`` (the dtype every
student row is cast to before the gather, so the dtype that reaches the loss),
``gist_ray.loss_backend`` and, after a fallback, ``gist_ray.loss_backend_fallback`` (why)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from gist_ray.core.distributed import is_distributed, rank
from gist_ray.core.log import ALL_RANKS
from gist_ray.loss import GistLoss, choose_backend, compute_dtype_for
from gist_ray.loss.select import dtype_name

if TYPE_CHECKING:
    from gist_ray.config import Config
    from gist_ray.train.progress import StepLog

log = logging.getLogger(__name__)

TAG_DTYPE = "gist_ray.loss_compute_dtype"
TAG_BACKEND = "gist_ray.loss_backend"
TAG_FALLBACK = "gist_ray.loss_backend_fallback"


@dataclass(frozen=True)
class LossTarget:
    """What the loss settings are decided for. ``device``: the device type (``"cuda"``,
    ``"cpu"``) that picks ``auto``'s dtype and whether the kernel is checked and run; None = the
    worker's own. ``kernel``: the tiled backend ``auto`` and ``triton`` run
    (:func:`gist_ray.loss.op.register_kernel`). The defaults are what training uses; a test sets
    both to train a CPU worker the way a CUDA one decides, through a kernel of its own."""

    device: str | None = None
    kernel: str = "triton"


def worker_loss(
    cfg: Config,
    device: torch.device,
    dim: int,
    step_log: StepLog,
    *,
    gather: bool,
    target: LossTarget | None = None,
) -> GistLoss:
    """The GIST loss for this worker (``dim``: the student's embedding width), its dtype and
    backend decided, said and recorded (see the module docstring). Raises
    :class:`~gist_ray.loss.select.KernelCheckError` (one line) when ``loss.backend: triton``
    and the kernel fails its check."""
    target = target or LossTarget()
    on = target.device or device.type
    lo = cfg.loss
    dtype = compute_dtype_for(lo.compute_dtype, on)
    choice = choose_backend(
        lo.backend, device, dtype, cuda=on == "cuda", kernel=target.kernel, dim=dim
    )
    if choice.fallback is not None:
        log.warning(
            "rank %d: the %s kernel failed its check against the reference loss (%s); training "
            "continues on the chunked backend",
            rank(),
            target.kernel,
            choice.fallback,
            extra=ALL_RANKS,
        )
    failed = _ranks_with(choice.fallback is not None, device)
    log.info(
        "loss: compute dtype %s (loss.compute_dtype: %s on %s), backend %s%s",
        dtype_name(dtype),
        lo.compute_dtype,
        on,
        choice.backend,
        " (its kernel agrees with the reference)" if choice.checked else "",
    )
    tags = {TAG_DTYPE: dtype_name(dtype), TAG_BACKEND: choice.backend}
    if failed:
        ranks = ", ".join(map(str, failed))
        own = choice.fallback if choice.fallback is not None else "see their console lines"
        tags[TAG_FALLBACK] = f"chunked on rank {ranks}: {own}"
    step_log.tags(tags)
    return GistLoss.from_config(lo, gather=gather, backend=choice.backend, compute_dtype=dtype)


def _ranks_with(flag: bool, device: torch.device) -> list[int]:
    """The ranks on which ``flag`` is true (every rank calls this)."""
    if not is_distributed():
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), device=device)
    flags[rank()] = float(flag)
    dist.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f]
