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


def test_unsupported_guide_dtype():
    student, guide = _batch()
    guide[2] = guide[2].double()
    _fails(student, guide, "guide_negative_1 has dtype torch.float64")


def test_operands_on_different_devices():
    student, guide = _batch()
    guide[0] = guide[0].to("meta")
    _fails(student, guide, "guide_anchor is on meta but anchor is on cpu")


def test_widths_must_match_between_segments():
    student, guide = _batch()
    student[2] = torch.randn(4, 9)
    _fails(student, guide, "negative_1 has width 9, anchor has 8")
    student, guide = _batch()
    guide[1] = torch.randn(4, 7)
    _fails(student, guide, "guide_positive has width 7, guide_anchor has 6")


def test_rows_and_shapes():
    student, guide = _batch()
    guide[2] = torch.randn(3, 6)
    _fails(student, guide, "guide_negative_1 has 3 rows, anchor has 4")
    student, guide = _batch()
    student[0] = torch.randn(4, 8, 1)
    _fails(student, guide, r"anchor must be a 2-d tensor \[rows, width\], got shape \(4, 8, 1\)")
    student, guide = _batch(b=0)
    _fails(student, guide, "anchor has no rows")


def test_mixed_dtypes_are_brought_to_one():
    """A bf16 student with an fp32 guide (or guides of different dtypes) is fine: the front end
    casts every operand to the student's dtype."""
    student, guide = _batch()
    student = [x.bfloat16().requires_grad_() for x in student]
    guide[1] = guide[1].half()
    loss, _ = GistLoss()(student, guide)
    loss.backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in student)
