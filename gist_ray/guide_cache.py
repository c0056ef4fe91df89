"""The guide cache: the frozen guide's embedding of every training text, computed once.

The guide never changes, so its embeddings are a pure function of (the guide's files — weights,
module stack, tokenizer —, its load settings, pooling override, max length, prompts, texts). They
are computed before training through the guide's own module stack — each worker embeds a shard
of the unique (prompt, text) pairs, the shards are all-gathered — and stored per dataset as one
safetensors file whose metadata carries that fingerprint. A file whose fingerprint does not
match is rebuilt, never used; a file is written under a temporary name and renamed, so a
half-written cache never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist

from gist_ray import fileio
from gist_ray.distributed import is_distributed, rank, world_size
from gist_ray.errors import GistRayError

log = logging.getLogger(__name__)

FORMAT = "gist-ray-guide-cache-v2"


@lru_cache(maxsize=8)
def model_hash(model_dir: str) -> str:
    """sha256 over the model's config, tokenizer and weight files, module folders included
    (1_Pooling, 2_Dense, ...: what fixes its outputs)."""
    root = Path(model_dir)
    if not root.is_dir():  # a hub name: its identity is the name and the revision
        return hashlib.sha256(model_dir.encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model", ".py") and f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def texts_hash(columns: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for name in sorted(columns):
        h.update(name.encode() + b"\0")
        for text in columns[name]:
            h.update(text.encode() + b"\0")
    return h.hexdigest()


def fingerprint(
    model_dir: str,
    settings: dict[str, object],
    columns: dict[str, list[str]],
    prompts: dict[str, str],
) -> dict[str, str]:
    """What fixes the cached embeddings. ``settings``: the guide's load and embedding settings
    (revision, model kwargs, pooling override, max length); ``prompts``: column -> prompt."""
    return {
        "format": FORMAT,
        "guide": model_hash(model_dir),
        **{k: json.dumps(v, sort_keys=True, default=str) for k, v in sorted(settings.items())},
        "prompts": json.dumps(prompts, sort_keys=True),
        "texts": texts_hash(columns),
    }


def cache_path(source: str, fp: dict[str, str], cache_root: Path) -> Path:
    """Beside a local dataset file/folder; under the user cache for built-in or hub data."""
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    src = Path(source).expanduser()
    if src.exists():
        base = src.parent if src.is_file() else src
        return base / ".gist-ray-guide-cache" / f"{src.stem}-{key}.safetensors"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in source)
    return cache_root / "guide-cache" / f"{safe}-{key}.safetensors"


def load(path: Path, fp: dict[str, str], rows: int) -> dict[str, torch.Tensor] | None:
    """The cached embeddings, or None (with the reason printed) when absent or unusable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - truncated files raise assorted errors
        log.info(
            "guide cache %s is truncated or corrupt (%s); rebuilding it", path, type(e).__name__
        )
        return None
    if {k: meta.get(k) for k in fp} != fp:
        log.info("guide cache %s was built for another guide or dataset; rebuilding it", path)
        return None
    if any(t.shape[0] != rows for t in tensors.values()):
        log.info("guide cache %s has the wrong number of rows; rebuilding it", path)
        return None
    return tensors


def save(path: Path, fp: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with fileio.atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=fp)


@torch.no_grad()
def compute(
    guide, columns: dict[str, list[str]], prompts: dict[str, str], batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Embed the unique (prompt, text) pairs of all columns, this worker's shard, then
    all-gather the shards. ``guide`` is a :class:`gist_ray.models.Encoder`."""
    # Sorted by length so each batch pads to similar lengths (short questions batch together);
    # grouped by prompt, since one call embeds with one prompt.
    pairs = {(prompts.get(c, ""), t) for c, texts in columns.items() for t in texts}
    unique = sorted(pairs, key=lambda pt: (pt[0], len(pt[1]), pt[1]))
    index = {pt: i for i, pt in enumerate(unique)}
    r, w = rank(), world_size()
    per = -(-len(unique) // w)  # ceil: equal shard shapes, short shards padded
    mine = unique[r::w]  # strided, so every worker gets its share of the long texts
    emb = _encode_with_progress(guide, mine, batch_size) if mine else torch.empty(0, guide.dim)
    if is_distributed():
        pad = torch.zeros(per, emb.shape[1])
        pad[: emb.shape[0]] = emb
        parts = [torch.empty_like(pad) for _ in range(w)]
        dist.all_gather(parts, pad)
        emb = torch.empty(len(unique), pad.shape[1])
        for i, part in enumerate(parts):
            emb[i::w] = part[: len(unique[i::w])]
    return {c: emb[[index[(prompts.get(c, ""), t)] for t in texts]] for c, texts in columns.items()}


def _encode_with_progress(guide, pairs: list[tuple[str, str]], batch_size: int) -> torch.Tensor:
    """Batched guide inference of ``(prompt, text)`` pairs; rank 0 reports progress (it takes
    minutes): at every 10% and at most every few seconds in between, for the driver's live bar."""
    from gist_ray.progress import GUIDE_REPORT_EVERY_S, guide_cache_line

    chunks, t0, last, next_decile = [], time.perf_counter(), 0.0, 10
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        for prompt in dict.fromkeys(p for p, _ in batch):  # a batch may straddle two prompts
            texts = [t for p, t in batch if p == prompt]
            chunks.append(guide.encode(texts, prompt or None, batch_size=batch_size))
        done, now = min(i + batch_size, len(pairs)), time.perf_counter()
        pct = 100 * done // len(pairs)
        if pct >= next_decile or now - last >= GUIDE_REPORT_EVERY_S or done == len(pairs):
            log.info(guide_cache_line(done, len(pairs), now - t0))
            last, next_decile = now, pct // 10 * 10 + 10
    return torch.cat(chunks)


def get_or_build(
    guide_loader,
    source: str,
    model_dir: str,
    settings: dict[str, object],
    columns: dict[str, list[str]],
    prompts: dict[str, str],
    cache_root: Path,
) -> tuple[dict[str, torch.Tensor], Path, bool]:
    """Load the cache of one dataset, or build it on every worker and write it from rank 0.

    Returns (embeddings per column, path, built). ``guide_loader()`` loads the guide only when
    a build is needed."""
    rows = len(next(iter(columns.values())))
    fp = fingerprint(model_dir, settings, columns, prompts)
    path = cache_path(source, fp, cache_root)
    found = load(path, fp, rows)
    ok = torch.tensor([found is not None], dtype=torch.int32)
    if is_distributed():  # every rank must agree, or the all-gather below would hang
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item():
        return found, path, False
    tensors = compute(guide_loader(), columns, prompts)
    if rank() == 0:
        try:
            save(path, fp, tensors)
        except OSError as e:
            raise GistRayError(f"cannot write the guide cache {path}: {e}") from e
    if is_distributed():
        dist.barrier()
    return tensors, path, True
