"""16-bit gradients on confident rows (the positive takes 0.9-0.995 of the softmax): every
backend against a float64 oracle, no worse than twice the plain autocast recipe."""

from __future__ import annotations

import pytest
import torch

from tests.loss.harness import check_confident_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_confident_rows(backend, dtype):
    check_confident_rows(backend, dtype)
