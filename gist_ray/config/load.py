"""Loading a configuration: YAML files, ``--set section.key=value`` overrides (values read as
YAML), and plain dicts, each value coerced to its field's type; then validated. A bad key or value
names where it was set (``line 3 of my.yaml``, ``--set ...``); an unknown key also suggests the
closest known one."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from gist_ray.config.schema import Config, coerce
from gist_ray.config.validate import validate
from gist_ray.core.errors import ConfigError

# The loss is a layer below the config: its allowed values live with its code. The allowed
# values of the layers above (models, eval, mining) live here, and those layers import them.


Where = Callable[[str], str]  # a dotted key -> where it was set, e.g. " (line 3 of my.yaml)"


def _nowhere(name: str) -> str:
    return ""


def _apply(obj: Any, key: str, value: Any, prefix: str = "", where: Where = _nowhere) -> None:
    """Set dotted ``key`` on the dataclass ``obj``, validating name and type."""
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(type(obj))
    name = f"{prefix}{head}"
    if head not in hints:
        allowed = ", ".join(f"{prefix}{k}" for k in hints)
        guess = suggest(name)
        hint = f"did you mean {guess!r}? " if guess else ""
        raise ConfigError(f"unknown config key {name!r}{where(name)}; {hint}allowed: {allowed}")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            _apply(current, rest, value, f"{name}.", where)
        elif isinstance(value, dict):
            for k, v in value.items():
                _apply(current, str(k), v, f"{name}.", where)
        else:
            raise ConfigError(f"{name}: expected a section (mapping), got {value!r}{where(name)}")
        return
    if rest:
        if isinstance(current, dict) or (current is None and _allows_dict(hints[head])):
            value = _set_nested(
                dict(current or {}), rest.split("."), value
            )  # data.columns.anchor=q
        else:
            raise ConfigError(
                f"unknown config key {name}.{rest!r}{where(name)}; {name} is not a section"
            )
    try:
        setattr(obj, head, coerce(name, value, hints[head]))
    except ConfigError as e:
        raise ConfigError(f"{e}{where(name)}") from e


def _keys(section: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config section (nested sections expanded)."""
    out = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(value):
            out += _keys(value, f"{prefix}{f.name}.")
    return out


# Hugging Face Trainer's names for keys gist-ray spells otherwise.
SYNONYMS = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "save_steps": "checkpoint_every",
    "logging_steps": "log_every",
}


def suggest(name: str) -> str | None:
    """The known key closest to the unknown dotted key ``name``, or None: the same name in
    another section (``train.temperature`` -> ``loss.temperature``), else the closest name in
    its section by difflib's ratio (``train.epoch`` -> ``train.epochs``; Hugging Face's
    ``learning_rate`` -> ``lr``), else the closest anywhere."""
    keys = _keys(Config())
    section, _, leaf = name.rpartition(".")
    synonym = difflib.get_close_matches(leaf, list(SYNONYMS), n=1, cutoff=0.85)
    leaf = SYNONYMS[synonym[0]] if synonym else leaf  # learning_rate, even misspelt

    def parent(k: str) -> str:
        return k.rpartition(".")[0]

    def named(k: str) -> str:
        return k.rpartition(".")[2]

    if f"{section}.{leaf}".lstrip(".") in keys:
        return f"{section}.{leaf}".lstrip(".")
    moved = [k for k in keys if named(k) == leaf]
    if moved:
        return moved[0]
    siblings = {named(k): k for k in keys if parent(k) == section}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    everywhere = {named(k): k for k in reversed(keys)}  # the first section's key wins
    close = difflib.get_close_matches(leaf, list(everywhere), n=1, cutoff=0.8)
    return everywhere[close[0]] if close else None


def _yaml_lines(text: str) -> dict[str, int]:
    """Dotted key -> the 1-based line of that key in a YAML document (mappings only)."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    dotted = f"{prefix}{key.value}"
                    lines.setdefault(dotted, key.start_mark.line + 1)
                    walk(value, f"{dotted}.")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


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
        lines = _yaml_lines(p.read_text())

        def in_file(name: str) -> str:
            # a dotted key written as one ("train.lr: 1" at the top level): its longest prefix
            line = (
                lines.get(name)
                or max(
                    ((len(k), n) for k, n in lines.items() if name.startswith(f"{k}.")),
                    default=(0, 0),
                )[1]
            )
            return f" (line {line} of {p})" if line else f" (in {p})"

        for key, value in data.items():
            _apply(cfg, str(key), value, where=in_file)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value, where=lambda name, text=text: f" (--set {text})")
    return validate(cfg)


def load_config_dict(data: dict[str, Any]) -> Config:
    """Rebuild a validated Config from :meth:`Config.to_dict` output (e.g. on a Ray worker)."""
    cfg = Config()
    for key, value in data.items():
        _apply(cfg, key, value)
    return validate(cfg)
