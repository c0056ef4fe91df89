"""Eval during training: when it runs, what it logs, and the best model it keeps (the local
reporter's validator and Ray Train's validation function, one path)."""

import json
from pathlib import Path

import pytest

import gist_ray.train.evaluation as ev
from gist_ray.config import load_config
from gist_ray.models.best import read_best
from gist_ray.models.encoder import load_encoder
from gist_ray.models.spec import ModelSpec


@pytest.fixture
def setup(tmp_path, tiny_models, monkeypatch):
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "car insurance"}) + "\n")
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(["a", "b"]))
    )
    (beir / "qrels.tsv").write_text("q1\td0\t1\n")
    cfg = load_config(
        overrides=[f"eval.source={beir}", "eval.every=2", f"output_dir={tmp_path / 'out'}"]
    )
    scripted = iter([0.5, 0.4, 0.7, 0.7])  # the metric at each successive eval
    monkeypatch.setattr(
        ev, "evaluate_model", lambda *a, **k: {"ndcg@10": next(scripted), "recall@10": 1.0}
    )
    student = load_encoder(ModelSpec(str(tiny_models["student"]), max_seq_length=16))
    return cfg, student


def _checkpoint(root: Path, student, step: int) -> Path:
    """A checkpoint folder as the loop writes it: the student's model and the step."""
    from gist_ray.train.checkpoint import CHECKPOINT_MODEL_DIR, META_FILE

    folder = root / f"checkpoint-{step:07d}"
    student.save(folder / CHECKPOINT_MODEL_DIR)
    (folder / META_FILE).write_text(json.dumps({"step": step}))
    return folder


def test_eval_due_on_every_but_not_the_last_step():
    cfg = load_config(overrides=["eval.every=2"])
    assert [s for s in range(1, 8) if ev.eval_due(cfg, s, 6)] == [2, 4]
    assert not any(ev.eval_due(load_config(), s, 6) for s in range(1, 7))  # every = 0
    no_source = load_config(overrides=["eval.every=2", "eval.source="])
    assert not any(ev.eval_due(no_source, s, 6) for s in range(1, 7))


def test_best_model_saved_only_on_improvement_and_kept_across_resume(setup, tmp_path):
    cfg, student = setup
    ckpts = tmp_path / "checkpoints"
    evaluator = ev.TrainingEval(cfg, run_id="run-a")
    out = Path(cfg.output_dir)
    assert evaluator(_checkpoint(ckpts, student, 2)) == {"ndcg@10": 0.5, "recall@10": 1.0}
    assert read_best(out, "run-a")["step"] == 2
    assert (out / "best-model" / "modules.json").is_file()
    assert (
        evaluator(_checkpoint(ckpts, student, 4))["ndcg@10"] == 0.4
    )  # worse: best stays at step 2
    assert read_best(out, "run-a") == {
        "step": 2,
        "metric": "ndcg@10",
        "value": 0.5,
        "run_id": "run-a",
    }
    # A restarted worker of the same run keeps the best so far; another run starts afresh.
    assert ev.TrainingEval(cfg, run_id="run-a").best["value"] == 0.5
    assert ev.TrainingEval(cfg, run_id="run-b").best is None
    resumed = ev.TrainingEval(cfg, run_id="run-a")
    resumed(_checkpoint(ckpts, student, 6))  # 0.7 > 0.5
    assert read_best(out, "run-a")["step"] == 6
    resumed(_checkpoint(ckpts, student, 8))  # 0.7 again: ties keep the earlier step
    assert read_best(out, "run-a")["step"] == 6
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_validation_of_a_checkpoint_logs_its_step_once(setup, tmp_path):
    """Ray Train's validation function on a real checkpoint folder: it evaluates the
    checkpoint's model, logs eval/* on the checkpoint's step, and a second validation of the
    same step (after a restart) adds nothing to MLflow."""
    import contextlib

    import mlflow

    from gist_ray.train.checkpoint import CHECKPOINT_MODEL_DIR, META_FILE

    cfg, student = setup
    folder = tmp_path / "checkpoint-0000004"
    student.save(folder / CHECKPOINT_MODEL_DIR)
    (folder / META_FILE).write_text(json.dumps({"step": 4}))

    class Checkpoint:  # what Ray hands the function: a folder behind as_directory()
        def as_directory(self):
            return contextlib.nullcontext(str(folder))

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("v")).info.run_id
    first = ev.validate_checkpoint(Checkpoint(), cfg.to_dict(), run_id, uri)
    assert {"eval/ndcg@10", "eval/recall@10"} <= set(first) and 0 < first["eval/ndcg@10"] <= 1
    client.log_metric(run_id, "eval/ndcg_at_10", 0.123, step=4)  # as if logged by a first try
    ev.validate_checkpoint(Checkpoint(), cfg.to_dict(), run_id, uri)
    history = client.get_metric_history(run_id, "eval/ndcg_at_10")
    assert sorted((m.step, m.value) for m in history) == sorted(
        [(4, first["eval/ndcg@10"]), (4, 0.123)]
    ), "the second validation logged nothing"
    assert len(client.get_metric_history(run_id, "eval/recall_at_10")) == 1


def test_matryoshka_widths_are_evaluated(tmp_path, tiny_models):
    """With loss.matryoshka_dims the periodic eval also reports retrieval at each width (real
    metrics on the real encoder; the tiny student is 32 wide)."""
    beir = tmp_path / "beir"
    beir.mkdir()
    texts = ["car insurance cover", "cancel a policy", "home flood damage", "life insurance"]
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "car cover"}) + "\n")
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    (beir / "qrels.tsv").write_text("q1\td0\t1\n")
    cfg = load_config(overrides=[f"eval.source={beir}", "eval.every=1",
                                 f"output_dir={tmp_path / 'out'}",
                                 "loss.matryoshka_dims=[32, 8]"])  # fmt: skip
    student = load_encoder(ModelSpec(str(tiny_models["student"]), max_seq_length=16))
    metrics = ev.TrainingEval(cfg, run_id="r")(_checkpoint(tmp_path / "checkpoints", student, 1))
    assert {"ndcg@10", "dim_32/ndcg@10", "dim_8/ndcg@10", "dim_8/recall@10"} <= set(metrics)
    assert metrics["dim_32/ndcg@10"] == pytest.approx(metrics["ndcg@10"])


def test_a_run_without_ray_validates_through_its_reporter(setup, tiny_models, tiny_pairs_file):
    """The training loop never evaluates itself: every eval.every steps it writes a checkpoint
    marked for validation, and the local reporter's validator evaluates that checkpoint (not
    the last step: the driver evaluates the exported model)."""
    from gist_ray.train.checkpoint import LocalReporter
    from tests.conftest import run_worker

    base, _ = setup
    cfg = load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            f"model.guide={tiny_models['guide']}",
            "model.max_seq_length=16",
            f"data.train={tiny_pairs_file}",
            "data.max_examples=0",
            "data.guide_cache=false",
            f"eval.source={base.eval.source}",
            "eval.every=2",
            "train.batch_size=8",
            "train.max_steps=5",
            "train.checkpoint_every=100",
            f"output_dir={base.output_dir}",
        ]
    )
    seen = []
    validator = ev.TrainingEval(cfg, run_id="local")

    def validate(folder):
        seen.append(Path(folder).name)
        return validator(folder)

    run_worker(cfg, LocalReporter(cfg.output_dir, validator=validate))
    assert seen == ["checkpoint-0000002", "checkpoint-0000004"]
    assert read_best(cfg.output_dir, "local")["step"] == 2  # scripted: 0.5 then 0.4
    assert (Path(cfg.output_dir) / "best-model" / "modules.json").is_file()
    # Each checkpoint once, under checkpoints/; the staging folder is gone once empty.
    out = Path(cfg.output_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-0000002",
        "checkpoint-0000004",
        "checkpoint-0000005",
    ]
    assert not (out / "checkpoints-staging").exists()
