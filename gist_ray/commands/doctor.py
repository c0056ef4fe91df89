"""``gist-ray doctor``: check this machine (or every GPU node of a Ray cluster) before a long
job, with the loss settings of the job's config (docs/doctor.md).

The local check needs torch (and triton on CUDA) only: Ray is imported for ``--address`` alone.
Prints one table per machine and a verdict; ``json_path`` gets the same as JSON (atomically).
Returns the exit status: 0 when every check passed, 1 when one failed.
"""

from __future__ import annotations

import logging
from typing import Any

from gist_ray.config import Config
from gist_ray.core import fileio
from gist_ray.core.errors import ConfigError, GistRayError
from gist_ray.doctor import Settings, check_machine
from gist_ray.doctor.compare import Backend
from gist_ray.doctor.report import machine_lines, verdict

log = logging.getLogger(__name__)

EXIT_FAILED = 1
_DTYPE_KEYS = ("dtype", "torch_dtype")  # model.model_kwargs keys naming the model's dtype
_16BIT = ("bfloat16", "float16")


def settings_from(cfg: Config, processes: int | None = None, speed: bool = True) -> Settings:
    """The loss settings of ``cfg`` and the dtypes its student's embeddings can reach the loss
    in: on CUDA bfloat16 (training's autocast) and float32 (what autocast's LayerNorm and
    normalize return); on the CPU float32; both also the model's own 16-bit dtype when
    ``model.model_kwargs`` sets one."""
    own = [str(cfg.model.model_kwargs.get(k, "")).removeprefix("torch.") for k in _DTYPE_KEYS]
    own = [d for d in own if d in _16BIT]
    loss = cfg.loss
    return Settings(
        temperature=loss.temperature, margin=loss.margin, margin_strategy=loss.margin_strategy,
        contrast_anchors=loss.contrast_anchors, contrast_positives=loss.contrast_positives,
        matryoshka_dims=tuple(loss.matryoshka_dims),
        matryoshka_weights=None if loss.matryoshka_weights is None
        else tuple(loss.matryoshka_weights),
        hardness_alpha=loss.hardness_alpha, hardness_mode=loss.hardness_mode,
        backend=loss.backend,
        cuda_dtypes=tuple(dict.fromkeys(["bfloat16", "float32", *own])),
        cpu_dtypes=tuple(dict.fromkeys(["float32", *own])),
        processes=processes, speed=speed,
    )  # fmt: skip


def _check_processes(processes: int | None, address: str | None) -> None:
    if processes is None:
        return
    if processes == 1 or processes < 0:
        raise ConfigError(f"--processes {processes}: 0 (no all-gather check) or 2 or more")
    if address is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus and processes > gpus:
            raise ConfigError(
                f"--processes {processes}: this machine has {gpus} GPUs (one process per GPU)"
            )


def doctor(
    cfg: Config,
    *,
    address: str | None = None,
    json_path: str | None = None,
    processes: int | None = None,
    speed: bool = True,
    timeout: float = 900.0,
    backend: Backend | None = None,
) -> int:
    """Run the checks, print the tables and the verdict, write ``json_path``; the exit status.
    ``backend``: the tiled backend checked on this machine (default: the one training runs;
    a test passes a broken one); with ``address`` the cluster's own."""
    _check_processes(processes, address)
    settings = settings_from(cfg, processes, speed)
    skipped: list[dict[str, Any]] = []
    if address:
        from gist_ray.launch.doctor import check_cluster

        cfg.ray.address = address
        result = check_cluster(cfg, settings, timeout)
        machines, skipped = result["nodes"], result["skipped_nodes"]
        if not machines:
            raise GistRayError(f"--address {address}: the cluster has no node that can run a check")
    else:
        machines = [check_machine(settings, backend)]
    ok = all(m["ok"] for m in machines)
    print("\n".join(_lines(machines, skipped)), flush=True)
    if json_path:  # before the verdict, so that the verdict is the last line on screen
        doc = {"ok": ok, "settings": settings.to_dict(), "machines": machines,
               "skipped_nodes": skipped}  # fmt: skip
        try:
            fileio.write_json(json_path, doc)
        except OSError as e:
            raise GistRayError(f"--json {json_path}: cannot write it ({e.strerror or e})") from e
        log.info("wrote %s", json_path)
    print("\n".join(verdict(machines)), flush=True)
    return 0 if ok else EXIT_FAILED


def _lines(machines: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for m in machines:
        title = ""
        if "node_id" in m:
            title = f"node {m['node_ip']} ({m['host']}, node id {m['node_id'][:12]})"
        lines += [*machine_lines(m, title), ""]
    for n in skipped:
        lines.append(f"node {n['node_ip']} (node id {n['node_id'][:12]}): not checked ({n['why']})")
    return lines
