"""Before a job starts: the cluster has the workers' resources, and the checkpoint storage is
writable and, on several nodes, shared (object storage, ``s3://`` ``gs://`` ..., always is)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from gist_ray.config import Config, ray_storage_path
from gist_ray.core import storage
from gist_ray.core.errors import GistRayError
from gist_ray.launch.cluster import alive_nodes

log = logging.getLogger(__name__)

# Mount types every node can share (prefix match; "fuse." = gcsfuse, s3fs, juicefs, ...); a local
# path on any other file system is node-local.
SHARED_FS_TYPES = (
    "nfs",
    "cifs",
    "smb",
    "lustre",
    "gpfs",
    "beegfs",
    "gluster",
    "ceph",
    "weka",
    "fuse.",
)


def _shortfall(cfg: Config, total: dict[str, float]) -> str | None:
    n = cfg.ray.num_workers
    if cfg.ray.use_gpu and total.get("GPU", 0) < n:
        return (
            f"ray.num_workers = {n} with ray.use_gpu = true needs {n} GPUs but the cluster has "
            f"{int(total.get('GPU', 0))}; lower ray.num_workers, set ray.use_gpu=false, or on "
            "an autoscaling cluster set ray.resource_wait_s so GPU nodes can join"
        )
    if not cfg.ray.use_gpu and total.get("CPU", 0) < n:
        return (
            f"ray.num_workers = {n} needs {n} CPUs but the cluster has "
            f"{int(total.get('CPU', 0))}; lower ray.num_workers or add nodes"
        )
    return None


def _wait_for_resources(cfg: Config) -> None:
    """Ask the autoscaler for the workers' resources and wait up to ``ray.resource_wait_s``."""
    import ray
    from ray.autoscaler.sdk import request_resources

    bundle = {"GPU": 1} if cfg.ray.use_gpu else {"CPU": 1}
    request_resources(bundles=[bundle] * cfg.ray.num_workers)
    try:
        deadline = time.monotonic() + cfg.ray.resource_wait_s
        while _shortfall(cfg, ray.cluster_resources()) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(5.0, deadline - time.monotonic())))
    finally:
        request_resources(bundles=[])  # the placement group keeps the demand from here on


def storage_path(cfg: Config) -> str:
    """``ray.storage_path`` (absolute when local), else ``<output_dir>/ray``."""
    return ray_storage_path(cfg)


def _mount_type(path: str) -> str:
    """File system type of the mount holding ``path`` (longest mount-point prefix)."""
    best, fstype = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    real = os.path.realpath(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) > len(best):
            best, fstype = mnt, parts[2]
    return fstype


def is_shared_storage(path: str) -> bool:
    """Every node reaches ``path``: a URI on object storage (s3://, gs://, abfs://, hdfs://),
    or a local path on a network or FUSE mount."""
    if storage.is_remote(path):
        return True
    return _mount_type(str(storage.local_path(path))).startswith(SHARED_FS_TYPES)


def check_writable(path: str, key: str) -> None:
    """A local ``path`` must be a folder this process can create files in."""
    if storage.is_remote(path):
        return  # object stores: reached and probed by storage.check_location where it is used
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise GistRayError(
            f"{key} = {path!r} is not writable ({type(e).__name__}: {e.strerror or e}); set "
            f"{key} to a writable folder (shared storage on a multi-node cluster)"
        ) from e


def check_storage(cfg: Config, alive_nodes: int) -> None:
    """Checkpoints of a multi-node run must land where every node (and the driver) can read."""
    path = storage_path(cfg)
    check_writable(path, "ray.storage_path")
    if alive_nodes > 1 and not (cfg.ray.shared_storage or is_shared_storage(path)):
        raise GistRayError(
            f"ray.storage_path = {path!r} is node-local but the cluster has {alive_nodes} nodes: "
            "workers on other nodes cannot write or restore checkpoints there; set "
            "ray.storage_path to shared storage (s3://BUCKET/PATH, gs://..., or an NFS mount), "
            "or ray.shared_storage=true if that path is a mount every node shares"
        )


def check_resources(cfg: Config) -> None:
    """Enough GPUs/CPUs for the workers (waiting for an autoscaler when asked), and storage
    that every node shares when the cluster has several."""
    import ray

    if cfg.ray.resource_wait_s and _shortfall(cfg, ray.cluster_resources()):
        _wait_for_resources(cfg)
    problem = _shortfall(cfg, ray.cluster_resources())
    if problem:
        raise GistRayError(problem)
    check_storage(cfg, alive_nodes())
