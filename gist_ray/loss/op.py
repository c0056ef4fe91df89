"""The tiled GIST loss as a ``torch.library`` custom op, with its autograd formula.

``gist_ray::gist_rows`` runs a tiled backend's forward (the Triton kernels on CUDA, ``chunked``
on the CPU; docs/loss.md "Backends") and returns, per local row, the loss, the masked counts, the
above counts and the threshold, plus the log-sum-exp and the mask bits its backward needs.
``gist_ray::gist_rows_backward`` is that backward. As custom ops with fake (meta) functions they
are opaque to ``torch.compile``: a compiled training step keeps the loss in one graph instead of
breaking around an ``autograd.Function``, and nothing in them syncs the host on CUDA.

Import cost: torch only; the Triton launchers are imported the first time a CUDA (or, under
``TRITON_INTERPRET=1``, an explicit ``backend="triton"``) call runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gist_ray.loss import chunked
from gist_ray.loss.plan import BackendOutput, Problem, Segment, mask_bits_shape

TILED = ("chunked", "triton")


def resolve(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``chunked`` elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return backend


def _problem(left, cands, guide_left, guide_cands, seg_left, seg_cand, seg_diag, offset,
             temperature, margin, strategy) -> Problem:  # fmt: skip
    triples = zip(seg_left, seg_cand, seg_diag)
    segs = tuple(Segment(f"s{j}", lf, c, dg) for j, (lf, c, dg) in enumerate(triples))
    return Problem(
        tuple(left), tuple(cands), tuple(guide_left), tuple(guide_cands), segs, offset,
        temperature, margin, strategy,
    )  # fmt: skip


def _triton():
    from gist_ray.kernels import gist_function  # imports triton

    return gist_function


@torch.library.custom_op("gist_ray::gist_rows", mutates_args=())
def gist_rows(
    left: list[Tensor],
    cands: list[Tensor],
    guide_left: list[Tensor],
    guide_cands: list[Tensor],
    seg_left: list[int],
    seg_cand: list[int],
    seg_diag: list[int],
    offset: int,
    temperature: float,
    margin: float,
    strategy: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, masked, above, threshold, lse, bits)``; see :class:`plan.BackendOutput`."""
    p = _problem(left, cands, guide_left, guide_cands, seg_left, seg_cand, seg_diag, offset,
                 temperature, margin, strategy)  # fmt: skip
    if resolve(backend, left[0].device) == "triton":
        return _triton().forward(p)
    return chunked.forward(p)


@gist_rows.register_fake
def _(left, cands, guide_left, guide_cands, seg_left, seg_cand, seg_diag, offset, temperature,
      margin, strategy, backend):  # fmt: skip
    b, dev = left[0].shape[0], left[0].device
    row = left[0].new_empty(b, dtype=torch.float32)
    bits = mask_bits_shape(len(seg_left), b, cands[0].shape[0], dev)
    return (
        row, left[0].new_empty(b, len(seg_left), dtype=torch.int64),
        left[0].new_empty(b, dtype=torch.int64), torch.empty_like(row), torch.empty_like(row),
        left[0].new_empty(bits, dtype=torch.uint8),
    )  # fmt: skip


@torch.library.custom_op("gist_ray::gist_rows_backward", mutates_args=())
def gist_rows_backward(
    grad: Tensor,
    lse: Tensor,
    bits: Tensor,
    left: list[Tensor],
    cands: list[Tensor],
    guide_left: list[Tensor],
    guide_cands: list[Tensor],
    seg_left: list[int],
    seg_cand: list[int],
    seg_diag: list[int],
    offset: int,
    temperature: float,
    margin: float,
    strategy: str,
    backend: str,
) -> list[Tensor]:
    """``[d left_0, d left_1, d cands_0, ...]`` of ``Σ_i grad_i · loss_i``."""
    p = _problem(left, cands, guide_left, guide_cands, seg_left, seg_cand, seg_diag, offset,
                 temperature, margin, strategy)  # fmt: skip
    if resolve(backend, left[0].device) == "triton":
        dleft, dcands = _triton().backward(p, grad, lse, bits)
    else:
        dleft, dcands = chunked.backward(p, grad, lse, bits)
    return [*dleft, *dcands]


@gist_rows_backward.register_fake
def _(grad, lse, bits, left, cands, *args):
    return [torch.empty_like(x) for x in (*left, *cands)]


def _setup_context(ctx, inputs, output) -> None:
    left, cands, guide_left, guide_cands = inputs[:4]
    ctx.args = inputs[4:]
    ctx.save_for_backward(output[4], output[5], *left, *cands, *guide_left, *guide_cands)
    ctx.sizes = (len(left), len(cands), len(guide_left))


def _backward(ctx, grad, _masked, _above, _threshold, _lse, _bits):
    lse, bits, *tensors = ctx.saved_tensors
    n_left, n_cands, n_gl = ctx.sizes
    left, cands = tensors[:n_left], tensors[n_left : n_left + n_cands]
    guide_left = tensors[n_left + n_cands : n_left + n_cands + n_gl]
    guide_cands = tensors[n_left + n_cands + n_gl :]
    grads = gist_rows_backward(grad, lse, bits, left, cands, guide_left, guide_cands, *ctx.args)
    no_grad = [None] * len(ctx.args)
    return grads[:n_left], grads[n_left:], [None] * n_gl, [None] * len(guide_cands), *no_grad


gist_rows.register_autograd(_backward, setup_context=_setup_context)


def tiled_backend(p: Problem, backend: str = "auto") -> BackendOutput:
    """Run ``p`` through :func:`gist_rows` (``backend``: ``auto``, ``chunked`` or ``triton``)."""
    loss, masked, above, threshold, _, _ = gist_rows(
        list(p.left), list(p.cands), list(p.guide_left), list(p.guide_cands),
        [s.left for s in p.segments], [s.cand for s in p.segments],
        [s.diag for s in p.segments], p.offset, p.temperature, p.margin, p.strategy, backend,
    )  # fmt: skip
    return BackendOutput(loss, masked, above, threshold)
