"""Training never dies of the kernel (gist_ray.train.loss_choice): the real per-worker train
function, on the CPU, decides its loss as a CUDA worker would (``LossTarget(device="cuda")``)
through a kernel registered for the test (tests/loss/faulty.py). A kernel that fails its check
leaves ``loss.backend: auto`` training on ``chunked`` with a console line and an MLflow tag, and
stops ``loss.backend: triton`` with one line; the rows of a float32 model reach the loss in
bfloat16, which the run records."""

from __future__ import annotations

import logging
import math
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tests.loss.faulty as faulty
from gist_ray.config import Config, load_config
from gist_ray.core.errors import GistRayError
from gist_ray.loss.op import register_kernel
from gist_ray.tracking.runs import start_run
from gist_ray.train.checkpoint import LocalReporter, TrainState
from gist_ray.train.loss_choice import (
    TAG_BACKEND,
    TAG_DTYPE,
    TAG_FALLBACK,
    LossTarget,
    worker_loss,
)
from gist_ray.train.progress import StepLog
from tests.conftest import run_worker

BATCH, STEPS = 8, 2


def _cfg(tiny_models, data, out, *extra):
    return load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            f"model.guide={tiny_models['guide']}",
            "model.max_seq_length=16",
            f"data.train={data}",
            "data.guide_cache=false",
            "eval.source=",
            f"train.batch_size={BATCH}",
            f"train.max_steps={STEPS}",
            "ray.num_workers=1",
            f"output_dir={out}",
            *extra,
        ]
    )


def _run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, start_run(uri, "loss-choice", None, {}, {})


def _tags(uri: str, run_id: str) -> dict[str, str]:
    import mlflow

    return mlflow.MlflowClient(uri).get_run(run_id).data.tags


def test_a_failing_kernel_leaves_auto_training_on_chunked(
    tiny_models, tiny_pairs_file, tmp_path, caplog
):
    kernel = faulty.Raising()
    name = faulty.register(kernel)
    uri, run_id = _run(tmp_path)
    cfg = _cfg(tiny_models, tiny_pairs_file, tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        result = run_worker(
            cfg, LocalReporter(cfg.output_dir), run_id=run_id, tracking_uri=uri,
            loss_target=LossTarget(device="cuda", kernel=name),
        )  # fmt: skip
    assert result["steps"] == STEPS and len(result["losses"]) == STEPS
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert kernel.calls == 1  # the check; every step then ran chunked
    reason = "RuntimeError: CUDA error: an illegal memory access was encountered"
    lines = [r.getMessage() for r in caplog.records if "failed its check" in r.getMessage()]
    assert lines == [
        f"rank 0: the {name} kernel failed its check against the reference loss ({reason}); "
        "training continues on the chunked backend"
    ]
    tags = _tags(uri, run_id)
    assert tags[TAG_FALLBACK] == f"chunked on rank 0: {reason}"
    assert tags[TAG_BACKEND] == "chunked"
    assert tags[TAG_DTYPE] == "bfloat16"  # auto on CUDA, whatever the model returns


def test_triton_with_a_failing_kernel_stops_in_one_line(tiny_models, tiny_pairs_file, tmp_path):
    name = faulty.register(faulty.WrongGradient())
    cfg = _cfg(tiny_models, tiny_pairs_file, tmp_path / "out", "loss.backend=triton")
    with pytest.raises(GistRayError) as e:
        run_worker(cfg, LocalReporter(cfg.output_dir), loss_target=LossTarget("cuda", name))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        f"loss.backend = triton: the {name} kernel failed its check against the reference on "
        "cpu (bfloat16): gradient of the anchor rows differs from the reference by"
    )
    assert not (tmp_path / "out" / "checkpoints").exists()  # stopped before any step


def test_float32_rows_reach_the_loss_in_bfloat16_on_cuda(
    tiny_models, tiny_pairs_file, tmp_path, caplog
):
    """The tiny BERT returns float32 rows (no autocast on the CPU); decided for CUDA, every
    training step's loss gets bfloat16 rows, through the kernel that passed its check."""
    kernel = faulty.Recording()
    name = faulty.register(kernel)
    uri, run_id = _run(tmp_path)
    cfg = _cfg(tiny_models, tiny_pairs_file, tmp_path / "out", "train.guide_warmup_steps=1")
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        run_worker(
            cfg, LocalReporter(cfg.output_dir), run_id=run_id, tracking_uri=uri,
            loss_target=LossTarget(device="cuda", kernel=name),
        )  # fmt: skip
    steps = [dt for dt, rows in kernel.seen if rows == BATCH]  # the check's problem has 37 rows
    assert len(steps) == STEPS * 5  # anchors, positives, 3 candidate tensors; warm-up included
    assert set(steps) == {torch.bfloat16}
    assert kernel.calls == 1 + STEPS
    tags = _tags(uri, run_id)
    assert (tags[TAG_DTYPE], tags[TAG_BACKEND]) == ("bfloat16", name)
    assert TAG_FALLBACK not in tags
    assert (
        f"loss: compute dtype bfloat16 (loss.compute_dtype: auto on cuda), backend {name} "
        "(its kernel agrees with the reference)"
    ) in [r.getMessage() for r in caplog.records]


def test_auto_on_the_cpu_is_float32_and_chunked(tiny_models, tiny_pairs_file, tmp_path):
    uri, run_id = _run(tmp_path)
    cfg = _cfg(tiny_models, tiny_pairs_file, tmp_path / "out")
    run_worker(cfg, LocalReporter(cfg.output_dir), run_id=run_id, tracking_uri=uri)
    tags = _tags(uri, run_id)
    assert (tags[TAG_DTYPE], tags[TAG_BACKEND]) == ("float32", "chunked")


class _FailsOnRankOne(faulty.Recording):
    def forward(self, problems):
        if dist.get_rank() == 1:
            raise RuntimeError("no kernel image is available for execution on the device")
        return super().forward(problems)


def _two_ranks(rank: int, init_file: str, uri: str, run_id: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        register_kernel("test-fails-on-rank-1", _FailsOnRankOne)
        cfg = Config()
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=1.0)
        state = TrainState(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), run_id)
        step_log = StepLog(cfg, state, 1, uri)
        target = LossTarget(device="cuda", kernel="test-fails-on-rank-1")
        loss_fn = worker_loss(cfg, torch.device("cpu"), 32, step_log, gather=True, target=target)
        # both ranks train on, each on its own backend, through the same gathered pool
        g = torch.Generator().manual_seed(rank)
        emb = [torch.randn(4, 32, generator=g, requires_grad=True) for _ in range(2)]
        loss, _ = loss_fn(emb, [torch.randn(4, 16, generator=g) for _ in range(2)])
        loss.backward()
        torch.save({"backend": loss_fn.backend, "loss": loss.item()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_the_tag_names_every_rank_that_fell_back(tmp_path):
    """Two gloo ranks, the kernel failing on rank 1 only: rank 1 trains on chunked, rank 0 on
    the kernel, and rank 0's tag says which rank fell back."""
    uri, run_id = _run(tmp_path)
    out = str(tmp_path / "result")
    mp.start_processes(
        _two_ranks, args=(tempfile.mktemp(dir=tmp_path), uri, run_id, out), nprocs=2,
        join=True, start_method="spawn",
    )  # fmt: skip
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert [r["backend"] for r in ranks] == ["test-fails-on-rank-1", "chunked"]
    assert all(math.isfinite(r["loss"]) for r in ranks)
    tags = _tags(uri, run_id)
    assert tags[TAG_FALLBACK] == "chunked on rank 1: see their console lines"
    assert tags[TAG_BACKEND] == "test-fails-on-rank-1"  # rank 0's
