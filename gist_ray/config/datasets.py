"""``data.train`` normalised: one source, a list, or a mapping name -> source (with its own
columns, prompts and row limit), as :class:`DatasetSpec` values."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gist_ray.config.schema import DataConfig, coerce
from gist_ray.core import storage
from gist_ray.core.errors import ConfigError

# The loss is a layer below the config: its allowed values live with its code. The allowed
# values of the layers above (models, eval, mining) live here, and those layers import them.


@dataclass(frozen=True)
class DatasetSpec:
    """One training dataset of ``data.train``, normalised."""

    name: str  # its name: the mapping key, or derived from the source
    source: str
    columns: dict[str, str]
    prompts: str | dict[str, str] | None  # None: model.prompts decides
    max_examples: int  # 0 = all rows
    key: str  # the config key that names it, for error messages


_SPEC_KEYS = ("source", "columns", "prompts", "max_examples")


def _default_name(source: str) -> str:
    if storage.is_remote(source):  # never Path() on a URI (s3:// would become s3:/)
        base = storage.name(source)
        stem, suffix = posixpath.splitext(base)
        return stem if suffix else base
    path = Path(source.rstrip("/\\"))
    return path.stem if path.suffix else path.name


def train_datasets(d: DataConfig) -> list[DatasetSpec]:
    """``data.train`` as a list of datasets; a malformed entry is a ConfigError naming it."""
    train = d.train
    if isinstance(train, str):
        items = [("data.train", None, train)]
    elif isinstance(train, list):
        items = [(f"data.train[{i}]", None, v) for i, v in enumerate(train)]
    else:
        items = [(f"data.train.{k}", str(k), v) for k, v in train.items()]
    if not items:
        raise ConfigError("data.train is empty; give a source, a list or a mapping name -> source")
    specs = [_spec(key, name, value, d) for key, name, value in items]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        keys = ", ".join(s.key for s in specs if s.name == dup)
        raise ConfigError(
            f"{keys}: two datasets are named {dup!r}; give data.train as a mapping name -> source"
        )
    return specs


def _spec(key: str, name: str | None, value: Any, d: DataConfig) -> DatasetSpec:
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{key}: expected a source (string) or a mapping with 'source', got {value!r}"
        )
    unknown = [k for k in value if k not in (*_SPEC_KEYS, "name")]
    if unknown:
        raise ConfigError(
            f"unknown config key '{key}.{unknown[0]}'; allowed: {', '.join(_SPEC_KEYS)}, name"
        )
    source = value.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{key}.source: expected a file, folder, hub name or 'insuranceqa'")
    columns = coerce(f"{key}.columns", value.get("columns", d.columns), dict[str, str])
    prompts = value.get("prompts")
    if prompts is not None:
        prompts = coerce(f"{key}.prompts", prompts, str | dict[str, str])
    max_examples = coerce(f"{key}.max_examples", value.get("max_examples", d.max_examples), int)
    if max_examples < 0:
        raise ConfigError(f"{key}.max_examples = {max_examples} is not allowed; must be >= 0")
    name = value.get("name", name) or _default_name(source)
    return DatasetSpec(str(name), source, columns, prompts, max_examples, key)


def map_sources(train: Any, fn: Callable[[str], str]) -> Any:
    """``data.train`` with every source replaced by ``fn(source)``, same shape."""
    if isinstance(train, str):
        return fn(train)
    if isinstance(train, list):
        return [map_sources(v, fn) for v in train]
    if isinstance(train, dict) and isinstance(train.get("source"), str):
        return {**train, "source": fn(train["source"])}
    return {k: map_sources(v, fn) for k, v in train.items()}
