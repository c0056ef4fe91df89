"""The problems the doctor checks: sizes that cross the tiled backends' seams, and random inputs
whose masking decisions every backend must make identically.

A case is one worker's view of a gathered batch: ``b`` local query rows, a pool of ``world · b``
candidates, and the local rows' positives at columns ``rank · b ..`` of the pool. ``small``
fits in one tile of every kernel; ``seams`` is sized from the backend's own constants so that
the pool spans more than one forward column split and more than one backward chunk, with the
local rows' diagonal (positives, self-pairs) straddling the first chunk boundary.

Guide rows are *dyadic* (16 entries of ±1/4, the rest 0): unit vectors in every dtype whose dot
products are multiples of 1/16, exact in any summation order, on any hardware. So the kernel
and the reference must mask exactly the same candidates, and masked counts are compared for
equality; only the student side carries rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gist_ray.doctor.settings import Settings
from gist_ray.loss import chunked
from gist_ray.loss.plan import Problem, build_segments


@dataclass(frozen=True)
class Case:
    name: str
    b: int  # local query rows
    world: int  # pool = world · b candidates per segment
    rank: int  # the local rows are the pool's rows rank · b ..
    d: int  # student width (the widest Matryoshka width when configured)
    d_g: int  # guide width
    chunk: int  # columns per backward chunk of the backend at this b (informational)

    @property
    def pool(self) -> int:
        return self.world * self.b

    @property
    def offset(self) -> int:
        return self.rank * self.b

    @property
    def chunks(self) -> int:
        return -(-self.pool // self.chunk)


def _seam_case(b: int, chunk: int, d: int, d_g: int) -> Case:
    """``b`` rows and a pool just past one chunk, the diagonal across the boundary (``b`` must
    not divide ``chunk``)."""
    rank = chunk // b
    return Case("seams", b, rank + 2, rank, d, d_g, chunk)


def triton_chunk(b: int) -> int:
    """Columns per backward chunk of the Triton backend at ``b`` rows (compiled, not under the
    interpreter): the kernel's own :func:`gist_function.chunk_width`."""
    from gist_ray.kernels.gist_function import chunk_width

    return chunk_width(b)


def cases(device: torch.device, settings: Settings) -> list[Case]:
    """The small case and the seam-crossing case of the backend ``settings`` checks on
    ``device``. GPU sizes cross the Triton backward's chunk (about 2^27 elements of P) and many
    forward splits; CPU sizes cross the chunked backend's chunk (at most 8,192 columns)."""
    width = settings.matryoshka_dims[0] if settings.matryoshka_dims else None
    chunk = triton_chunk if settings.backend_on(device) == "triton" else chunked.chunk_width
    if device.type == "cuda":
        d, d_g, b_small, b_seam = width or 256, 128, 100, 4000
    else:
        d, d_g, b_small, b_seam = width or 64, 32, 24, 48
    return [Case("small", b_small, 3, 1, d, d_g, chunk(b_small)),
            _seam_case(b_seam, chunk(b_seam), d, d_g)]  # fmt: skip


@dataclass
class Pool:
    """The raw student rows (leaves, float32, requiring grad) and guide rows of every column
    (``anchor``, ``positive``, ``negative_k``), ``[pool, width]`` each, on the device."""

    student: dict[str, torch.Tensor]
    guide: dict[str, torch.Tensor]


def dyadic(y: torch.Tensor) -> torch.Tensor:
    """Unit rows of 16 entries ±1/4 at the largest ``|y|``, following the signs of ``y``."""
    idx = y.abs().topk(16, dim=1).indices
    vals = torch.where(y.gather(1, idx) >= 0, 0.25, -0.25)
    return torch.zeros_like(y).scatter_(1, idx, vals)


def make_pool(case: Case, negatives: int, seed: int, device: torch.device) -> Pool:
    """Topic-clustered student rows (in-topic negatives compete) and guide rows that follow them
    through a random projection plus noise, so a realistic share of candidates is masked."""
    gen = torch.Generator().manual_seed(seed)
    n, d = case.pool, case.d
    topics = torch.randn(max(2, n // 6), d, generator=gen)

    def sample() -> torch.Tensor:
        return topics[torch.randint(topics.shape[0], (n,), generator=gen)] + 0.6 * torch.randn(
            n, d, generator=gen
        )

    anchor = sample()
    rows = [anchor, anchor + torch.randn(n, d, generator=gen)]
    rows += [sample() for _ in range(negatives)]
    proj = torch.randn(d, case.d_g, generator=gen)
    noise = 0.8 * d**0.5
    names = ["anchor", "positive"] + [f"negative_{k + 1}" for k in range(negatives)]
    student, guide = {}, {}
    for name, x in zip(names, rows):
        student[name] = x.to(device).requires_grad_()
        guide[name] = dyadic(x @ proj + noise * torch.randn(n, case.d_g, generator=gen)).to(device)
    return Pool(student, guide)


def problems(pool: Pool, case: Case, s: Settings, dtype: torch.dtype) -> list[Problem]:
    """One Problem per Matryoshka width (one without), as the loss front end builds them
    (gist_ray.loss.functional.compute): each width's student rows truncated, L2-normalised in
    float32 and rounded once to ``dtype``; the local rows are the pool's rows at the offset.
    Every call builds a fresh autograd graph from the pool's leaves."""
    segments, sources = build_segments(
        s.negatives, s.contrast_anchors, s.contrast_positives, s.hardness_mode
    )
    local = slice(case.offset, case.offset + case.b)
    guide = {k: v.to(dtype) for k, v in pool.guide.items()}

    def unit(x: torch.Tensor, width: int) -> torch.Tensor:
        return F.normalize(x[:, :width].float(), dim=-1).to(dtype)

    out = []
    for w in s.matryoshka_dims or (case.d,):
        units = {k: unit(v, w) for k, v in pool.student.items()}
        out.append(
            Problem(
                (units["anchor"][local], units["positive"][local]),
                tuple(units[c] for c in sources),
                (guide["anchor"][local], guide["positive"][local]),
                tuple(guide[c] for c in sources),
                segments,
                case.offset,
                s.temperature,
                s.margin,
                s.margin_strategy,
                s.hardness_alpha,
            )  # fmt: skip
        )
    return out
