"""The global negative pool: W workers × b rows == 1 process × W·b rows, loss and gradients.

Two real gloo processes (torch.multiprocessing) run the same small encoder on their halves of a
fixed batch with ``gather=True``; after averaging gradients as training does, the loss and every
parameter gradient must match a single process on the whole batch.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gist_ray.loss import gist_loss

B, D_IN, D, D_G = 12, 10, 8, 6  # global rows; encoder input, student and guide widths


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


def _loss_and_grads(model, x, gx, backend, gather):
    emb = [model(xi) for xi in x]
    loss = gist_loss(
        emb[0],
        emb[1],
        gx[0],
        gx[1],
        emb[2:],
        gx[2:],
        temperature=0.05,
        backend=backend,
        gather=gather,
    )
    model.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


CASES = [(backend, k) for backend in ("reference", "chunked", "triton") for k in (0, 1, 2)]


def _worker(rank: int, world: int, init_file: str, out: str, seed: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for backend, num_neg in CASES:
            model = _encoder()
            x, gx = _batch(num_neg, seed)
            b = B // world
            rows = slice(rank * b, (rank + 1) * b)
            loss, grads = _loss_and_grads(
                model, [t[rows] for t in x], [t[rows] for t in gx], backend, gather=True
            )
            # What training does: average the loss for logging and the gradients (DDP).
            dist.all_reduce(loss)
            for g in grads:
                dist.all_reduce(g)
            results[(backend, num_neg)] = {
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


@pytest.mark.parametrize(("backend", "num_neg"), CASES)
def test_two_workers_equal_one_process(backend, num_neg, two_worker_results):
    seed, results = two_worker_results
    two = results[(backend, num_neg)]
    x, gx = _batch(num_neg, seed)
    one_loss, one_grads = _loss_and_grads(_encoder(), x, gx, backend, gather=False)
    torch.testing.assert_close(two["loss"], one_loss, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    for g2, g1 in zip(two["grads"], one_grads):
        err = ((g2 - g1).norm() / g1.norm()).item()  # relative error of each parameter's grad
        assert err < 1e-5, f"seed {seed}: relative gradient error {err:.2e}"
    assert any(g.abs().sum() > 0 for g in one_grads)


def test_gather_is_identity_without_process_group():
    from gist_ray.distributed import all_gather_with_grad

    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert not dist.is_initialized()
