"""Rank 0's periodic eval (no Ray): when it runs, what it logs, and the best model it keeps."""

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


def test_eval_due_on_every_but_not_the_last_step():
    cfg = load_config(overrides=["eval.every=2"])
    assert [s for s in range(1, 8) if ev.eval_due(cfg, s, 6)] == [2, 4]
    assert not any(ev.eval_due(load_config(), s, 6) for s in range(1, 7))  # every = 0
    no_source = load_config(overrides=["eval.every=2", "eval.source="])
    assert not any(ev.eval_due(no_source, s, 6) for s in range(1, 7))


def test_best_model_saved_only_on_improvement_and_kept_across_resume(setup):
    cfg, student = setup
    evaluator = ev.TrainingEval(cfg, run_id="run-a")
    out = Path(cfg.output_dir)
    assert evaluator(student, 2) == {"ndcg@10": 0.5, "recall@10": 1.0}
    assert read_best(out, "run-a")["step"] == 2
    assert (out / "best-model" / "modules.json").is_file()
    assert evaluator(student, 4)["ndcg@10"] == 0.4  # worse: best stays at step 2
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
    resumed(student, 6)  # 0.7 > 0.5
    assert read_best(out, "run-a")["step"] == 6
    resumed(student, 8)  # 0.7 again: ties keep the earlier step
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
    metrics = ev.TrainingEval(cfg, run_id="r")(student, 1)
    assert {"ndcg@10", "dim_32/ndcg@10", "dim_8/ndcg@10", "dim_8/recall@10"} <= set(metrics)
    assert metrics["dim_32/ndcg@10"] == pytest.approx(metrics["ndcg@10"])
