"""The run's data in MLflow: every training dataset as a dataset input (context ``training``,
with its source, digest and schema) and the eval set (context ``evaluation``), which the final
eval metrics name."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

INSURANCEQA_URL = "https://pypi.org/project/insuranceqa-data/1.0/"


def source_uri(source: str) -> str:
    """Where data came from, as MLflow records it: a file URI, a storage URI as given
    (``s3://...``), the built-in data's package page, or the hub dataset's page."""
    from pathlib import Path

    from gist_ray.core.storage import is_remote

    if is_remote(source):
        return source
    if Path(source).exists():
        return Path(source).resolve().as_uri()
    if source.strip().lower() == "insuranceqa":
        return INSURANCEQA_URL
    return f"https://huggingface.co/datasets/{source}"


def training_dataset(training_set) -> Any:
    """An ``mlflow.data`` dataset of one :class:`gist_ray.data.training.TrainingSet`."""
    import mlflow.data

    with _plain_sources():  # the digest reads the first rows only
        return mlflow.data.from_huggingface(
            training_set.data, name=training_set.name, source=source_uri(training_set.spec.source)
        )


def eval_dataset(evalset, source: str) -> Any:
    """An ``mlflow.data`` dataset of an eval set: its queries and their relevant documents."""
    import mlflow.data
    import pandas as pd

    frame = pd.DataFrame(
        {
            "query_id": list(evalset.queries),
            "query": list(evalset.queries.values()),
            "relevant": [",".join(sorted(evalset.qrels.get(q, {}))) for q in evalset.queries],
        }
    )
    with _plain_sources():
        return mlflow.data.from_pandas(frame, source=source_uri(source), name=evalset.name)


@contextlib.contextmanager
def _plain_sources() -> Iterator[None]:
    """MLflow warns that a source string "can be interpreted in multiple ways"; it is a plain
    description here (a file URI or a name)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        yield


def log_inputs(client, run_id: str, named: list[tuple[Any, str]]) -> None:
    """Log (dataset, context) pairs the run does not hold yet (a resumed run logs none twice)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    run = client.get_run(run_id)
    held = {(i.dataset.name, i.dataset.digest) for i in (run.inputs.dataset_inputs or [])}
    new = [
        DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for ds, context in named
        if (ds.name, ds.digest) not in held
    ]
    if new:
        client.log_inputs(run_id, datasets=new)


def log_training_data(tracking_uri: str, run_id: str, sets: list) -> None:
    """Every training dataset as an MLflow dataset input of the run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    log_inputs(client, run_id, [(training_dataset(s), "training") for s in sets])
