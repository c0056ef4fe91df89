"""The global negative pool: W workers × b rows == 1 process × W·b rows, loss and gradients.

Two real gloo processes (torch.multiprocessing) run the same small encoder on their halves of a
fixed batch through ``GistLoss(gather=True)``; after averaging gradients as training does, the
loss and every parameter gradient must match a single process on the whole batch. The gather's
backward is run both ways it can go (all-to-all, gloo's default, and reduce-scatter, NCCL's),
and checked on its own against the sum it must compute.
"""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gist_ray.core.distributed as gdist
from gist_ray.loss import GistLoss

B, D_IN, D, D_G = 12, 10, 8, 6  # global rows; encoder input, student and guide widths
MODES = ("all_to_all", "reduce_scatter")


def _encoder() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))


def _batch(num_neg: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(B, D_IN, generator=g) for _ in range(2 + num_neg)]
    # Guide twins correlated with the inputs so the mask is neither empty nor full.
    proj = torch.randn(D_IN, D_G, generator=g)
    gx = [xi @ proj + 0.7 * torch.randn(B, D_G, generator=g) for xi in x]
    return x, gx


# Loss settings beyond the defaults: Matryoshka widths (one guide mask for every width) and
# hardness weighting, each on its own and together.
SETTINGS = {
    "plain": {},
    "mrl": {"matryoshka_dims": [D, 4, 2], "matryoshka_weights": [1.0, 0.5, 2.0]},
    "hard": {"hardness_alpha": 3.0, "hardness_mode": "all_negatives"},
    "mrl+hard": {"matryoshka_dims": [D, 3], "hardness_alpha": 2.0,
                 "hardness_mode": "in_batch_negatives"},
}  # fmt: skip


def _loss_and_grads(model, x, gx, backend, gather, settings="plain"):
    loss_fn = GistLoss(temperature=0.05, backend=backend, gather=gather, **SETTINGS[settings])
    loss, stats = loss_fn([model(xi) for xi in x], gx)
    model.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], stats


CASES = [(backend, k, "plain") for backend in ("reference", "chunked", "triton") for k in (0, 1, 2)]
CASES += [(backend, 1, extra) for backend in ("reference", "chunked", "triton")
          for extra in ("mrl", "hard", "mrl+hard")]  # fmt: skip


def _gather_grad_check(rank: int, world: int, mode: str) -> float:
    """d/dx_r of Σ_j w_j · gathered_j with w different on every rank: the gradient of rank r's
    rows is the sum over ranks of their weights' block r."""
    x = torch.full((3, 2), float(rank), requires_grad=True)
    w = torch.arange(world * 6, dtype=torch.float32).view(world * 3, 2) * (rank + 1)
    gathered = gdist.all_gather_with_grad(x, backward=mode)
    assert torch.equal(gathered[rank * 3 : (rank + 1) * 3], x.detach())
    (gathered * w).sum().backward()
    block = torch.arange(world * 6, dtype=torch.float32).view(world * 3, 2)[rank * 3 : rank * 3 + 3]
    expected = block * sum(r + 1 for r in range(world))
    return (x.grad - expected).abs().max().item()


def _worker(rank: int, world: int, init_file: str, out: str, seed: int) -> None:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this process
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for mode in MODES:
            gather = functools.partial(gdist.all_gather_with_grad, backward=mode)
            results[("gather_grad_err", mode)] = _gather_grad_check(rank, world, mode)
            for backend, num_neg, settings in CASES:
                model = _encoder()
                x, gx = _batch(num_neg, seed)
                b = B // world
                rows = slice(rank * b, (rank + 1) * b)
                loss, grads, stats = _loss_and_grads(
                    model, [t[rows] for t in x], [t[rows] for t in gx], backend, gather, settings
                )
                # What training does: average the loss for logging and the gradients (DDP).
                dist.all_reduce(loss)
                for g in grads:
                    dist.all_reduce(g)
                results[(mode, backend, num_neg, settings)] = {
                    "loss": loss / world,
                    "grads": [g / world for g in grads],
                }
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_worker_results(tmp_path_factory):
    """One 2-process gloo group runs every case (spawning is the slow part)."""
    tmp = tmp_path_factory.mktemp("dist")
    seed = int(torch.randint(0, 2**31, ()).item())
    out = str(tmp / "rank0.pt")
    mp.start_processes(
        _worker,
        args=(2, tempfile.mktemp(dir=tmp), out, seed),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return seed, torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("backend", "num_neg", "settings"), CASES)
def test_two_workers_equal_one_process(mode, backend, num_neg, settings, two_worker_results):
    seed, results = two_worker_results
    two = results[(mode, backend, num_neg, settings)]
    x, gx = _batch(num_neg, seed)
    one_loss, one_grads, _ = _loss_and_grads(_encoder(), x, gx, backend, False, settings)
    torch.testing.assert_close(two["loss"], one_loss, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    for g2, g1 in zip(two["grads"], one_grads):
        err = ((g2 - g1).norm() / g1.norm()).item()  # relative error of each parameter's grad
        assert err < 1e-5, f"seed {seed}: relative gradient error {err:.2e}"
    assert any(g.abs().sum() > 0 for g in one_grads)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_gather_backward_sums_every_rank(mode, two_worker_results):
    _, results = two_worker_results
    assert results[("gather_grad_err", mode)] == 0.0


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert gdist.all_gather_with_grad(x) is x
    assert not dist.is_initialized()
