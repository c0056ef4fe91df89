"""The doctor's checks as a library (gist_ray.doctor): the seam-crossing sizes really cross the
seams, the comparison catches a wrong backend (loss, masks, gradients, an exception), and the
report says so. Real backends through the custom op; the wrong ones are real functions of the
same signature, passed through check_device's ``backend`` parameter."""

from __future__ import annotations

import pytest
import torch

from gist_ray.doctor import Settings
from gist_ray.doctor.cases import cases, make_pool
from gist_ray.doctor.compare import check_case
from gist_ray.doctor.machine import check_machine
from gist_ray.doctor.report import machine_lines, verdict
from gist_ray.loss import chunked
from gist_ray.loss.op import tiled
from gist_ray.loss.plan import BackendOutput

CPU = torch.device("cpu")


def _small_only(settings: Settings):
    return [c for c in cases(CPU, settings) if c.name == "small"]


def test_the_seam_cases_cross_a_chunk_with_the_diagonal_on_the_boundary():
    for device, backend in ((CPU, "auto"), (torch.device("cuda"), "auto"),
                            (torch.device("cuda"), "chunked")):  # fmt: skip
        small, seams = cases(device, Settings(backend=backend))
        assert small.pool <= small.chunk, (device, backend)  # one chunk
        assert seams.chunks >= 2, (device, backend)
        if seams.b < seams.chunk:  # the local rows' positives straddle the first boundary
            assert seams.offset < seams.chunk < seams.offset + seams.b, (device, backend)
    seams = cases(CPU, Settings())[1]
    assert seams.chunk == chunked.chunk_width(seams.b)  # the backend's own chunk at this b


def test_cuda_seam_case_crosses_the_kernels_backward_chunk_and_forward_splits():
    """The Triton sizes come from the launchers' own constants (no GPU needed to compute them)."""
    from gist_ray.kernels.gist_function import PLANS, column_splits

    seams = cases(torch.device("cuda"), Settings())[1]
    for plan in PLANS.values():
        splits, per = column_splits(seams.b, seams.pool, plan.fwd, torch.device("cpu"))
        assert splits >= 2 and per < seams.pool


def test_the_pool_masks_a_realistic_share_with_exact_guide_products():
    settings = Settings()
    case = _small_only(settings)[0]
    pool = make_pool(case, 1, seed=3, device=CPU)
    g = pool.guide["anchor"] @ pool.guide["positive"].T
    assert torch.equal(g * 16, (g * 16).round())  # multiples of 1/16: exact in any order
    assert torch.allclose(pool.guide["anchor"].norm(dim=1), torch.ones(case.pool))
    masked = (g > g.diagonal()[:, None]).float().mean().item()
    assert 0.01 < masked < 0.5


def _wrong(kind: str):
    def run(problems):
        outs = tiled(list(problems), "chunked")
        if kind == "raise":
            raise RuntimeError("an illegal memory access was encountered")
        if kind == "loss":
            return [BackendOutput(o.loss * 1.01, o.masked, o.above, o.threshold) for o in outs]
        if kind == "masked":
            masked = outs[0].masked.clone()
            masked[0, 0] += 1
            return [BackendOutput(o.loss, masked, o.above, o.threshold) for o in outs]
        # gradients: row 0's doubled (loss values unchanged)
        row0 = torch.arange(len(outs[0].loss)) == 0
        return [BackendOutput(o.loss + (o.loss - o.loss.detach()) * row0, o.masked, o.above,
                              o.threshold) for o in outs]  # fmt: skip

    return run


def test_a_wrong_backend_fails_and_says_why():
    settings = Settings(matryoshka_dims=(64, 16), hardness_alpha=1.5)
    for kind, expect in (("loss", "loss error"), ("masked", "masked counts differ"),
                         ("grad", "gradient error"),
                         ("raise", "RuntimeError: an illegal memory access")):  # fmt: skip
        (case,) = _small_only(settings)
        record = check_case(case, torch.float32, CPU, settings, _wrong(kind), seed=0)
        assert not record["ok"], kind
        lines = verdict([{"checks": [{"device": "cpu", "backend": "chunked", **record}]}])
        assert lines[0].startswith("verdict: FAILED (1 of 1"), lines
        assert lines[1].startswith("FAILED cpu chunked float32 small: ") and expect in lines[1], (
            kind, lines)  # fmt: skip


def test_the_real_backend_passes_with_matryoshka_and_hardness():
    settings = Settings(matryoshka_dims=(48, 24, 8), matryoshka_weights=(1.0, 0.5, 2.0),
                        hardness_alpha=3.0, hardness_mode="all_negatives",
                        margin=0.05, margin_strategy="relative", negatives=2)  # fmt: skip
    report = check_machine(settings, progress=lambda _: None)
    assert report["ok"], report["checks"]
    (small, seams) = report["checks"]
    assert small["loss"] == seams["loss"] == "widths 48/24/8, hardness 3 all_negatives"
    assert seams["chunks"] == 2 and small["mask_mismatch_rows"] == 0
    assert 0 < small["masked_fraction"] < 0.5
    text = "\n".join(machine_lines(report))
    assert "Triton kernel was NOT checked" in text and "GPUs: none" in text


def test_the_speed_figures_reference_is_the_loss_and_the_figure_runs():
    """The GPU's speed figure, dry-run on the CPU at toy sizes: its materialised reference is
    the loss (equal to the reference backend on float32 inputs), and every number is there."""
    from dataclasses import replace

    from gist_ray.doctor.speed import _problem, materialised, speed
    from gist_ray.loss.reference import reference_backend

    p = _problem(24, 96, 32, 40, CPU)
    p32 = replace(p, left=tuple(x.float() for x in p.left), cands=tuple(x.float() for x in p.cands),
                  guide_left=tuple(x.float() for x in p.guide_left),
                  guide_cands=tuple(x.float() for x in p.guide_cands))  # fmt: skip
    expected = reference_backend(p32).loss
    assert torch.allclose(materialised(p32), expected, rtol=1e-5, atol=1e-4)
    figure = speed(CPU, "chunked", sizes=(24, 96, 32, 40), square=64)
    assert figure["b"] == 24 and figure["pool"] == 96
    for key in ("kernel_ms", "reference_bf16_ms", "kernel_tflops", "matmul_bf16_tflops"):
        assert figure[key] > 0, key
    assert figure["speedup_vs_reference"] > 0 and figure["fraction_of_matmul"] > 0


def test_the_triton_kernels_outputs_pass_the_same_comparison():
    """The GPU path's backend, run by Triton's interpreter on CPU tensors (tests/conftest.py sets
    TRITON_INTERPRET=1 without a GPU): the comparison takes the kernel's outputs as they are."""
    settings = Settings(matryoshka_dims=(32, 16), hardness_alpha=1.0)
    (case,) = _small_only(settings)

    def kernel(problems):
        return tiled(list(problems), "triton")

    record = check_case(case, torch.float32, CPU, settings, kernel, seed=5)
    assert record["ok"], record
    assert record["mask_mismatch_rows"] == 0 and record["loss_err"] < 1e-4


@pytest.mark.slow  # several processes
def test_a_failing_process_of_the_gather_check_is_reported_not_waited_for():
    """NCCL processes on a machine without CUDA: every rank fails at once, and the check says
    which and why instead of waiting for the process group's timeout."""
    import time

    from gist_ray.doctor.gather import check_gather

    t0 = time.monotonic()
    record = check_gather(Settings(), 2, "cuda", torch.bfloat16, timeout=120)
    assert time.monotonic() - t0 < 100
    assert not record["ok"] and record["error"].startswith("rank "), record
    assert "CUDA" in record["error"] or "cuda" in record["error"], record["error"]
    assert "Traceback" in record["traceback"]
