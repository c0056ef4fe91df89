"""Gradient caching (GradCache, Gao et al. 2021): decouple the batch from encoder memory.

Pass 1 embeds each mini-batch without a graph, remembering the RNG state it started from.
The loss is computed on those embeddings (as leaf tensors) and backpropagated to them only.
Pass 2 replays each mini-batch from its saved RNG state (so dropout draws the same masks), with
a graph, and backpropagates the cached embedding gradients into the encoder. Peak activation
memory is one mini-batch; the parameter gradients equal those of one big backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gist_ray.models.encoder import Encoder


def _get_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class CachedColumn:
    texts: list[str]
    prompt: str | None
    embeddings: torch.Tensor  # [n, d], a leaf that collects the loss gradient
    rng_states: list[tuple[torch.Tensor, torch.Tensor | None]]


def embed_without_graph(
    encoder: Encoder,
    texts: list[str],
    mini_batch_size: int,
    autocast: Callable,
    prompt: str | None = None,
) -> CachedColumn:
    """Pass 1: embed ``texts`` (with ``prompt``) in mini-batches with no graph, saving each
    one's RNG state. The embeddings keep the autocast dtype: the loss casts at its front end."""
    states, chunks = [], []
    with torch.no_grad():
        for i in range(0, len(texts), mini_batch_size):
            states.append(_get_rng(encoder.device))
            with autocast():
                chunks.append(encoder.embed(texts[i : i + mini_batch_size], prompt))
    emb = torch.cat(chunks).requires_grad_()
    return CachedColumn(texts, prompt, emb, states)


def backward_with_replay(
    encoder: Encoder, column: CachedColumn, mini_batch_size: int, autocast: Callable
) -> None:
    """Pass 2: re-embed each mini-batch with a graph from its saved RNG state and push the
    cached gradient through it. Leaves the RNG where pass 1 left it."""
    grad = column.embeddings.grad
    if grad is None:
        return
    after_pass_one = _get_rng(encoder.device)
    for j, i in enumerate(range(0, len(column.texts), mini_batch_size)):
        _set_rng(column.rng_states[j], encoder.device)
        with autocast():
            emb = encoder.embed(column.texts[i : i + mini_batch_size], column.prompt)
        emb.backward(grad[i : i + mini_batch_size].to(emb.dtype))
    _set_rng(after_pass_one, encoder.device)
