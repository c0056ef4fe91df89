"""The custom op ``gist_ray::gist_rows`` (gist_ray/loss/op.py): schema, fake functions and
autograd registration (``torch.library.opcheck``), and a ``torch.compile(fullgraph=True)``
training step on the CPU that matches eager mode."""

from __future__ import annotations

import pytest
import torch

from gist_ray.loss import GistLoss
from gist_ray.loss.op import gist_rows
from gist_ray.loss.plan import build_segments
from tests.loss.harness import Case, fresh_seed, make_inputs, make_problem


def _op_args(case: Case, widths: tuple[int, ...] = (), hardness: float = 0.0):
    """The op's arguments; ``widths``: Matryoshka widths (truncated, re-normalised copies of
    the student tensors, width after width)."""
    p = make_problem(case, make_inputs(case, fresh_seed()))
    unit = lambda x, w: torch.nn.functional.normalize(x[:, :w], dim=-1)  # noqa: E731
    widths = widths or (case.d,)
    left = [unit(x, w).requires_grad_() for w in widths for x in p.left]
    cands = [unit(x, w).requires_grad_() for w in widths for x in p.cands]
    segs, _ = build_segments(case.k, case.contrast_anchors, case.contrast_positives,
                             "all_negatives")  # fmt: skip
    return (left, cands, list(p.guide_left), list(p.guide_cands), [s.left for s in segs],
            [s.cand for s in segs], [s.diag for s in segs], [s.hard for s in segs], p.offset,
            p.temperature, p.margin, p.strategy, hardness, "chunked")  # fmt: skip


@pytest.mark.parametrize(
    "case, widths, hardness",
    [
        (Case(b=12, k=1, d=8, d_g=16), (), 0.0),
        (Case(b=9, world=2, rank=1, k=0, d=8, d_g=16), (), 0.0),
        (Case(b=12, k=1, d=8, d_g=16), (8, 4, 2), 3.0),
    ],
    ids=["k1", "rank1-of-2", "matryoshka-hardness"],
)
def test_opcheck(case, widths, hardness):
    torch.library.opcheck(gist_rows, _op_args(case, widths, hardness))


class _Encoder(torch.nn.Module):
    def __init__(self, d_in: int = 10, d: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, d))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # inductor: ~40 s of C++ compiling on the CI machine
def test_compiled_training_step_matches_eager(backend):
    """Encoder + GistLoss in one graph (fullgraph: no break at the loss), then backward and an
    optimizer step: same loss, statistics and gradients as eager mode."""
    torch.manual_seed(fresh_seed())
    x = [torch.randn(24, 10) for _ in range(3)]
    guide = [torch.randn(24, 12) for _ in range(3)]
    loss_fn = GistLoss(temperature=0.05, margin=0.02)

    def step(model):
        loss, stats = loss_fn([model(xi) for xi in x], guide)
        return loss, stats["mask_frac/all"]

    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _Encoder()
        run = torch.compile(step, fullgraph=True, backend=backend) if compiled else step
        loss, frac = run(model)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        results.append((loss.detach(), frac, grads))
    (loss, frac, grads), (c_loss, c_frac, c_grads) = results
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert float(c_frac) == float(frac) and 0 < float(frac) < 1
    for g, cg in zip(grads, c_grads):
        torch.testing.assert_close(cg, g, rtol=1e-4, atol=1e-6)
