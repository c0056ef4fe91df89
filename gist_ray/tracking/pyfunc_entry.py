"""MLflow "models from code" entry point of the gist-ray pyfunc (see gist_ray.tracking.pyfunc):
MLflow stores this file with the model and runs it at load time, so nothing is pickled."""

import mlflow

from gist_ray.tracking.pyfunc import EmbeddingModel

mlflow.models.set_model(EmbeddingModel())
