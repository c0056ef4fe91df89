"""One shard of the guide cache embedded by the guide: the unit of work of the cache's Ray Data
job (:class:`ShardEmbedder` is the callable class ``map_batches`` runs, holding the guide) and of
:func:`run_local`, the same work in this process (``torchrun`` or a single process).

A shard's texts are read from its row group of ``texts.parquet``, grouped by prompt, sorted by
token length and embedded in batches (:mod:`gist_ray.models.batching`: 64 texts on CPU; on CUDA
by a budget of padded tokens under bf16 autocast), L2-normalised, and written (float16 or
float32, ``data.guide_cache_dtype``) under a temporary name, then renamed (to a URI: uploaded
whole, once complete: :func:`gist_ray.guide.cache.output_file`). Progress is reported
per batch. A text the guide fails on is found by retrying its batch one text at a time and named
by its column and row (:class:`gist_ray.core.errors.DataError`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gist_ray.core import storage
from gist_ray.core.errors import DataError
from gist_ray.models.batching import batching_for, token_batches

Report = Callable[[int], None]  # told each finished batch's text count


class ShardEmbedder:
    """Holds the guide; ``__call__`` embeds the shards named in a batch ``{"shard": [k, ...]}``
    and returns ``{"shard", "texts", "seconds"}`` per shard. ``threads``: torch's intra-op threads
    in this process (the job gives each actor its own cores); ``report``: called with each
    finished batch's text count (the job's progress), and with 0 once the guide is loaded."""

    def __init__(
        self,
        config: dict[str, Any],
        folder: str,
        threads: int | None = None,
        report: Report | None = None,
    ) -> None:
        from gist_ray.config import load_config_dict
        from gist_ray.guide.cache import read_manifest
        from gist_ray.models.encoder import load_encoder
        from gist_ray.models.spec import guide_spec

        if threads:
            torch.set_num_threads(threads)
        cfg = load_config_dict(config)
        use_gpu = cfg.ray.use_gpu and torch.cuda.is_available()
        device = torch.device("cuda" if use_gpu else "cpu")
        self.guide = load_encoder(guide_spec(cfg), device, frozen=True)
        self.batching = batching_for(device)
        self.folder, self.name = str(folder), storage.name(folder)
        self.manifest = read_manifest(self.folder)
        self.guide.encode_batch(["warm-up"])  # a first forward's one-time set-up, done here
        self.report = report or (lambda _n: None)
        self.report(0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"shard": [], "texts": [], "seconds": []}
        for k in np.asarray(batch["shard"]).tolist():
            t0 = time.perf_counter()
            n = self.embed_shard(int(k))
            out["shard"].append(k)
            out["texts"].append(n)
            out["seconds"].append(time.perf_counter() - t0)
        return {key: np.asarray(v) for key, v in out.items()}

    def embed_shard(self, k: int) -> int:
        """Embed shard ``k`` and write it, reporting each batch; returns its text count."""
        done = 0
        for n in self.shard_batches(k):
            self.report(n)
            done += n
        return done

    def shard_batches(self, k: int) -> Iterator[int]:
        """Embed shard ``k`` batch by batch, yielding each batch's text count; the shard is
        written (atomically; to a URI, uploaded whole) after its last batch."""
        from gist_ray.guide.cache import output_file, read_texts, shard_path

        table = read_texts(self.folder, k)
        prompts, texts = table.column("prompt").to_pylist(), table.column("text").to_pylist()
        emb = np.empty((len(texts), self.guide.dim), dtype=self.manifest["dtype"])
        for prompt in dict.fromkeys(prompts):
            rows = [i for i, p in enumerate(prompts) if p == prompt]
            lengths = self.guide.token_lengths([texts[i] for i in rows], prompt or None)
            b = self.batching
            for part in token_batches(lengths, b.max_texts, b.max_tokens):
                idx = [rows[j] for j in part]
                emb[idx] = self._encode([texts[i] for i in idx], prompt, table, idx).numpy()
                yield len(idx)
        with output_file(shard_path(self.folder, k)) as tmp:
            np.save(tmp, emb)

    @torch.no_grad()
    def _encode(self, texts: list[str], prompt: str, table, idx: list[int]) -> torch.Tensor:
        try:
            out = self.guide.encode_batch(texts, prompt or None)
        except Exception:  # noqa: BLE001 - find the text it fails on, then say which
            for text, i in zip(texts, idx):
                try:
                    self.guide.encode_batch([text], prompt or None)
                except Exception as e:  # noqa: BLE001 - any failure of the model on one text
                    column, row = table.column("column")[i].as_py(), table.column("row")[i].as_py()
                    cause = str(e).strip().splitlines()
                    raise DataError(
                        f"the guide fails on column {column!r} row {row + 1} (index {row}) of "
                        f"the data of guide cache {self.name} ({type(e).__name__}: "
                        f"{cause[0][:160] if cause else ''}); fix or drop that row, or set "
                        "data.guide_cache=false"
                    ) from e
            raise
        return torch.nn.functional.normalize(out.float(), dim=-1)


def run_local(cfg, folder: str, shards: list[int]) -> Iterator[int]:
    """The job in this process: embed ``shards`` one after the other, yielding each batch's
    text count."""
    embedder = ShardEmbedder(cfg.to_dict(), str(folder))
    for k in shards:
        yield from embedder.shard_batches(k)
