"""The run's data in MLflow: every kind of training source becomes a dataset input MLflow can
resolve, logged once per run, and the eval set is one too."""

from __future__ import annotations

import pytest
from datasets import Dataset

from gist_ray.config import DatasetSpec
from gist_ray.data.training import TrainingSet


def _set(source: str, name: str = "pairs") -> TrainingSet:
    spec = DatasetSpec(name, source, {}, None, 0, "data.train")
    return TrainingSet(spec, Dataset.from_dict({"anchor": ["a", "b"], "positive": ["c", "d"]}))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store (creating a SQLite store takes seconds) and its experiment."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client, client.create_experiment("t", artifact_location=(root / "mlruns").as_uri())


@pytest.mark.parametrize(
    ("source", "kind", "where"),
    [
        ("insuranceqa", "http", "pypi.org/project/insuranceqa-data"),
        ("FILE", "local", "file://"),
        ("s3://bucket/data/pairs.jsonl", "s3", "s3://bucket/data/pairs.jsonl"),
        ("sentence-transformers/gooaq", "http", "huggingface.co/datasets/sentence-transformers"),
    ],
)
def test_training_data_is_logged_once_as_a_run_input(source, kind, where, store, tmp_path):
    from gist_ray.tracking.datasets import log_inputs, training_dataset

    if source == "FILE":
        source = str(tmp_path / "pairs.jsonl")
        (tmp_path / "pairs.jsonl").write_text('{"anchor": "a", "positive": "c"}\n')
    client, exp = store
    run_id = client.create_run(exp).info.run_id
    # MLflow keeps one dataset record per (name, digest) in an experiment: one name per case.
    ds = training_dataset(_set(source, name=kind + where[:12]))
    log_inputs(client, run_id, [(ds, "training")])
    log_inputs(client, run_id, [(ds, "training")])  # a resumed run: not twice
    (logged,) = client.get_run(run_id).inputs.dataset_inputs
    assert logged.dataset.name == kind + where[:12] and logged.dataset.source_type == kind
    assert where in logged.dataset.source
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "training"}


def test_eval_set_dataset_names_the_split():
    from gist_ray.eval.sets import load_eval
    from gist_ray.tracking.datasets import eval_dataset

    ev = load_eval("insuranceqa", "test", 5, 20)
    ds = eval_dataset(ev, "insuranceqa")
    assert ds.name == "insuranceqa (split test)" and len(ds.df) == 5


def test_an_artifact_location_for_an_existing_experiment_is_said_not_ignored(tmp_path, caplog):
    """MLflow fixes an experiment's artifact location when it is created: a different
    mlflow.artifact_location later is named with where the artifacts really go."""
    import logging

    import mlflow

    from gist_ray.tracking import runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    first = runs._experiment_id(client, "exp", uri, None)
    with caplog.at_level(logging.WARNING, logger="gist_ray"):
        again = runs._experiment_id(client, "exp", uri, "s3://bucket/mlflow")
    assert again == first
    (record,) = [r for r in caplog.records if "artifact_location" in r.getMessage()]
    assert "s3://bucket/mlflow" in record.getMessage()
    assert (tmp_path / "mlruns").as_uri() in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gist_ray"):
        runs._experiment_id(client, "exp", uri, (tmp_path / "mlruns").as_uri())
    assert not caplog.records
