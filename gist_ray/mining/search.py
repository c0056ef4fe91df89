"""Exact top-k inner-product search of queries against a corpus.

``torch``: queries x corpus in chunks, each chunk's top-k merged into a running top-k, so memory
is bounded by one (query chunk x corpus chunk) block whatever the corpus size. ``faiss``: an
``IndexFlatIP`` (exhaustive, so exact too), used when faiss is installed. Both return the same
candidates in the same order (descending score) up to ties at equal scores.
"""

from __future__ import annotations

import importlib.util

import torch

from gist_ray.config import MINE_BACKENDS
from gist_ray.core.errors import ConfigError

BACKENDS = MINE_BACKENDS


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(name: str) -> str:
    """``auto`` is faiss when installed, else torch; ``faiss`` without faiss is an error."""
    if name == "auto":
        return "faiss" if faiss_available() else "torch"
    if name == "faiss" and not faiss_available():
        raise ConfigError(
            "mine.backend = 'faiss' but faiss is not installed; pip install 'gist-ray[mine]' "
            "(faiss-cpu) or use mine.backend=torch"
        )
    return name


class Searcher:
    """The corpus (rows L2-normalised by the caller), indexed once; :meth:`top_k` per query
    chunk."""

    def __init__(self, corpus: torch.Tensor, backend: str = "torch", corpus_chunk: int = 65536):
        self.corpus, self.backend, self.corpus_chunk = corpus, backend, corpus_chunk
        self.index = None
        if backend == "faiss":
            import faiss

            self.index = faiss.IndexFlatIP(corpus.shape[1])
            self.index.add(corpus.float().cpu().contiguous().numpy())

    def __len__(self) -> int:
        return self.corpus.shape[0]

    def top_k(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, corpus ids), each (queries, k), best first, of ``queries @ corpus.T``."""
        k = min(k, len(self))
        if self.index is not None:
            scores, ids = self.index.search(queries.float().cpu().contiguous().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(ids).long()
        return chunked_top_k(queries, self.corpus, k, self.corpus_chunk)


def chunked_top_k(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, corpus_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``queries @ corpus.T`` holding one (queries x corpus_chunk) block at a time."""
    best_s = queries.new_empty(queries.shape[0], 0)
    best_i = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, corpus.shape[0], corpus_chunk):
        block = queries @ corpus[start : start + corpus_chunk].T
        s, i = torch.topk(block, min(k, block.shape[1]), dim=1)
        # The merge keeps the running best first, so equal scores keep corpus order.
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = s.gather(1, order), i.gather(1, order)
    return best_s, best_i
