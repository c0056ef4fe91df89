"""Typed run configuration: dataclasses (:mod:`.schema`), ``data.train`` normalised into dataset
specs (:mod:`.datasets`), loading from YAML, ``--set`` overrides and dicts (:mod:`.load`), and
every setting's check (:mod:`.validate`). An unknown key or a value of the wrong type or range
raises :class:`~gist_ray.core.errors.ConfigError` naming the key and what is allowed.

The names every other layer uses are re-exported here: ``from gist_ray.config import Config``.
"""

from gist_ray.config.datasets import DatasetSpec, map_sources, train_datasets
from gist_ray.config.load import load_config, load_config_dict, parse_override
from gist_ray.config.schema import (
    EVAL_METRICS,
    LORA_EXPORTS,
    MINE_BACKENDS,
    POOLINGS,
    SAMPLINGS,
    SELF,
    SELF_GUIDES,
    SHORTFALL,
    THRESHOLDS,
    Config,
    DataConfig,
    EvalConfig,
    LoraConfig,
    LossConfig,
    MineConfig,
    MlflowConfig,
    ModelConfig,
    RayConfig,
    TrainConfig,
    ray_storage_path,
)
from gist_ray.config.validate import GUIDE_KEYS, validate, validate_loss_for

__all__ = [
    "EVAL_METRICS",
    "GUIDE_KEYS",
    "LORA_EXPORTS",
    "MINE_BACKENDS",
    "POOLINGS",
    "SAMPLINGS",
    "SELF",
    "SELF_GUIDES",
    "SHORTFALL",
    "THRESHOLDS",
    "Config",
    "DataConfig",
    "DatasetSpec",
    "EvalConfig",
    "LoraConfig",
    "LossConfig",
    "MineConfig",
    "MlflowConfig",
    "ModelConfig",
    "RayConfig",
    "TrainConfig",
    "load_config",
    "load_config_dict",
    "map_sources",
    "parse_override",
    "train_datasets",
    "validate",
    "validate_loss_for",
    "ray_storage_path",
]
