"""The training step line: the step's loss and a smoothed loss, the masked share as a labelled
percentage, no ``-0.0000``; the step's own loss (not the smoothed one) in MLflow."""

from __future__ import annotations

import logging

import mlflow
import pytest

from gist_ray.config import Config
from gist_ray.train.checkpoint import TrainState
from gist_ray.train.progress import EMA_BETA, LossEMA, StepLog, fmt_loss, fmt_masked, step_line


def test_loss_is_never_shown_as_negative_zero():
    assert fmt_loss(-1e-7) == "0.0000"
    assert fmt_loss(-0.0) == "0.0000"
    assert fmt_loss(0.0) == "0.0000"
    assert fmt_loss(0.54321) == "0.5432"
    assert fmt_loss(2.86) == "2.8600"
    assert fmt_loss(3.2e-5) == "3.20e-05"  # a loss that small still shows its digits


def test_masked_share_is_a_labelled_percentage():
    assert fmt_masked(0.031) == "3.1 %"
    assert fmt_masked(0.0) == "0.0 %"
    assert fmt_masked(0.0002) == "<0.1 %"
    assert fmt_masked(1.0) == "100.0 %"
    line = step_line(3, 10, -2e-8, 0.25, 3e-5, 12.34, 0.031, "0m05s")
    assert line == (
        "step 3/10 loss 0.0000 smoothed 0.2500 lr 3.00e-05 12.3 samples/s masked 3.1 % ETA 0m05s"
    )
    assert "-0.0000" not in line and "mask 0." not in line


def _ema(losses: list[float]) -> float:
    """The bias-corrected EMA written out: weights beta^(n-k), normalised."""
    weights = [EMA_BETA ** (len(losses) - 1 - k) for k in range(len(losses))]
    return sum(w * x for w, x in zip(weights, losses)) / sum(weights)


def test_the_smoothed_loss_is_a_bias_corrected_ema():
    losses = [0.54, 0.83, 0.48, 1.40, 1.28, 2.86]  # the jumpy steps
    ema = LossEMA()
    for n in range(1, len(losses) + 1):
        assert ema.update(losses[n - 1]) == pytest.approx(_ema(losses[:n]))
    assert LossEMA().update(0.54) == pytest.approx(0.54)  # not pulled toward 0 at step 1
    # it moves less than the steps do
    smoothed = [_ema(losses[:n]) for n in range(1, len(losses) + 1)]
    jumps = lambda xs: max(abs(b - a) for a, b in zip(xs, xs[1:]))  # noqa: E731
    assert jumps(smoothed) < jumps(losses) / 2


def test_step_log_shows_both_losses_and_mlflow_gets_the_steps_own(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("progress")).info.run_id
    cfg = Config()
    cfg.train.log_every = 2
    state = TrainState(optimizer=None, scheduler=None, run_id=run_id)
    step_log = StepLog(cfg, state, total=5, tracking_uri=uri)
    losses = [1.0, 3.0, 2.0, -1e-9, 0.5]
    with caplog.at_level(logging.INFO, logger="gist_ray.train.progress"):
        for step, loss in enumerate(losses, 1):
            state.step = step
            metrics = {"loss": loss, "lr": 1e-5, "samples_per_s": 8.0, "mask_frac/all": 0.031}
            step_log.step(state, metrics)
    step_log.committed(state)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    # every log_every steps and the last; the smoothed loss counts the steps in between too
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]
    assert lines[0].startswith(f"step 2/5 loss 3.0000 smoothed {_ema(losses[:2]):.4f} ")
    assert lines[1].startswith(f"step 4/5 loss 0.0000 smoothed {_ema(losses[:4]):.4f} ")
    assert all("masked 3.1 % ETA" in line for line in lines)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 3.0), (4, -1e-9), (5, 0.5)]
