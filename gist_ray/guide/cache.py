"""The guide cache: the frozen guide's embedding of every unique training text, computed once,
stored on shared storage and memory-mapped by every worker.

The guide never changes, so its embeddings are a pure function of its identity (the commit of a
hub model, the file hashes of a folder: weights, module stack, pooling, normalisation,
tokenizer), its load settings, max length, prompts and the texts: that is the cache's
fingerprint, and a folder per fingerprint holds

- ``texts.parquet``: the unique (prompt, text) pairs, each with the column and row it first
  appears at (to name a text the guide fails on); one row group per shard;
- ``index-<column>.npy``: per column, row -> unique text id;
- ``emb-00000.npy`` ...: the shards, one L2-normalised embedding per unique text, float16 by
  default (``data.guide_cache_dtype``; the loss reads only the guide's cosine similarities, so
  normalising loses nothing and keeps fp16 in range; float32 matches the live guide exactly);
- ``manifest.json``: the fingerprint and the shard layout, written after the texts and
  indexes and before the shards.

The folder is a local path or a URI (``s3://``, ``gs://``, ...; :mod:`gist_ray.core.storage`).

The shards are embedded by a Ray Data job (:func:`gist_ray.launch.guide_job.run_guide_job`:
``map_batches`` with the guide on the cluster's GPUs or CPUs, each task writes its shard) or in
this process (:func:`gist_ray.guide.embed.run_local`). Every file is written under a temporary
name and renamed (on object storage: written locally, then uploaded whole, so an object is
visible only once complete), so a half-written file never looks complete; a shard that is missing
or truncated is rebuilt alone, and a second run (or job, or cluster) with the same fingerprint
loads instead of building. Workers open the folder memory-mapped and read only their batch rows;
a folder on object storage is first downloaded once per node (:func:`stage`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gist_ray.core import fileio, storage
from gist_ray.core.errors import ConfigError, GistRayError

if TYPE_CHECKING:
    import datasets

    from gist_ray.config import Config
log = logging.getLogger(__name__)

FORMAT = "gist-ray-guide-cache-v3"


MANIFEST = "manifest.json"


TEXTS = "texts.parquet"


MAX_SHARD_TEXTS = 65_536  # a shard is one task of the job: ~100 MB at d = 768


MIN_SHARD_TEXTS = 16  # below this a shard is mostly per-task overhead


SHARDS_PER_WORKER = 4  # every worker gets work, and the last shards even out the workers' ends


HASH_SLICE_ROWS = 65_536


STAGED = "guide-cache-staged"  # under the node's gist-ray cache: remote caches, downloaded


@lru_cache(maxsize=8)
def model_identity(model_dir: str, revision: str = "") -> str:
    """What fixes the guide's outputs: the commit of a hub model (from its snapshot path in the
    Hugging Face cache), else sha256 over a folder's config, tokenizer, weight and module files
    (1_Pooling, 2_Normalize, ...)."""
    root = Path(model_dir)
    if not root.is_dir():  # a hub name: the snapshot it resolves to in the local cache
        try:
            from huggingface_hub import snapshot_download

            found = snapshot_download(model_dir, revision=revision or None, local_files_only=True)
            root = Path(found)
        except Exception:  # noqa: BLE001 - not cached: the name and revision are all we know
            return f"hub:{model_dir}@{revision or 'main'}"
    if root.parent.name == "snapshots" and len(root.name) == 40:
        return f"commit:{root.name}"
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model", ".py") and f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return f"sha256:{h.hexdigest()}"


def texts_hash(data: datasets.Dataset, columns: Sequence[str]) -> str:
    """sha256 over every text of ``columns``, read in slices (no copy of the dataset)."""
    h = hashlib.sha256()
    arrow = data.select_columns(list(columns)).with_format("arrow")
    for name in columns:
        h.update(name.encode() + b"\0\0")
        for start in range(0, len(data), HASH_SLICE_ROWS):
            texts = arrow[start : start + HASH_SLICE_ROWS].column(name).to_pylist()
            h.update("\0".join(texts).encode() + b"\0")
    return h.hexdigest()


def fingerprint(
    guide: str, settings: dict[str, object], texts: str, prompts: dict[str, str]
) -> dict[str, str]:
    """What fixes the cached embeddings: the guide's identity (:func:`model_identity`), its
    ``settings`` (revision, model kwargs, pooling override, max length), the prompt per column
    and the texts' hash."""
    return {
        "format": FORMAT,
        "guide": guide,
        **{k: json.dumps(v, sort_keys=True, default=str) for k, v in sorted(settings.items())},
        "prompts": json.dumps(prompts, sort_keys=True),
        "texts": texts,
    }


def cache_root(cfg: Config, source: str) -> tuple[str, str]:
    """(location holding the dataset's caches, what chose it): ``data.guide_cache_dir`` (a path
    or a URI); else under ``ray.storage_path`` when that is object storage (``s3://``: the run
    writes there, and every node and any later cluster reaches it, where a folder beside the
    data may be node-local; a dataset on object storage never gets its cache beside it, in a
    bucket the run may only read); else beside a local dataset; else under a local
    ``ray.storage_path`` (shared by a multi-node cluster); else the gist-ray cache
    (node-local)."""
    from gist_ray.config import ray_storage_path
    from gist_ray.core.assets import cache_root as user_cache

    if cfg.data.guide_cache_dir:
        return storage.absolute(cfg.data.guide_cache_dir), "data.guide_cache_dir"
    checkpoints = ray_storage_path(cfg)  # ray.storage_path, else <output_dir>/ray
    if storage.is_remote(checkpoints):
        return storage.join(checkpoints, ".gist-ray-guide-cache"), "ray.storage_path"
    under_storage = (
        storage.join(storage.absolute(cfg.ray.storage_path), ".gist-ray-guide-cache")
        if cfg.ray.storage_path
        else ""
    )
    if not storage.is_remote(source):
        src = storage.local_path(source)
        if src.exists():
            beside = src.parent if src.is_file() else src
            return str(beside / ".gist-ray-guide-cache"), "beside the data"
    if under_storage:
        return under_storage, "ray.storage_path"
    return str(user_cache() / "guide-cache"), "the gist-ray cache"


def check_root(root: str | Path, chosen: str, nodes: int, shared: bool) -> None:
    """The cache location must be writable, and shared when the cluster has several nodes (every
    worker reads it; ``shared``: the path is known or declared to be shared; a URI always is)."""
    root = str(root)
    key = "data.guide_cache_dir" if chosen == "data.guide_cache_dir" else None
    what = f"{key} = {root!r}" if key else f"the guide cache folder {root} ({chosen})"
    if storage.is_remote(root):  # object storage: reachable and writable, shared by every node
        try:
            storage.check_location(root, key or chosen, write=True)
        except ConfigError as e:
            reason = str(e).split(f"{root!r}: ", 1)[-1]
            raise ConfigError(
                f"{what} cannot be used ({reason}); set data.guide_cache_dir to a writable "
                "location every node reaches"
            ) from e
        return
    try:
        local = storage.local_path(root)
        local.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=local, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{what} is not writable ({type(e).__name__}: {e.strerror or e}); set "
            "data.guide_cache_dir to a writable folder (shared by every node on a cluster)"
        ) from e
    if nodes > 1 and not shared:
        raise ConfigError(
            f"{what} is node-local but the cluster has {nodes} nodes: workers on other nodes "
            "cannot read it; set data.guide_cache_dir to a folder every node mounts (NFS, ...) "
            "or to object storage (s3://BUCKET/PATH, gs://...), or ray.shared_storage=true if "
            "it is a shared mount"
        )


def folder_for(root: str | Path, name: str, fp: dict[str, str]) -> str:
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return storage.join(root, f"{safe}-{key}")


def read_manifest(folder: str | Path, fp: dict[str, str] | None = None) -> dict[str, Any] | None:
    try:
        manifest = storage.read_json(storage.join(folder, MANIFEST))
    except (GistRayError, OSError, ValueError):
        return None
    if fp is not None and manifest.get("fingerprint") != fp:
        return None
    return manifest


@contextmanager
def output_file(location: str | Path) -> Iterator[Path]:
    """A local temporary file to write ``location``'s content to; on success it becomes
    ``location`` whole: renamed on a local disk, uploaded in one piece to a URI (an object is
    visible only once its upload completed). Nothing is left on failure."""
    if not storage.is_remote(location):
        with fileio.atomic_file(storage.local_path(location)) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="gist-ray-guide-") as tmp:
        path = Path(tmp) / storage.name(location)  # keeps the suffix writers infer formats from
        yield path
        storage.upload(path, location)


def read_texts(folder: str | Path, k: int) -> Any:
    """Shard ``k``'s unique texts (a pyarrow Table: prompt, text, column, row), read from its
    row group of ``texts.parquet`` (on object storage: only that row group's bytes)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(storage.join(folder, TEXTS))
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(k)


def plan(folder: str | Path, data: datasets.Dataset, prompts: dict[str, str], fp: dict[str, str],
         workers: int, dtype: str = "float16") -> dict[str, Any]:  # fmt: skip
    """Find the unique (prompt, text) pairs of ``data`` (Arrow hash tables, once, here) and
    write the texts, the row -> text-id indexes and the manifest (each atomically)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gist_ray.data.training import loss_columns

    columns, rows = loss_columns(data), len(data)
    table = data.select_columns(columns).with_format("arrow")[:]
    groups: dict[str, list[str]] = {}
    for c in columns:
        groups.setdefault(prompts.get(c, ""), []).append(c)
    parts, ids, offset = [], {}, 0
    for prompt, cols in groups.items():
        chunks = [ch.cast(pa.large_string()) for c in cols for ch in table.column(c).chunks]
        every = pa.chunked_array(chunks, type=pa.large_string())
        unique = pc.unique(every)
        where = pc.index_in(every, value_set=unique).to_numpy().astype(np.int64)
        first = np.empty(len(unique), dtype=np.int64)
        first[where[::-1]] = np.arange(len(where) - 1, -1, -1)  # first position of each text
        # Longest first: a shard holds texts of similar length (they pad alike), and the job's
        # first shards are its longest tasks, so the workers' last tasks are short ones.
        by_length = np.argsort(-pc.utf8_length(unique).to_numpy(), kind="stable")
        rank = np.empty_like(by_length)
        rank[by_length] = np.arange(len(by_length))
        unique, first, where = unique.take(pa.array(by_length)), first[by_length], rank[where]
        for i, c in enumerate(cols):
            ids[c] = where[i * rows : (i + 1) * rows] + offset
        parts.append(
            pa.table(
                {
                    "prompt": pa.array([prompt] * len(unique), pa.large_string()),
                    "text": unique,
                    "column": pa.array([cols[p // rows] for p in first.tolist()]),
                    "row": pa.array(first % rows),
                }
            )
        )
        offset += len(unique)
    total = offset
    shard_texts = shard_size_for(total, workers)
    with output_file(storage.join(folder, TEXTS)) as tmp:
        pq.write_table(pa.concat_tables(parts), tmp, row_group_size=shard_texts)
    id_type = np.int32 if total < 2**31 else np.int64
    for c, col_ids in ids.items():
        with output_file(storage.join(folder, f"index-{c}.npy")) as tmp:
            np.save(tmp, col_ids.astype(id_type))
    manifest = {
        "fingerprint": fp,
        "rows": rows,
        "columns": columns,
        "unique_texts": total,
        "shard_texts": shard_texts,
        "shards": -(-total // shard_texts),
        "dtype": dtype,
    }
    storage.write_json(storage.join(folder, MANIFEST), manifest)  # last: it refers to the rest
    return manifest


def shard_size_for(total: int, workers: int) -> int:
    """Texts per shard for ``total`` unique texts embedded by ``workers`` (the job's actors):
    about :data:`SHARDS_PER_WORKER` shards per worker, at least :data:`MIN_SHARD_TEXTS` texts
    (at most :data:`MAX_SHARD_TEXTS`), but never so large that a worker gets no shard: small
    data is still cut into at least ``workers`` shards (when it has that many texts)."""
    workers, total = max(1, workers), max(1, total)
    per = -(-total // (SHARDS_PER_WORKER * workers))
    every_worker = max(1, total // workers)  # the largest size that still gives each a shard
    return int(min(MAX_SHARD_TEXTS, max(per, min(MIN_SHARD_TEXTS, every_worker))))


def shard_path(folder: str | Path, k: int) -> str | Path:
    """Shard ``k``'s location: a Path in a local folder, a URI in a remote one."""
    if storage.is_remote(folder):
        return storage.join(folder, f"emb-{k:05d}.npy")
    return storage.local_path(folder) / f"emb-{k:05d}.npy"


def shard_size(manifest: dict[str, Any], k: int) -> int:
    n = manifest["shard_texts"]
    return min(n, manifest["unique_texts"] - k * n)


def shard_problems(folder: str | Path, manifest: dict[str, Any]) -> dict[int, str]:
    """Shards that are not there in full: shard -> "missing" / "truncated" / why. A remote
    folder is judged from one listing (the objects' sizes), reading no shard."""
    if storage.is_remote(folder):
        return _listed_problems(folder, manifest, storage.listing(folder))
    out, dims, dtype = {}, set(), np.dtype(manifest["dtype"])
    for k in range(manifest["shards"]):
        path = shard_path(folder, k)
        if not path.is_file():
            out[k] = "missing"
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            out[k] = "truncated or damaged"
            continue
        if arr.ndim != 2 or arr.shape[0] != shard_size(manifest, k) or arr.dtype != dtype:
            out[k] = f"the wrong shape {arr.shape} {arr.dtype}"
        else:
            dims.add(arr.shape[1])
    if len(dims) > 1:
        raise GistRayError(f"guide cache {folder} has shards of widths {sorted(dims)}; delete it")
    return out


def npy_bytes(rows: int, dim: int, dtype: str) -> int:
    """The size of the ``.npy`` file ``np.save`` writes for a C-ordered ``[rows, dim]`` array."""
    import io

    from numpy.lib import format as npy

    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": npy.dtype_to_descr(np.dtype(dtype)),
                                        "fortran_order": False, "shape": (rows, dim)})  # fmt: skip
    return len(header.getvalue()) + rows * dim * np.dtype(dtype).itemsize


def _listed_problems(
    folder: str, manifest: dict[str, Any], entries: list[storage.Entry]
) -> dict[int, str]:
    """:func:`shard_problems` from a listing: each shard's object must have the size of an
    ``[n, dim]`` array of the manifest's dtype, with one ``dim`` for all."""
    sizes = {e.relpath: e.size for e in entries}
    out, dims, itemsize = {}, set(), np.dtype(manifest["dtype"]).itemsize
    for k in range(manifest["shards"]):
        size, n = sizes.get(f"emb-{k:05d}.npy"), shard_size(manifest, k)
        if size is None:
            out[k] = "missing"
            continue
        fits = [  # the npy header is a multiple of 64 bytes: try the widths it allows
            (size - head) // (n * itemsize)
            for head in range(64, 64 * 9, 64)
            if size > head and (size - head) % (n * itemsize) == 0
        ]
        dim = next((d for d in fits if npy_bytes(n, d, manifest["dtype"]) == size), None)
        if dim is None:
            out[k] = f"truncated or damaged ({size} bytes)"
        else:
            dims.add(dim)
    if len(dims) > 1:
        raise GistRayError(f"guide cache {folder} has shards of widths {sorted(dims)}; delete it")
    return out


def stage(folder: str, manifest: dict[str, Any], entries: list[storage.Entry]) -> Path:
    """The node-local copy of the remote cache ``folder`` that workers memory-map: its manifest,
    indexes and shards (not ``texts.parquet``, which only the job reads), downloaded once per
    node and content version (names, sizes and ETags, else modification times, of ``entries``)
    into the gist-ray cache, under a temporary name, then renamed. Processes of one node that
    need it at once download it once (a lock file beside it)."""
    from gist_ray.core.assets import cache_root as user_cache

    wanted = [MANIFEST, *(f"index-{c}.npy" for c in manifest["columns"])]
    wanted += [f"emb-{k:05d}.npy" for k in range(manifest["shards"])]
    listed = {e.relpath: e for e in entries}
    gone = [f for f in wanted if f not in listed]
    if gone:
        raise GistRayError(
            f"guide cache {folder} has no {gone[0]}; delete the folder to rebuild it"
        )
    version = storage.digest(folder, [listed[f] for f in wanted])
    root = user_cache() / STAGED
    target = root / f"{storage.name(folder)}-{version[:12]}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            log.info("guide cache %s: downloading it to %s (once per node)", folder, target)
            with fileio.atomic_dir(target) as tmp:
                for f in wanted:
                    storage.download(storage.join(folder, f), tmp / f)
    return target


class GuideCache:
    """One dataset's cache, memory-mapped: :meth:`embeddings` reads only the rows asked for."""

    def __init__(self, folder: str | Path, rows: int | None = None) -> None:
        self.location = str(folder)  # where the cache is; self.folder: the local copy read
        remote = storage.is_remote(folder)
        manifest = read_manifest(folder)
        entries = storage.listing(folder, etags=True) if remote and manifest else []
        if manifest is None:
            problems = {0: "no manifest"}
        elif remote:
            problems = _listed_problems(self.location, manifest, entries)
        else:
            problems = shard_problems(folder, manifest)
        if problems or (rows is not None and manifest["rows"] != rows):
            k, why = next(iter(problems.items()), (None, f"{manifest['rows']} rows, not {rows}"))
            raise GistRayError(
                f"guide cache {self.location} is incomplete (shard {k}: {why}); rerun "
                "`gist-ray cache-guide` or `gist-ray train`, which rebuild it"
            )
        local = storage.local_path(folder) if not remote else None
        self.folder = local or stage(self.location, manifest, entries)
        self.manifest = manifest
        self.rows, self.step = manifest["rows"], manifest["shard_texts"]
        self.index = {
            c: np.load(self.folder / f"index-{c}.npy", mmap_mode="r") for c in manifest["columns"]
        }
        self.shards = [
            np.load(shard_path(self.folder, k), mmap_mode="r") for k in range(manifest["shards"])
        ]

    @property
    def dim(self) -> int:
        return int(self.shards[0].shape[1])

    def embeddings(self, column: str, rows: Sequence[int]) -> torch.Tensor:
        """float32 ``[len(rows), dim]``: the guide embeddings of ``column`` at ``rows``."""
        ids = np.asarray(self.index[column][np.asarray(rows, dtype=np.int64)], dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        shard, at = np.divmod(ids, self.step)
        for k in np.unique(shard).tolist():
            pick = shard == k
            out[pick] = self.shards[k][at[pick]]
        return torch.from_numpy(out)
