"""Loading a configuration: YAML files, ``--set section.key=value`` overrides (values read as
YAML), and plain dicts, each value coerced to its field's type; then validated."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from gist_ray.config.schema import Config, coerce
from gist_ray.config.validate import validate
from gist_ray.core.errors import ConfigError

# The loss is a layer below the config: its allowed values live with its code. The allowed
# values of the layers above (models, eval, mining) live here, and those layers import them.


def _apply(obj: Any, key: str, value: Any, prefix: str = "") -> None:
    """Set dotted ``key`` on the dataclass ``obj``, validating name and type."""
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(type(obj))
    name = f"{prefix}{head}"
    if head not in hints:
        allowed = ", ".join(f"{prefix}{k}" for k in hints)
        raise ConfigError(f"unknown config key {name!r}; allowed: {allowed}")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _apply(current, rest, value, f"{name}.")
        elif isinstance(value, dict):
            for k, v in value.items():
                _apply(current, str(k), v, f"{name}.")
        else:
            raise ConfigError(f"{name}: expected a section (mapping), got {value!r}")
        return
    if rest:
        if isinstance(current, dict) or (current is None and _allows_dict(hints[head])):
            value = _set_nested(
                dict(current or {}), rest.split("."), value
            )  # data.columns.anchor=q
        else:
            raise ConfigError(f"unknown config key {name}.{rest!r}; {name} is not a section")
    setattr(obj, head, coerce(name, value, hints[head]))


def _allows_dict(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict for a in (annotation, *typing.get_args(annotation)))


def _set_nested(mapping: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """``{a: {b: value}}`` merged into ``mapping`` for the path ``[a, b]``."""
    head, rest = path[0], path[1:]
    if rest:
        inner = mapping.get(head)
        value = _set_nested(dict(inner) if isinstance(inner, dict) else {}, rest, value)
    mapping[head] = value
    return mapping


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value``; the value is read as YAML (``3e-5``, ``true``, ``{a: b}``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML file, then ``--set`` overrides; validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {str(p)!r} is not valid YAML: {e}".splitlines()[0]
            ) from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
        for key, value in data.items():
            _apply(cfg, str(key), value)
    for text in overrides:
        _apply(cfg, *parse_override(text))
    return validate(cfg)


def load_config_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated Config from :meth:`Config.to_dict` output (e.g. on a Ray worker)."""
    cfg = Config()
    for key, value in data.items():
        _apply(cfg, key, value)
    return validate(cfg)
