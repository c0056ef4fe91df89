"""Duplicate texts make exact ties ``g = t_i``; every backend keeps them (strict ``>``) and
counts the same masked candidates per segment as ``reference`` and the definition."""

from __future__ import annotations

import functools

import pytest
import torch

from gist_ray.loss.op import tiled_backend
from gist_ray.loss.reference import reference_backend
from tests.loss.harness import Case, check_ties

BACKENDS = {"reference": reference_backend,
            "chunked": functools.partial(tiled_backend, backend="chunked")}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
@pytest.mark.parametrize("strategy", ["absolute", "relative"])
@pytest.mark.parametrize(
    "case",
    [Case(b=40, k=1), Case(b=30, k=2, world=2, rank=1), Case(b=33, k=0, contrast_anchors=False)],
    ids=["b40-k1", "b30-k2-rank1-of-2", "b33-k0-noaa"],
)
def test_duplicates_tie_exactly(backend, strategy, case):
    from dataclasses import replace

    check_ties(backend, replace(case, strategy=strategy))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_duplicates_tie_exactly_in_16_bit(dtype):
    check_ties(BACKENDS["chunked"], Case(b=40, k=1, dtype=dtype))
