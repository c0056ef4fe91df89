"""The tiled GIST loss as a ``torch.library`` custom op, with its autograd formula.

``gist_ray::gist_rows`` runs a tiled backend's forward (the Triton kernels on CUDA, ``chunked``
on the CPU; docs/loss.md "Backends") and returns, per local row, the loss, the masked counts, the
above counts and the threshold, plus the log-sum-exp, the mask bits and (Triton) the guide's
inverse norms its backward needs.
``gist_ray::gist_rows_backward`` is that backward. As custom ops with fake (meta) functions they
are opaque to ``torch.compile``: a compiled training step keeps the loss in one graph instead of
breaking around an ``autograd.Function``, and nothing in them syncs the host on CUDA.

Both ops take the problem (:class:`plan.Problem`, flattened) as the same arguments, defined
once in :data:`PROBLEM`. Import cost: torch only; the Triton launchers are imported the first
time a CUDA (or, under ``TRITON_INTERPRET=1``, an explicit ``backend="triton"``) call runs.
Which kernel a backend name runs is looked up in a registry (:func:`register_kernel`), so a
tool or test can run another kernel through the very same op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from gist_ray.loss import chunked
from gist_ray.loss.plan import BackendOutput, Problem, Segment, mask_bits_shape

PROBLEM = (
    "Tensor[] left, Tensor[] cands, Tensor[] guide_left, Tensor[] guide_cands, int[] seg_left, "
    "int[] seg_cand, int[] seg_diag, int[] seg_hard, int offset, float temperature, float margin, "
    "str strategy, float hardness, str backend"
)
N_TENSOR_LISTS = 4  # left, cands, guide_left, guide_cands
torch.library.define(
    "gist_ray::gist_rows",
    f"({PROBLEM}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    "gist_ray::gist_rows_backward",
    f"(Tensor grad, Tensor lse, Tensor bits, Tensor norms, {PROBLEM}) -> Tensor[]",
)
gist_rows = torch.ops.gist_ray.gist_rows.default
gist_rows_backward = torch.ops.gist_ray.gist_rows_backward.default


class TiledKernel(Protocol):
    """What :data:`gist_rows` runs: ``chunked``, the Triton kernels, or a registered one."""

    def forward(self, problems: Sequence[Problem]) -> tuple[torch.Tensor, ...]: ...

    def backward(
        self, problems: Sequence[Problem], grad: torch.Tensor, lse: torch.Tensor,
        bits: torch.Tensor,
    ) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]: ...  # fmt: skip


def _triton() -> TiledKernel:
    from gist_ray.kernels import gist_function  # imports triton

    return gist_function


# The tiled kernels by backend name, each loaded on first use (triton is imported only then).
_KERNELS: dict[str, Callable[[], TiledKernel]] = {"chunked": lambda: chunked, "triton": _triton}


def register_kernel(name: str, load: Callable[[], TiledKernel]) -> None:
    """Make ``backend=name`` run the tiled kernel ``load()`` returns (its ``forward`` and
    ``backward`` have :mod:`.chunked`'s signatures). For tools and tests that check another
    kernel through the same op and front end (e.g. one that fails, gist_ray.loss.select);
    ``chunked`` and ``triton`` cannot be replaced."""
    if name in ("auto", "reference", "chunked", "triton"):
        raise ValueError(f"backend name {name!r} is built in")
    _KERNELS[name] = load


def kernel_names() -> tuple[str, ...]:
    """Every tiled backend name :data:`gist_rows` accepts (built-in and registered)."""
    return tuple(_KERNELS)


def resolve(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``chunked`` elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return backend


def _unpack(args: tuple) -> tuple[list[Problem], str]:
    """The op's problem arguments back into Problems (one per Matryoshka width: ``left`` holds
    2 tensors per width, ``cands`` one per guide candidate tensor per width, width after
    width), and the backend that runs them."""
    left, cands, guide_left, guide_cands, seg_left, seg_cand, seg_diag, seg_hard, *rest = args
    offset, temperature, margin, strategy, hardness, backend = rest
    quads = zip(seg_left, seg_cand, seg_diag, seg_hard)
    segs = tuple(Segment(f"s{j}", lf, c, dg, h) for j, (lf, c, dg, h) in enumerate(quads))
    nc = len(guide_cands)
    problems = [
        Problem(
            tuple(left[2 * w : 2 * w + 2]),
            tuple(cands[nc * w : nc * (w + 1)]),
            tuple(guide_left),
            tuple(guide_cands),
            segs,
            offset,
            temperature,
            margin,
            strategy,
            hardness,
        )
        for w in range(len(left) // 2)
    ]
    return problems, resolve(backend, left[0].device)


@torch.library.impl("gist_ray::gist_rows", "CompositeExplicitAutograd")
def _forward(*args):
    """``(loss, masked, above, threshold, lse, bits, norms)``: ``loss``, ``above``, ``lse``
    ``[widths, b]``, the mask's ``masked``, ``threshold`` and ``bits`` once (:func:`tiled`);
    ``norms``: the guide rows' float32 inverse norms the Triton backward reuses (empty for
    ``chunked`` and registered kernels, which take :mod:`.chunked`'s signatures)."""
    problems, backend = _unpack(args)
    if backend == "triton":
        return _triton().forward(problems)
    out = _KERNELS[backend]().forward(problems)
    return (*out, args[0][0].new_empty(0, dtype=torch.float32))


def _norms_size(guide_left, guide_cands, backend: str) -> int:
    if resolve(backend, guide_left[0].device) != "triton":
        return 0
    return sum(x.shape[0] for x in (*guide_left, *guide_cands))


@torch.library.register_fake("gist_ray::gist_rows")
def _forward_fake(*args):
    left, cands, seg_left = args[0], args[1], args[4]
    nw, b, dev = len(left) // 2, left[0].shape[0], left[0].device
    norms = _norms_size(args[2], args[3], args[-1])
    rows = left[0].new_empty(nw, b, dtype=torch.float32)
    bits = mask_bits_shape(len(seg_left), b, cands[0].shape[0], dev)
    return (
        rows, left[0].new_empty(b, len(seg_left), dtype=torch.int64),
        left[0].new_empty(nw, b, dtype=torch.int64), left[0].new_empty(b, dtype=torch.float32),
        torch.empty_like(rows), left[0].new_empty(bits, dtype=torch.uint8),
        left[0].new_empty(norms, dtype=torch.float32),
    )  # fmt: skip


@torch.library.impl("gist_ray::gist_rows_backward", "CompositeExplicitAutograd")
def _backward_impl(grad, lse, bits, norms, *args):
    """``[d left..., d cands...]`` (every width's) of ``Σ_w Σ_i grad[w, i] · loss[w, i]``."""
    problems, backend = _unpack(args)
    if backend == "triton":
        dleft, dcands = _triton().backward(problems, grad, lse, bits, norms)
    else:
        dleft, dcands = _KERNELS[backend]().backward(problems, grad, lse, bits)
    return [*dleft, *dcands]


@torch.library.register_fake("gist_ray::gist_rows_backward")
def _backward_fake(grad, lse, bits, norms, left, cands, *args):
    return [torch.empty_like(x) for x in (*left, *cands)]


def _setup_context(ctx, inputs, output) -> None:
    lists = inputs[:N_TENSOR_LISTS]
    ctx.args = inputs[N_TENSOR_LISTS:]
    ctx.sizes = [len(x) for x in lists]
    ctx.save_for_backward(output[4], output[5], output[6], *(t for x in lists for t in x))


def _backward(ctx, grad, _masked, _above, _threshold, _lse, _bits, _norms):
    lse, bits, norms, *flat = ctx.saved_tensors
    lists, start = [], 0
    for size in ctx.sizes:
        lists.append(flat[start : start + size])
        start += size
    grads = gist_rows_backward(grad, lse, bits, norms, *lists, *ctx.args)
    n_left = ctx.sizes[0]
    no_grad = [[None] * size for size in ctx.sizes[2:]]
    return grads[:n_left], grads[n_left:], *no_grad, *([None] * len(ctx.args))


torch.library.register_autograd("gist_ray::gist_rows", _backward, setup_context=_setup_context)


def tiled(problems: Sequence[Problem], backend: str = "auto") -> list[BackendOutput]:
    """Run ``problems`` through :data:`gist_rows` (``backend``: ``auto``, ``chunked`` or
    ``triton``): one problem per Matryoshka width, all with the first one's guide, segments and
    settings, whose mask is computed once and reused by every width. Every output carries the
    mask's ``masked`` and ``threshold``; ``loss`` and ``above`` are the width's own."""
    p = problems[0]
    loss, masked, above, threshold, *_ = gist_rows(
        [x for q in problems for x in q.left], [x for q in problems for x in q.cands],
        list(p.guide_left), list(p.guide_cands), [s.left for s in p.segments],
        [s.cand for s in p.segments], [s.diag for s in p.segments],
        [s.hard for s in p.segments], p.offset, p.temperature, p.margin, p.strategy, p.hardness,
        backend,
    )  # fmt: skip
    return [BackendOutput(loss[w], masked, above[w], threshold) for w in range(len(problems))]


def tiled_backend(p: Problem, backend: str = "auto") -> BackendOutput:
    """Run one problem through :data:`gist_rows`."""
    return tiled([p], backend)[0]
