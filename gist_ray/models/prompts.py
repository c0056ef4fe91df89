"""Prompts per column: the student's and the guide's, from the config, the dataset or the model's
own (``encode_query`` for anchors, ``encode_document`` for positives and negatives), checked
against the columns the data has. The guide's prompts are part of what fixes its embeddings (the
guide cache's fingerprint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gist_ray.config import SELF
from gist_ray.core.assets import resolve_model_path
from gist_ray.core.errors import ConfigError
from gist_ray.models.spec import guide_spec

if TYPE_CHECKING:
    from gist_ray.config import Config
    from gist_ray.data.training import TrainingSet

DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")  # as SentenceTransformer.encode_document


def own_prompts(prompts: dict[str, str] | None) -> dict[str, str]:
    """The model's own prompts (its ``prompts`` dict) per column, as sentence-transformers'
    ``encode_query`` / ``encode_document`` apply them: anchors get its ``query`` prompt,
    positives and negatives its ``document`` (or ``passage``, ``corpus``) prompt."""
    prompts = prompts or {}
    document = next((prompts[n] for n in DOCUMENT_PROMPT_NAMES if n in prompts), "")
    out = {"anchor": prompts.get("query", ""), "positive": document, "negative": document}
    return {k: v for k, v in out.items() if v}


def saved_prompts(path: str, revision: str = "") -> dict[str, str]:
    """The prompts a model folder (or a hub model in the local cache) declares in
    ``config_sentence_transformers.json``, read without loading the model."""
    name = "config_sentence_transformers.json"
    file = Path(path) / name
    if not Path(path).is_dir():
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, name, revision=revision or None)
        file = Path(found) if isinstance(found, str) else file
    try:
        prompts = json.loads(file.read_text()).get("prompts") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in prompts.items() if isinstance(v, str)}


def column_prompts(
    setting: str | dict[str, Any] | None, dataset: str, columns: list[str], own: dict[str, str]
) -> dict[str, str]:
    """The prompt of each of ``columns`` (anchor, positive, negative_1..k) for one dataset.

    ``setting`` is the config's value: None = ``own`` (the model's prompts), a string for every
    column, {column: prompt} or {dataset: {column: prompt}} as sentence-transformers' trainer
    takes them; ``negative`` applies to every negative column."""
    if setting is None:
        setting = own
    elif isinstance(setting, str):
        setting = dict.fromkeys(columns, setting)
    elif _per_dataset(setting):
        setting = setting.get(dataset, {})
    out = {}
    for col in columns:
        generic = setting.get("negative", "") if col.startswith("negative_") else ""
        if prompt := setting.get(col, generic):
            out[col] = prompt
    return out


def check_prompt_columns(
    setting: str | dict[str, Any] | None, key: str, columns: dict[str, list[str]]
) -> None:
    """A prompt for a column no dataset has (``columns``: dataset -> its columns) is a
    ConfigError naming ``key``. A {column: prompt} mapping shared by several datasets needs
    each column in one of them; a per-dataset mapping, in that dataset."""
    if not isinstance(setting, dict):
        return
    if _per_dataset(setting):
        for name, inner in setting.items():
            _check_columns(inner, f"dataset {name!r}", columns.get(name, []), f"{key}.{name}")
        return
    where = f"dataset {next(iter(columns))!r}" if len(columns) == 1 else "any dataset"
    _check_columns(setting, where, [c for cols in columns.values() for c in cols], key)


def _per_dataset(setting: dict[str, Any]) -> bool:
    return bool(setting) and all(isinstance(v, dict) for v in setting.values())


def _check_columns(setting: dict[str, str], where: str, columns: list[str], key: str) -> None:
    allowed = list(dict.fromkeys(columns))
    if any(c.startswith("negative_") for c in allowed):
        allowed.append("negative")
    for col in setting:
        if col not in allowed:
            raise ConfigError(
                f"{key}: no column {col!r} in {where}; the columns are {', '.join(allowed)}"
            )


def student_prompts(
    cfg: Config, sets: list[TrainingSet], model_prompts: dict[str, str]
) -> list[list[str]]:
    """Per dataset, the student's prompt of each column in loss order ("" = none): the
    dataset's own ``prompts``, else ``model.prompts``, else the model's own (``model_prompts``,
    its prompts by name). A prompt for a column the data lacks is a ConfigError."""
    own = own_prompts(model_prompts)
    check_prompt_columns(cfg.model.prompts, "model.prompts", {s.name: s.columns for s in sets})
    out = []
    for s in sets:
        setting = cfg.model.prompts
        if s.spec.prompts is not None:
            setting = s.spec.prompts
            check_prompt_columns(setting, f"{s.spec.key}.prompts", {s.name: s.columns})
        by_col = column_prompts(setting, s.name, s.columns, own)
        out.append([by_col.get(c, "") for c in s.columns])
    return out


def guide_prompts(cfg: Config, sets: list[TrainingSet]) -> list[dict[str, str]]:
    """Per dataset, the guide's prompt of each column: ``model.guide_prompts``, else the guide's
    own (read from its folder, so a cache hit needs no guide)."""
    spec = guide_spec(cfg)
    if cfg.model.guide == SELF:  # the student's prompts
        own = saved_prompts(resolve_model_path(spec.name), spec.revision)
        by_col = student_prompts(cfg, sets, own)
        return [{c: p for c, p in zip(s.columns, ps) if p} for s, ps in zip(sets, by_col)]
    own = own_prompts(saved_prompts(resolve_model_path(spec.name), spec.revision))
    setting = cfg.model.guide_prompts
    check_prompt_columns(setting, "model.guide_prompts", {s.name: s.columns for s in sets})
    return [column_prompts(setting, s.name, s.columns, own) for s in sets]
