"""The trained model in MLflow: one logged model, saved with MLflow's sentence-transformers
flavor, loadable two ways:

- ``mlflow.sentence_transformers.load_model(uri)`` gives the ``SentenceTransformer`` itself;
- ``mlflow.pyfunc.load_model(uri).predict(texts)`` gives embeddings ``[n, d]`` (float32 numpy)
  through the model's own module stack. ``texts`` may be one string, a list, a Series or a
  one-column DataFrame; ``params={"prompt_name": "query"}`` applies one of the model's prompts
  (``"document"`` for passages), ``params={"normalize_embeddings": True}`` L2-normalises.

The pyfunc flavor's loader is this module (the gist_ray package travels with the model as code)
instead of MLflow's default sentence-transformers wrapper, so that a parameter left unset means
the model's own default rather than a fixed value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOADER = __name__  # the python_function flavor's loader_module
PARAMS = (("prompt_name", "string", ""), ("batch_size", "long", 32))


def _texts(model_input: Any) -> list[str]:
    """Accept one string, a list, a numpy array, a Series or a one-column DataFrame."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc") and getattr(model_input, "ndim", 1) == 2:
        model_input = model_input.iloc[:, 0]
    return [str(t) for t in list(model_input)]


class EmbeddingPredictor:
    """The pyfunc: ``predict(texts, params)`` -> embeddings through the model's own stack."""

    def __init__(self, model) -> None:
        self.model = model

    def get_raw_model(self):
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        params = params or {}
        return self.model.encode(
            _texts(model_input),
            prompt_name=params.get("prompt_name") or None,
            batch_size=int(params.get("batch_size") or 32),
            normalize_embeddings=bool(params.get("normalize_embeddings", False)),
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype("float32")


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> EmbeddingPredictor:
    """Called by ``mlflow.pyfunc.load_model`` with the flavor's data folder."""
    from sentence_transformers import SentenceTransformer

    # The repository's code (if any) is inside the logged artifacts, as in MLflow's own loader.
    return EmbeddingPredictor(SentenceTransformer(path, device="cpu", trust_remote_code=True))


def signature():
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    params = [ParamSpec(n, t, d) for n, t, d in PARAMS]
    params.append(ParamSpec("normalize_embeddings", "boolean", False))
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1))]),
        params=ParamSchema(params),
    )


class _Flavor:
    """MLflow's sentence-transformers flavor, with this module as the pyfunc loader."""

    __name__ = "sentence_transformers"

    @staticmethod
    def save_model(path: str, mlflow_model, **kwargs) -> None:
        import mlflow.sentence_transformers
        from mlflow.models.model import MLMODEL_FILE_NAME

        mlflow.sentence_transformers.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors["python_function"]["loader_module"] = LOADER
        mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


def _requirements() -> list[str]:
    import importlib.metadata as md

    out = []
    names = ("sentence-transformers", "torch", "transformers", "tokenizers", "safetensors")
    for name in (*names, "numpy", "pandas"):
        try:
            out.append(f"{name}=={md.version(name).split('+')[0]}")
        except md.PackageNotFoundError:
            out.append(name)
    return out


def log_embedding_model(
    tracking_uri: str,
    run_id: str,
    model_dir: str | Path,
    name: str = "model",
    step: int = 0,
    trust_remote_code: bool = False,
):
    """Log ``model_dir`` (a sentence-transformers folder) to the run; return MLflow's
    ``ModelInfo`` (``model_uri`` = ``models:/<model_id>``, ``model_id``)."""
    import mlflow
    from mlflow.models import Model

    import gist_ray
    from gist_ray.models.loading import quiet_hf

    mlflow.set_tracking_uri(tracking_uri)
    with quiet_hf():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(
            str(model_dir), device="cpu", trust_remote_code=trust_remote_code
        )
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            return Model.log(
                artifact_path=None,
                name=name,
                flavor=_Flavor,
                model=model,
                signature=signature(),
                code_paths=[str(Path(gist_ray.__file__).parent)],
                pip_requirements=_requirements(),
                step=step,
            )
