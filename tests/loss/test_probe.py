"""The kernel check (gist_ray.loss.probe): real backends pass it, and each kind of fault a
kernel can have (an exception, a wrong loss, a wrong mask count, a wrong gradient) fails it with
a one-line reason. Faulty kernels run through the real custom op (tests/loss/faulty.py)."""

from __future__ import annotations

import functools

import pytest
import torch

import tests.loss.faulty as faulty
from gist_ray.loss.op import tiled_backend
from gist_ray.loss.plan import mask_limit
from gist_ray.loss.probe import MARGIN, probe, probe_isolated, problem
from gist_ray.loss.reference import reference_backend


def _tiled(name: str):
    return functools.partial(tiled_backend, backend=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_real_backends_pass(backend, dtype):
    """``triton`` runs under the interpreter here (tests/conftest.py), on a GPU natively."""
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    assert probe(_tiled(backend), device, dtype, dim=32) is None


def test_the_reference_passes_against_itself_at_other_sizes():
    assert probe(reference_backend, "cpu", torch.float32, dim=20, guide_dim=16, rows=5) is None


@pytest.mark.parametrize(
    "kernel, expected",
    [
        (faulty.Raising, "RuntimeError: CUDA error: an illegal memory access was encountered"),
        (faulty.WrongLoss, "loss differs from the reference by"),
        (faulty.WrongMask, "masked counts differ from the reference in 1 of 37 rows"),
        (faulty.WrongGradient, "gradient of the anchor rows differs from the reference by"),
    ],
)
def test_faults_are_found_in_one_line(kernel, expected):
    reason = probe(_tiled(faulty.register(kernel())), "cpu", torch.bfloat16, dim=32)
    assert reason is not None and reason.startswith(expected), reason
    assert "\n" not in reason


def test_no_pair_of_the_problem_is_near_its_mask_limit():
    """Dyadic guides: every guide cosine is a multiple of 1/16, the limit t_i - 0.05 is 1/80 from
    the nearest one, so a correct kernel cannot decide a mask differently from the reference
    by rounding; and some candidates are masked, none of the rows entirely."""
    p = problem(torch.device("cpu"), torch.bfloat16, 64, 48, 37, 3, 1, 0)
    gl = [x.double() for x in p.guide_left]
    gc = [x.double() for x in p.guide_cands]
    t = (gl[0] * gc[0][p.offset : p.offset + p.rows]).sum(1)
    limit = mask_limit(t, MARGIN, "absolute").unsqueeze(1)
    gaps = torch.cat([(gl[s.left] @ gc[s.cand].T - limit).abs() for s in p.segments], 1)
    assert gaps.min() >= 1 / 80 - 1e-9
    masked = reference_backend(p).masked.sum(1)
    assert masked.sum() > 0 and (masked < 4 * p.pool - 3).all()


def test_a_check_in_its_own_process():
    """What training runs on CUDA: the check in a fresh process (a kernel fault there cannot
    break the training process's CUDA context); here the interpreter's kernel and chunked pass,
    a kernel that raises there is the reason, and a process that dies gives its last line."""
    assert probe_isolated("triton", "cpu", torch.bfloat16, dim=32) is None
    assert probe_isolated("chunked", "cpu", torch.float32, dim=32) is None
    # a kernel registered here is unknown there: the op's lookup fails inside the check
    assert probe_isolated("no-such-kernel", "cpu", torch.float32) == "KeyError: 'no-such-kernel'"
    reason = probe_isolated("chunked", "cpu", torch.float64)  # probe() refuses: exit code 1
    assert reason is not None and "\n" not in reason
    assert reason.startswith("the check's process exited with code 1: ValueError: dtype")
