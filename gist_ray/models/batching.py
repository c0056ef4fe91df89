"""How inference encodes are batched: texts sorted by token length (similar lengths pad alike),
cut into batches by a text count and, on a GPU, a budget of padded tokens (short texts go in large
batches, long ones in small, so every batch fills the device about equally).

Pure functions; :class:`gist_ray.models.encoder.Encoder` and the guide cache use them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InferenceBatching:
    """Batch shape and precision of an inference encode on one kind of device."""

    max_texts: int  # texts per batch
    max_tokens: int | None  # padded tokens per batch (texts x the batch's longest); None = no cap
    autocast: torch.dtype | None  # the forward's autocast dtype; None = the model's own


# CPU: a batch's cost is its tokens, so larger batches buy nothing; fp32 (bf16 matmuls on CPUs
# without AMX are slower, and results stay those of the fp32 guide).
CPU_BATCHING = InferenceBatching(max_texts=64, max_tokens=None, autocast=None)
# CUDA: bf16 autocast, and batches of up to 64k padded tokens (a base model's activations at that
# size are a few GB; the cache stores fp16 anyway).
CUDA_BATCHING = InferenceBatching(max_texts=4096, max_tokens=65_536, autocast=torch.bfloat16)


def batching_for(device: torch.device | str) -> InferenceBatching:
    return CUDA_BATCHING if torch.device(device).type == "cuda" else CPU_BATCHING


def token_batches(
    lengths: Sequence[int], max_texts: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` (token counts) in batches: longest first, each batch at most
    ``max_texts`` texts and (when given) at most ``max_tokens`` padded tokens, i.e. its text count
    times its longest text. A text longer than ``max_tokens`` gets a batch of its own. Ties keep
    their input order, so the result is a function of the lengths alone."""
    if max_texts < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"max_texts ({max_texts}) and max_tokens ({max_tokens}) must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            last = batches[-1]
            longest = lengths[last[0]]  # sorted: the batch's first text is its longest
            fits = len(last) < max_texts and (
                max_tokens is None or (len(last) + 1) * longest <= max_tokens
            )
            if fits:
                last.append(i)
                continue
        batches.append([i])
    return batches
