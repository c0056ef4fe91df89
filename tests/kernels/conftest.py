"""Run the Triton kernels through the interpreter when there is no GPU.

Triton decides interpreted-or-compiled when a ``@triton.jit`` function is *defined*, i.e. when
``gist_ray.kernels.gist_kernels`` is first imported; this conftest runs before the test modules
of this folder import it. (``gist_ray.loss`` itself never imports triton.)
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: tiny matmuls, where OpenMP threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
