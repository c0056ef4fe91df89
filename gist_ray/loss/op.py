"""The tiled GIST loss as a ``torch.library`` custom op, with its autograd formula.

``gist_ray::gist_rows`` runs a tiled backend's forward (the Triton kernels on CUDA, ``chunked``
on the CPU; docs/loss.md "Backends") and returns, per local row, the loss, the masked counts, the
above counts and the threshold, plus the log-sum-exp and the mask bits its backward needs.
``gist_ray::gist_rows_backward`` is that backward. As custom ops with fake (meta) functions they
are opaque to ``torch.compile``: a compiled training step keeps the loss in one graph instead of
breaking around an ``autograd.Function``, and nothing in them syncs the host on CUDA.

Both ops take the problem (:class:`plan.Problem`, flattened) as the same arguments, defined
once in :data:`PROBLEM`. Import cost: torch only; the Triton launchers are imported the first
time a CUDA (or, under ``TRITON_INTERPRET=1``, an explicit ``backend="triton"``) call runs.
"""

from __future__ import annotations

import torch

from gist_ray.loss import chunked
from gist_ray.loss.plan import BackendOutput, Problem, Segment, mask_bits_shape

PROBLEM = (
    "Tensor[] left, Tensor[] cands, Tensor[] guide_left, Tensor[] guide_cands, int[] seg_left, "
    "int[] seg_cand, int[] seg_diag, int offset, float temperature, float margin, str strategy, "
    "str backend"
)
N_TENSOR_LISTS = 4  # left, cands, guide_left, guide_cands
torch.library.define(
    "gist_ray::gist_rows", f"({PROBLEM}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
torch.library.define(
    "gist_ray::gist_rows_backward", f"(Tensor grad, Tensor lse, Tensor bits, {PROBLEM}) -> Tensor[]"
)
gist_rows = torch.ops.gist_ray.gist_rows.default
gist_rows_backward = torch.ops.gist_ray.gist_rows_backward.default


def resolve(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``chunked`` elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return backend


def _unpack(args: tuple) -> tuple[Problem, str]:
    """The op's problem arguments back into a Problem, and the backend that runs it."""
    left, cands, guide_left, guide_cands, seg_left, seg_cand, seg_diag, *rest = args
    offset, temperature, margin, strategy, backend = rest
    triples = zip(seg_left, seg_cand, seg_diag)
    segs = tuple(Segment(f"s{j}", lf, c, dg) for j, (lf, c, dg) in enumerate(triples))
    p = Problem(tuple(left), tuple(cands), tuple(guide_left), tuple(guide_cands), segs, offset,
                temperature, margin, strategy)  # fmt: skip
    return p, resolve(backend, left[0].device)


def _triton():
    from gist_ray.kernels import gist_function  # imports triton

    return gist_function


@torch.library.impl("gist_ray::gist_rows", "CompositeExplicitAutograd")
def _forward(*args):
    """``(loss, masked, above, threshold, lse, bits)``; see :class:`plan.BackendOutput`."""
    p, backend = _unpack(args)
    return _triton().forward(p) if backend == "triton" else chunked.forward(p)


@torch.library.register_fake("gist_ray::gist_rows")
def _forward_fake(*args):
    left, cands, seg_left = args[0], args[1], args[4]
    b, dev = left[0].shape[0], left[0].device
    row = left[0].new_empty(b, dtype=torch.float32)
    bits = mask_bits_shape(len(seg_left), b, cands[0].shape[0], dev)
    return (
        row, left[0].new_empty(b, len(seg_left), dtype=torch.int64),
        left[0].new_empty(b, dtype=torch.int64), torch.empty_like(row), torch.empty_like(row),
        left[0].new_empty(bits, dtype=torch.uint8),
    )  # fmt: skip


@torch.library.impl("gist_ray::gist_rows_backward", "CompositeExplicitAutograd")
def _backward_impl(grad, lse, bits, *args):
    """``[d left_0, d left_1, d cands_0, ...]`` of ``Σ_i grad_i · loss_i``."""
    p, backend = _unpack(args)
    run = _triton().backward if backend == "triton" else chunked.backward
    dleft, dcands = run(p, grad, lse, bits)
    return [*dleft, *dcands]


@torch.library.register_fake("gist_ray::gist_rows_backward")
def _backward_fake(grad, lse, bits, left, cands, *args):
    return [torch.empty_like(x) for x in (*left, *cands)]


def _setup_context(ctx, inputs, output) -> None:
    lists = inputs[:N_TENSOR_LISTS]
    ctx.args = inputs[N_TENSOR_LISTS:]
    ctx.sizes = [len(x) for x in lists]
    ctx.save_for_backward(output[4], output[5], *(t for x in lists for t in x))


def _backward(ctx, grad, _masked, _above, _threshold, _lse, _bits):
    lse, bits, *flat = ctx.saved_tensors
    lists, start = [], 0
    for size in ctx.sizes:
        lists.append(flat[start : start + size])
        start += size
    grads = gist_rows_backward(grad, lse, bits, *lists, *ctx.args)
    n_left = ctx.sizes[0]
    no_grad = [[None] * size for size in ctx.sizes[2:]]
    return grads[:n_left], grads[n_left:], *no_grad, *([None] * len(ctx.args))


torch.library.register_autograd("gist_ray::gist_rows", _backward, setup_context=_setup_context)


def tiled_backend(p: Problem, backend: str = "auto") -> BackendOutput:
    """Run ``p`` through :data:`gist_rows` (``backend``: ``auto``, ``chunked`` or ``triton``)."""
    loss, masked, above, threshold, _, _ = gist_rows(
        list(p.left), list(p.cands), list(p.guide_left), list(p.guide_cands),
        [s.left for s in p.segments], [s.cand for s in p.segments],
        [s.diag for s in p.segments], p.offset, p.temperature, p.margin, p.strategy, backend,
    )  # fmt: skip
    return BackendOutput(loss, masked, above, threshold)
