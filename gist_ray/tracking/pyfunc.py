"""The trained model as an MLflow pyfunc: ``mlflow.pyfunc.load_model(uri).predict(texts)`` returns
L2-normalised embeddings ``[n, d]`` (float32 numpy).

The pyfunc's only artifact is the sentence-transformers folder gist-ray saves, unchanged, under
``<model>/artifacts/sentence_transformer``, so the same files also load with
``SentenceTransformer(...)`` and ``AutoModel``. The gist_ray package travels with the model
(``code_paths``), so loading needs torch and transformers but not a gist-ray install.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

ARTIFACT = "sentence_transformer"


def _texts(model_input: Any) -> list[str]:
    """Accept a list of strings, one string, a numpy array, a Series or a one-column frame."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc") and getattr(model_input, "ndim", 1) == 2:
        model_input = model_input.iloc[:, 0]
    return [str(t) for t in list(model_input)]


class EmbeddingModel(mlflow.pyfunc.PythonModel):
    """Wraps :func:`gist_ray.models.load_encoder` on the saved sentence-transformers folder."""

    def load_context(self, context) -> None:
        from gist_ray.models import load_encoder, st_settings

        folder = context.artifacts[ARTIFACT]
        pooling, max_len = st_settings(folder, default=("mean", 128))
        cfg = context.model_config or {}
        self.batch_size = int(cfg.get("batch_size", 64))
        self.encoder = load_encoder(folder, pooling, max_len, frozen=True, key="pyfunc model")

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None):
        texts = _texts(model_input)
        return self.encoder.encode(texts, batch_size=self.batch_size).numpy()


def _requirements() -> list[str]:
    import importlib.metadata as md

    out = []
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas"):
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
) -> str:
    """Log ``model_dir`` (a sentence-transformers folder) to the run as a pyfunc; return its
    ``models:/`` URI (``runs:/<run_id>/<name>`` loads it too)."""
    import mlflow

    import gist_ray

    mlflow.set_tracking_uri(tracking_uri)
    # MLflow names the copied folder after its source and refuses symlinks: hard-link the
    # files under the fixed name ARTIFACT (a plain copy where links are not possible).
    with tempfile.TemporaryDirectory(dir=Path(model_dir).parent) as tmp:
        src = Path(tmp) / ARTIFACT
        try:
            shutil.copytree(model_dir, src, copy_function=os.link)
        except OSError:
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(model_dir, src)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False), warnings.catch_warnings():
            # The type hint of predict gives the signature: no input example is needed.
            warnings.filterwarnings("ignore", message=".*input example")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                artifacts={ARTIFACT: str(src)},
                code_paths=[str(Path(gist_ray.__file__).parent)],
                pip_requirements=_requirements(),
                model_config={"batch_size": 64},
                step=step,
            )
    return info.model_uri
