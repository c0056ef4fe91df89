"""What ``loss.compute_dtype`` and ``loss.backend`` become on a device (gist_ray.loss.select):
plain functions of the setting and the device, asked here for both devices without a GPU; the
kernel a CUDA device would check is a registered one (tests/loss/faulty.py)."""

from __future__ import annotations

import pytest
import torch

import tests.loss.faulty as faulty
from gist_ray.core.errors import GistRayError
from gist_ray.loss import COMPUTE_DTYPES, GistLoss, choose_backend, compute_dtype_for

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "setting, cuda, cpu",
    [
        ("auto", torch.bfloat16, torch.float32),
        ("bfloat16", torch.bfloat16, torch.bfloat16),
        ("float32", torch.float32, torch.float32),
        ("float16", torch.float16, torch.float16),
    ],
)
def test_compute_dtype_per_device(setting, cuda, cpu):
    assert compute_dtype_for(setting, "cuda") == cuda
    assert compute_dtype_for(setting, torch.device("cuda", 3)) == cuda
    assert compute_dtype_for(setting, "cpu") == cpu
    assert compute_dtype_for(setting, CPU) == cpu


def test_unknown_compute_dtype_is_one_line_naming_the_key():
    with pytest.raises(ValueError) as e:
        compute_dtype_for("bf16", "cuda")
    assert str(e.value) == (
        "loss.compute_dtype: unknown dtype 'bf16'; allowed: " + ", ".join(COMPUTE_DTYPES)
    )
    with pytest.raises(ValueError, match="^loss.compute_dtype: unknown dtype 'half'"):
        GistLoss(compute_dtype="half")
    with pytest.raises(ValueError, match="^loss.compute_dtype: unknown dtype torch.float64"):
        GistLoss(compute_dtype=torch.float64)


def test_cpu_runs_chunked_without_checking_anything():
    kernel = faulty.Raising()
    name = faulty.register(kernel)
    for setting, expected in [
        ("auto", "chunked"),
        ("chunked", "chunked"),
        ("reference", "reference"),
    ]:
        choice = choose_backend(setting, CPU, torch.float32, kernel=name)
        assert (choice.backend, choice.checked, choice.fallback) == (expected, False, None)
    # triton on a CPU is the interpreter (the tests' way of running the kernel): not checked
    assert choose_backend("triton", CPU, torch.float32, kernel=name).backend == name
    assert kernel.calls == 0


def test_cuda_checks_a_good_kernel_once_per_process():
    kernel = faulty.Recording()
    name = faulty.register(kernel)
    for setting in ("auto", "triton", "auto"):
        choice = choose_backend(setting, CPU, torch.bfloat16, cuda=True, kernel=name, dim=32)
        assert (choice.backend, choice.checked, choice.fallback) == (name, True, None)
    assert kernel.calls == 1  # one forward: the check, cached for this device, dtype and width
    assert {dtype for dtype, _ in kernel.seen} == {torch.bfloat16}


@pytest.mark.parametrize("kernel", [faulty.Raising, faulty.WrongLoss, faulty.WrongGradient])
def test_auto_falls_back_to_chunked_and_triton_fails_in_one_line(kernel):
    name = faulty.register(kernel())
    choice = choose_backend("auto", CPU, torch.bfloat16, cuda=True, kernel=name, dim=32)
    assert choice.backend == "chunked" and not choice.checked
    assert choice.fallback and "\n" not in choice.fallback
    with pytest.raises(GistRayError) as e:
        choose_backend("triton", CPU, torch.bfloat16, cuda=True, kernel=name, dim=32)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"loss.backend = triton: the {name} kernel failed its check")
    assert choice.fallback in message and message.endswith(
        "set loss.backend: auto to train on chunked instead"
    )
