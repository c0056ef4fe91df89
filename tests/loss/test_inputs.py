"""Bad input to the loss: a clear one-line error naming the tensor, before anything runs."""

from __future__ import annotations

import pytest
import torch

from gist_ray.loss import GistLoss


def _batch(b: int = 4, d: int = 8, d_g: int = 6, k: int = 1):
    return [torch.randn(b, d) for _ in range(2 + k)], [torch.randn(b, d_g) for _ in range(2 + k)]


def _fails(student, guide, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        GistLoss()(student, guide)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool])
def test_unsupported_student_dtype(dtype):
    student, guide = _batch()
    student[1] = student[1].to(dtype)
    _fails(student, guide, rf"positive has dtype {dtype}; supported: float32, bfloat16, float16")


# (student or guide, column, the bad tensor, the message)
ONE_BAD_TENSOR = {
    "guide dtype": ("guide", 2, torch.randn(4, 6).double(),
                    "guide_negative_1 has dtype torch.float64"),
    "devices": ("guide", 0, torch.randn(4, 6, device="meta"),
                "guide_anchor is on meta but anchor is on cpu"),
    "student width": ("student", 2, torch.randn(4, 9), "negative_1 has width 9, anchor has 8"),
    "guide width": ("guide", 1, torch.randn(4, 7),
                    "guide_positive has width 7, guide_anchor has 6"),
    "rows": ("guide", 2, torch.randn(3, 6), "guide_negative_1 has 3 rows, anchor has 4"),
    "not 2-d": ("student", 0, torch.randn(4, 8, 1),
                r"anchor must be a 2-d tensor \[rows, width\], got shape \(4, 8, 1\)"),
}  # fmt: skip


@pytest.mark.parametrize("side, column, bad, match", ONE_BAD_TENSOR.values(), ids=ONE_BAD_TENSOR)
def test_one_bad_tensor_is_named(side, column, bad, match):
    student, guide = _batch()
    (student if side == "student" else guide)[column] = bad
    _fails(student, guide, match)


def test_empty_batch():
    _fails(*_batch(b=0), "anchor has no rows")


def test_mixed_dtypes_are_brought_to_one():
    """A bf16 student with an fp32 guide (or guides of different dtypes) is fine: the front end
    casts every operand to the student's dtype."""
    student, guide = _batch()
    student = [x.bfloat16().requires_grad_() for x in student]
    guide[1] = guide[1].half()
    loss, _ = GistLoss()(student, guide)
    loss.backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in student)
