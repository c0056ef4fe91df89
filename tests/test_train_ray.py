"""A real 2-worker Ray Train run on tiny random BERTs, through the `train` command's driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gist_ray.config import load_config
from gist_ray.core.errors import ConfigError


@pytest.fixture(scope="module")
def beir_eval(tmp_path_factory, tiny_pairs_file):
    """A tiny BEIR-style eval folder built from the training sentences."""
    rows = [json.loads(line) for line in tiny_pairs_file.read_text().splitlines()]
    root = tmp_path_factory.mktemp("beir")
    (root / "queries.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"q{i}", "text": r["anchor"]}) + "\n" for i, r in enumerate(rows[:8])
        )
    )
    (root / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"d{i}", "text": r["positive"]}) + "\n" for i, r in enumerate(rows)
        )
    )
    (root / "qrels.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(8))
    )
    return root


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_models, tiny_pairs_file, beir_eval, tmp_path_factory):
    from gist_ray.commands.train import train

    out = tmp_path_factory.mktemp("run")
    # System metrics every second (default 10 s), so this short run gets some samples.
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            f"model.guide={tiny_models['guide']}",
            "model.max_seq_length=32",
            f"data.train={tiny_pairs_file}",
            f"eval.source={beir_eval}",
            "data.max_examples=0",
            "train.batch_size=8",
            "train.max_steps=5",
            "train.checkpoint_every=2",
            "train.lr=1e-3",
            "eval.every=2",
            "ray.num_workers=2",
            f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
            "mlflow.experiment=test-train",
            "mlflow.register_as=tiny-gist",
            f"output_dir={out / 'output'}",
        ]
    )
    try:
        yield cfg, train(cfg)
    finally:
        mp.undo()


def test_run_ends_with_checkpoint_and_model(trained):
    cfg, result = trained
    from pathlib import Path

    ckpt = Path(result["checkpoint"])  # the last checkpoint, where Ray keeps it (no copy)
    assert ckpt.parent.parent == Path(cfg.output_dir) / "ray" and ckpt.name == "checkpoint-0000005"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["step"] == 5
    assert state["mlflow_run_id"] == result["run_id"]
    assert len(state["rng"]) == 2  # one RNG state per worker
    assert (Path(result["model_dir"]) / "modules.json").is_file()
    assert not list(Path(cfg.output_dir).glob(".*tmp*")), "temporary folders left behind"


def test_mlflow_run_holds_params_and_metrics(trained):
    import mlflow

    cfg, result = trained
    client = mlflow.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.params["loss.temperature"] == "0.01"
    assert run.data.tags["world_size"] == "2"
    # the loss as it ran on the CPU workers: float32 rows, chunked, no kernel to check
    assert run.data.params["loss.compute_dtype"] == "auto"
    assert run.data.tags["gist_ray.loss_compute_dtype"] == "float32"
    assert run.data.tags["gist_ray.loss_backend"] == "chunked"
    assert "gist_ray.loss_backend_fallback" not in run.data.tags
    history = client.get_metric_history(result["run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(m.value)) for m in history)
    for key in (
        "lr",
        "samples_per_s",
        "mask_frac/ap",
        "mask_frac/aa",
        "mask_frac/pp",
        "mask_frac/an1",
        "eval/before/ndcg_at_10",
        "eval/after/ndcg_at_10",
    ):
        assert client.get_metric_history(result["run_id"], key), key
    artifacts = [a.path for a in client.list_artifacts(result["run_id"])]
    assert "config.yaml" in artifacts and "plots" in artifacts


def test_saved_model_loads_in_sentence_transformers(trained, tiny_models):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    cfg, result = trained
    st = SentenceTransformer(result["model_dir"], device="cpu")
    base = SentenceTransformer(str(tiny_models["student"]), device="cpu")
    # The same kind of model: sentence-transformers' defaults for a plain checkpoint (no
    # Normalize added), and its own max length (64), not the training truncation (32).
    assert [type(m).__name__ for m in st] == [type(m).__name__ for m in base]
    assert st.max_seq_length == base.max_seq_length == 64
    texts = ["what does my car insurance cover", "cancel a life policy"]
    emb = st.encode(texts, convert_to_tensor=True)
    assert emb.shape == (2, 32)
    # Training changed the weights.
    assert not torch.allclose(base.encode(texts, convert_to_tensor=True), emb, atol=1e-4)
    AutoModel.from_pretrained(result["model_dir"])
    card = (Path(result["model_dir"]) / "README.md").read_text()
    for needle in (
        "library_name: sentence-transformers",
        f"`{tiny_models['guide']}`",
        "| pairs |",
        "temperature 0.01",
        "global batch 8 (2 worker(s) × 4)",
        "5 steps",
        "| ndcg@10 |",
    ):
        assert needle in card, needle


def test_two_ray_workers_train_like_one_process(ray_cluster, tiny_pairs_file, tmp_path):
    """Global pool + gradient averaging: a 2-worker Ray run and a single process on the same
    global batches take the same steps (dropout off so both draw no random masks)."""
    import mlflow
    from safetensors.torch import load_file

    from gist_ray.commands.train import train
    from gist_ray.train.checkpoint import LocalReporter
    from tests.conftest import build_tiny_bert, run_worker

    student = build_tiny_bert(tmp_path / "student", hidden=32, seed=3, dropout=0.0)
    guide = build_tiny_bert(tmp_path / "guide", hidden=48, seed=4, dropout=0.0)
    common = [
        f"model.student={student}",
        f"model.guide={guide}",
        "model.max_seq_length=32",
        f"data.train={tiny_pairs_file}",
        "data.max_examples=0",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.lr=1e-3",
        "eval.source=",
        "train.checkpoint_every=100",
    ]
    ray_cfg = load_config(
        overrides=[
            *common,
            "ray.num_workers=2",
            f"output_dir={tmp_path / 'ray'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    result = train(ray_cfg)
    history = mlflow.MlflowClient(result["tracking_uri"]).get_metric_history(
        result["run_id"], "loss"
    )
    ray_losses = [m.value for m in sorted(history, key=lambda m: m.step)]

    local_cfg = load_config(
        overrides=[*common, "ray.num_workers=1", f"output_dir={tmp_path / 'local'}"]
    )
    local = run_worker(local_cfg, LocalReporter(tmp_path / "local"))
    torch.testing.assert_close(
        torch.tensor(ray_losses), torch.tensor(local["losses"]), rtol=1e-5, atol=1e-6
    )
    ray_w = load_file(f"{result['model_dir']}/model.safetensors")
    local_ckpt = tmp_path / "local" / "checkpoints" / "checkpoint-0000003"
    local_w = load_file(str(local_ckpt / "model" / "model.safetensors"))
    init_w = load_file(str(student / "model.safetensors"))
    names = sorted(ray_w)
    flat = {
        k: torch.cat([d[n].reshape(-1).float() for n in names])
        for k, d in (("ray", ray_w), ("local", local_w), ("init", init_w))
    }
    # Adam divides each gradient entry by its own magnitude, so entries whose gradient is at
    # float-noise level may step ±lr either way; judge the runs by how far apart they ended
    # relative to how far training moved the weights (the per-step losses match to 1e-5).
    gap = (flat["ray"] - flat["local"]).norm() / (flat["local"] - flat["init"]).norm()
    assert gap < 2e-2, f"runs diverged: weight gap {gap:.2e} of the training update"


def test_matryoshka_and_hardness_run(
    ray_cluster, tiny_models, tiny_pairs_file, beir_eval, tmp_path
):
    """A 2-worker run with Matryoshka widths and hardness weighting: MLflow gets every width's
    loss each step (averaged over the workers, so the logged loss is their weighted sum) and
    retrieval at every width before, during and after training; a width above the student's
    fails on the driver, before Ray, naming the key."""
    import mlflow

    from gist_ray.commands.train import train

    common = [
        f"model.student={tiny_models['student']}",
        f"model.guide={tiny_models['guide']}",
        "model.max_seq_length=32",
        f"data.train={tiny_pairs_file}",
        "data.max_examples=0",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.checkpoint_every=100",
        "loss.hardness_alpha=4",
        "loss.hardness_mode=in_batch_negatives",
        f"output_dir={tmp_path / 'out'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    with pytest.raises(ConfigError, match=r"loss.matryoshka_dims: 64 is wider than the "
                       r"student's embeddings \(32\)"):  # fmt: skip
        train(load_config(overrides=[*common, "loss.matryoshka_dims=[64, 8]"]))
    cfg = load_config(overrides=[*common, f"eval.source={beir_eval}", "eval.every=2",
                                 "loss.matryoshka_dims=[32, 8]",
                                 "loss.matryoshka_weights=[1, 0.5]"])  # fmt: skip
    result = train(cfg)
    client = mlflow.MlflowClient(result["tracking_uri"])

    def series(key):
        return {m.step: m.value for m in client.get_metric_history(result["run_id"], key)}

    loss, wide, narrow = series("loss"), series("loss/dim_32"), series("loss/dim_8")
    assert sorted(loss) == sorted(wide) == sorted(narrow) == [1, 2, 3]
    for step in loss:
        assert loss[step] == pytest.approx(wide[step] + 0.5 * narrow[step], rel=1e-5)
    assert sorted(series("eval/dim_8/ndcg_at_10")) == [0, 2, 3]  # before, step 2, after
    assert "dim_8/ndcg@10" in result["before"] and "dim_8/ndcg@10" in result["after"]
    assert series("eval/before/dim_32/ndcg_at_10")[0] == pytest.approx(result["before"]["ndcg@10"])


# ----------------------------------------------------------------------------- issue 5: evidence


def test_eval_metrics_on_the_step_axis_and_best_step(trained):
    """eval.every=2 over 5 steps: base model at 0, Ray Train's validation of the checkpoints at 2
    and 4, the exported model at 5."""
    import mlflow

    from gist_ray.models.best import read_best
    from gist_ray.tracking.plots import history

    cfg, result = trained
    client = mlflow.MlflowClient(result["tracking_uri"])
    run_id = result["run_id"]
    for key in ("eval/ndcg_at_10", "eval/recall_at_1", "eval/mrr_at_10", "eval/map_at_100"):
        assert [s for s, _ in history(client, run_id, key)] == [0, 2, 4, 5], key
    points = dict(history(client, run_id, "eval/ndcg_at_10"))
    assert points[0] == pytest.approx(result["before"]["ndcg@10"])
    assert points[5] == pytest.approx(result["after"]["ndcg@10"])
    final = result["final"]
    trained_points = {s: v for s, v in points.items() if s > 0}
    best = max(trained_points.values())
    assert final.best_value == pytest.approx(best)
    assert final.best_step == min(s for s, v in trained_points.items() if v == best)
    run = client.get_run(run_id)
    assert run.data.tags["best_step"] == str(final.best_step)
    assert run.data.metrics["best/ndcg_at_10"] == pytest.approx(best)
    # The best model is kept, as a sentence-transformers folder, with its record.
    from pathlib import Path

    best_dir = Path(cfg.output_dir) / "best-model"
    assert final.best_model_dir == str(best_dir)
    assert (best_dir / "modules.json").is_file()
    assert read_best(cfg.output_dir, run_id)["step"] == final.best_step


def test_checkpoints_validated_beside_training_and_scored_by_ray(trained):
    """The checkpoints of steps 2 and 4 carry their validation metrics in Ray's own record (the
    run's storage), the best one is kept there, and best-model/ is its model."""
    import ray.train
    from sentence_transformers import SentenceTransformer

    from gist_ray.launch.resources import storage_path
    from gist_ray.launch.resume import run_dir_name
    from gist_ray.models.best import read_best

    cfg, result = trained
    run_dir = Path(storage_path(cfg)) / run_dir_name(cfg, result["run_id"])
    ray_result = ray.train.Result.from_path(str(run_dir))
    scored = {m["step"]: m for _, m in ray_result.best_checkpoints}
    assert scored[4]["eval/ndcg@10"] >= 0 and scored[5]["eval/ndcg@10"] == -1.0, scored
    validated = {s: m["eval/ndcg@10"] for s, m in scored.items() if m["eval/ndcg@10"] >= 0}
    info = read_best(cfg.output_dir, result["run_id"])
    if info["step"] in validated:  # else the exported final model was the best
        assert info["value"] == pytest.approx(max(validated.values()))
        kept = run_dir / f"checkpoint-{info['step']:07d}"
        best = SentenceTransformer(str(Path(cfg.output_dir) / "best-model"), device="cpu")
        saved = SentenceTransformer(str(kept / "model"), device="cpu")
        for a, b in zip(best.state_dict().values(), saved.state_dict().values()):
            assert torch.equal(a, b)


def test_gist_diagnostics_logged_every_step(trained):
    import mlflow

    cfg, result = trained
    client = mlflow.MlflowClient(result["tracking_uri"])
    for key in (
        "mask_frac/all",
        "mask_frac/ap",
        "threshold_mean",
        "positive_rank_mean",
        "no_negative_frac",
    ):
        points = client.get_metric_history(result["run_id"], key)
        assert sorted(m.step for m in points) == [1, 2, 3, 4, 5], key
        values = torch.tensor([m.value for m in points])
        assert torch.isfinite(values).all(), key
        if key.startswith(("mask_frac", "no_negative")):
            assert ((values >= 0) & (values <= 1)).all(), key
        if key == "positive_rank_mean":  # rank of the positive among unmasked candidates
            assert (values >= 1).all()
        if key == "threshold_mean":  # mean guide cosine of (anchor, positive)
            assert ((values >= -1) & (values <= 1)).all()


def test_plots_written_and_logged(trained):
    from pathlib import Path

    import mlflow

    cfg, result = trained
    plots = Path(cfg.output_dir) / "plots"
    names = {"loss.png", "lr.png", "mask_frac.png", "gist_diagnostics.png", "eval.png"}
    for name in names:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    client = mlflow.MlflowClient(result["tracking_uri"])
    logged = {Path(a.path).name for a in client.list_artifacts(result["run_id"], "plots")}
    assert names <= logged


def test_config_yaml_artifact_and_system_metrics(trained):
    import mlflow
    import yaml

    from gist_ray.config import load_config_dict

    cfg, result = trained
    client = mlflow.MlflowClient(result["tracking_uri"])
    path = mlflow.artifacts.download_artifacts(
        run_id=result["run_id"], artifact_path="config.yaml", tracking_uri=result["tracking_uri"]
    )
    with open(path) as f:
        assert load_config_dict(yaml.safe_load(f)) == cfg
    pytest.importorskip("psutil")
    metrics = client.get_run(result["run_id"]).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    assert any(k.startswith("system/system_memory_usage") for k in metrics)


def test_mlflow_model_loads_both_ways_and_carries_its_metrics(trained):
    import mlflow
    import pandas as pd
    from sentence_transformers import SentenceTransformer

    cfg, result = trained
    final = result["final"]
    mlflow.set_tracking_uri(result["tracking_uri"])
    texts = ["what does my car insurance cover", "cancel a life policy", "renters deductible"]
    ours = SentenceTransformer(result["model_dir"], device="cpu").encode(texts)
    # MLflow's sentence-transformers flavor gives the model itself.
    st = mlflow.sentence_transformers.load_model(final.model_uri)
    torch.testing.assert_close(torch.from_numpy(st.encode(texts)), torch.from_numpy(ours))
    # The pyfunc gives embeddings, from one string, a list or a one-column DataFrame.
    model = mlflow.pyfunc.load_model(f"runs:/{result['run_id']}/model")
    emb = model.predict(texts)
    assert emb.shape == (3, 32) and str(emb.dtype) == "float32"
    torch.testing.assert_close(torch.from_numpy(emb), torch.from_numpy(ours), rtol=1e-4, atol=1e-5)
    one = model.predict(texts[0])
    assert one.shape == (1, 32)
    torch.testing.assert_close(torch.from_numpy(one[0]), torch.from_numpy(ours[0]))
    frame = model.predict(pd.DataFrame({"text": texts}))
    torch.testing.assert_close(torch.from_numpy(frame), torch.from_numpy(emb))
    unit = model.predict(texts, params={"normalize_embeddings": True})
    torch.testing.assert_close(torch.from_numpy(unit).norm(dim=1), torch.ones(3))
    # Registered under mlflow.register_as; the same model by its registry name.
    assert final.registered == "tiny-gist version 1"
    emb2 = mlflow.pyfunc.load_model("models:/tiny-gist/1").predict(texts)
    torch.testing.assert_close(torch.from_numpy(emb2), torch.from_numpy(emb))
    # The final eval metrics are linked to the logged model and name the eval set.
    client = mlflow.MlflowClient(result["tracking_uri"])
    logged = client.get_logged_model(final.model_id)
    linked = {m.key: m for m in logged.metrics}
    assert linked["eval/after/ndcg_at_10"].value == pytest.approx(result["after"]["ndcg@10"])
    # the eval set by its folder (one flat qrels.tsv: no split to name)
    assert linked["eval/after/ndcg_at_10"].dataset_name == cfg.eval.source


def test_training_data_is_the_runs_dataset_input(trained, tiny_pairs_file):
    import mlflow

    cfg, result = trained
    run = mlflow.MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    training = inputs["pairs"]
    assert {t.key: t.value for t in training.tags}["mlflow.data.context"] == "training"
    assert tiny_pairs_file.name in training.dataset.source
    assert json.loads(training.dataset.profile)["num_rows"] == 64
