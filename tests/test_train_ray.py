"""A real 2-worker Ray Train run on tiny random BERTs, through the `train` command's driver."""

from __future__ import annotations

import json

import pytest
import torch

from gist_ray.config import load_config


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
    from gist_ray.run import train

    out = tmp_path_factory.mktemp("run")
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
            "ray.num_workers=2",
            f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db",
            "mlflow.experiment=test-train",
            f"output_dir={out / 'output'}",
        ]
    )
    return cfg, train(cfg)


def test_run_ends_with_checkpoint_and_model(trained):
    cfg, result = trained
    from pathlib import Path

    ckpt = Path(cfg.output_dir) / "final-checkpoint"
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
    artifacts = [a.path for a in client.list_artifacts(result["run_id"], "model")]
    assert "model/modules.json" in artifacts


def test_saved_model_loads_in_sentence_transformers(trained, tiny_models):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from gist_ray.models import load_encoder

    cfg, result = trained
    st = SentenceTransformer(result["model_dir"], device="cpu")
    texts = ["what does my car insurance cover", "cancel a life policy"]
    emb = st.encode(texts, convert_to_tensor=True)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    ours = load_encoder(result["model_dir"], "mean", 32).encode(texts)
    torch.testing.assert_close(emb, ours, rtol=1e-4, atol=1e-5)
    # Training changed the weights.
    base = load_encoder(str(tiny_models["student"]), "mean", 32).encode(texts)
    assert not torch.allclose(base, ours, atol=1e-4)
    AutoModel.from_pretrained(result["model_dir"])
