"""Every check of a setting: ranges, allowed values, keys that need or exclude each other. A bad
value is a one-line :class:`ConfigError` naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gist_ray.config.datasets import train_datasets
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
    MineConfig,
    ModelConfig,
)
from gist_ray.core import storage
from gist_ray.core.errors import ConfigError

# The loss is a layer below the config: its allowed values live with its code. The allowed
# values of the layers above (models, eval, mining) live here, and those layers import them.
from gist_ray.loss import (
    BACKENDS,
    COMPUTE_DTYPES,
    HARDNESS_MODES,
    STRATEGIES,
    validate_matryoshka,
)


def _check_prompts(key: str, value: Any) -> None:
    """A prompt, {column: prompt} or {dataset: {column: prompt}} (columns are checked against
    the data when it is loaded)."""
    if value is None or isinstance(value, str):
        return
    for name, inner in value.items():
        if isinstance(inner, dict):
            for col, prompt in inner.items():
                if not isinstance(prompt, str):
                    raise ConfigError(
                        f"{key}.{name}.{col}: a prompt must be a string, got {prompt!r}"
                    )
        elif not isinstance(inner, str):
            raise ConfigError(
                f"{key}.{name}: expected a prompt (string) or a mapping column -> prompt, "
                f"got {inner!r}"
            )
    nested = [isinstance(v, dict) for v in value.values()]
    if any(nested) and not all(nested):
        raise ConfigError(
            f"{key}: mix of column -> prompt and dataset -> {{column: prompt}}; use one form"
        )


def _check_locations(cfg: Config) -> None:
    """A location written ``s3:/bucket/key`` (one slash) would be a local folder named ``s3:``;
    refuse it naming the URI meant."""
    locations = [
        ("output_dir", cfg.output_dir),
        ("ray.storage_path", cfg.ray.storage_path),
        ("data.guide_cache_dir", cfg.data.guide_cache_dir),
        ("mlflow.artifact_location", cfg.mlflow.artifact_location),
        ("mine.output", cfg.mine.output),
        ("eval.source", cfg.eval.source),
        *((spec.key, spec.source) for spec in train_datasets(cfg.data)),
    ]
    for key, value in locations:
        meant = storage.mistyped_uri(value) if isinstance(value, str) else None
        if meant:
            raise ConfigError(
                f"{key} = {value!r} is not allowed: a URI needs two slashes ({meant}); "
                "as a path it would make a local folder named "
                f"{value.split('/', 1)[0]!r}"
            )


def validate(cfg: Config) -> Config:
    """Range checks that no type can express."""

    def check(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key} = {value!r} is not allowed; {allowed}")

    m, t, lo, r = cfg.model, cfg.train, cfg.loss, cfg.ray
    _check_locations(cfg)
    for key in ("pooling", "guide_pooling"):
        value = getattr(m, key)
        allowed = f'"" (the model\'s own) or one of {", ".join(POOLINGS)}'
        check(value == "" or value in POOLINGS, f"model.{key}", allowed, value)
    for key in ("max_seq_length", "guide_max_seq_length", "export_max_seq_length"):
        value = getattr(m, key)
        check(value >= 0, f"model.{key}", "must be >= 0 (0 = the model's own)", value)
    for key in ("prompts", "guide_prompts"):
        _check_prompts(f"model.{key}", getattr(m, key))
    _check_lora(m)
    _check_self_guide(m)
    d = cfg.data
    check(d.max_examples >= 0, "data.max_examples", "must be >= 0 (0 = all)", d.max_examples)
    check(d.sampling in SAMPLINGS, "data.sampling", f"one of {', '.join(SAMPLINGS)}", d.sampling)
    names = [spec.name for spec in train_datasets(d)]
    for key in ("prompts", "guide_prompts"):
        value = getattr(m, key)
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            unknown = [n for n in value if n not in names]
            check(not unknown, f"model.{key}", f"datasets are: {', '.join(names)}", value)
    check(t.batch_size > 0, "train.batch_size", "must be > 0", t.batch_size)
    check(t.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = use epochs)", t.max_steps)
    check(t.epochs > 0, "train.epochs", "must be > 0", t.epochs)
    check(t.lr > 0, "train.lr", "must be > 0", t.lr)
    check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", t.warmup_ratio)
    check(t.checkpoint_every > 0, "train.checkpoint_every", "must be > 0", t.checkpoint_every)
    check(
        t.checkpoint_minutes >= 0,
        "train.checkpoint_minutes",
        "must be >= 0 (0 = by steps only)",
        t.checkpoint_minutes,
    )
    check(t.log_every > 0, "train.log_every", "must be > 0", t.log_every)
    check(
        t.guide_warmup_steps >= 0, "train.guide_warmup_steps", "must be >= 0", t.guide_warmup_steps
    )
    check(t.max_failures >= 0, "train.max_failures", "must be >= 0", t.max_failures)
    check(
        t.mini_batch_size >= 0, "train.mini_batch_size", "must be >= 0 (0 = off)", t.mini_batch_size
    )
    local = t.batch_size // max(cfg.ray.num_workers, 1)
    check(
        t.mini_batch_size <= local,
        "train.mini_batch_size",
        f"must be <= the per-worker batch ({local} = train.batch_size / ray.num_workers)",
        t.mini_batch_size,
    )
    e = cfg.eval
    check(e.every >= 0, "eval.every", "must be >= 0 (0 = only before and after)", e.every)
    check(e.metric in EVAL_METRICS, "eval.metric", f"one of {', '.join(EVAL_METRICS)}", e.metric)
    check(e.num_cpus >= 0, "eval.num_cpus", "must be >= 0", e.num_cpus)
    dt = cfg.data.guide_cache_dtype
    check(dt in ("float16", "float32"), "data.guide_cache_dtype", "float16 or float32", dt)
    check(e.num_gpus >= 0, "eval.num_gpus", "must be >= 0 (a fraction shares a GPU)", e.num_gpus)
    check(e.max_queries >= 0, "eval.max_queries", "must be >= 0 (0 = all)", e.max_queries)
    check(e.max_corpus >= 0, "eval.max_corpus", "must be >= 0 (0 = all)", e.max_corpus)
    check(lo.temperature > 0, "loss.temperature", "must be > 0", lo.temperature)
    check(lo.margin >= 0, "loss.margin", "must be >= 0", lo.margin)
    check(
        lo.margin_strategy in STRATEGIES,
        "loss.margin_strategy",
        f"one of {', '.join(STRATEGIES)}",
        lo.margin_strategy,
    )
    check(lo.backend in BACKENDS, "loss.backend", f"one of {', '.join(BACKENDS)}", lo.backend)
    check(
        lo.compute_dtype in COMPUTE_DTYPES,
        "loss.compute_dtype",
        f"one of {', '.join(COMPUTE_DTYPES)} (auto = bfloat16 on CUDA, float32 on CPU)",
        lo.compute_dtype,
    )
    _validate_mine(cfg.mine, check)
    try:  # the loss's own checks; their messages name the key
        validate_matryoshka(lo.matryoshka_dims, lo.matryoshka_weights)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check(lo.hardness_alpha >= 0, "loss.hardness_alpha", "must be >= 0", lo.hardness_alpha)
    check(
        lo.hardness_mode in HARDNESS_MODES,
        "loss.hardness_mode",
        f"one of {', '.join(HARDNESS_MODES)}",
        lo.hardness_mode,
    )
    check(r.num_workers > 0, "ray.num_workers", "must be > 0", r.num_workers)
    check(r.resource_wait_s >= 0, "ray.resource_wait_s", "must be >= 0", r.resource_wait_s)
    name = cfg.mlflow.run_name
    check(
        name is None
        or (name.strip() and not set("/\\") & set(name) and not {"'", '"'} <= set(name)),
        "mlflow.run_name",
        "it names the checkpoint folder: non-empty, no / or \\, not both ' and \"",
        name,
    )
    check(
        t.batch_size % r.num_workers == 0,
        "train.batch_size",
        f"must be divisible by ray.num_workers = {r.num_workers}",
        t.batch_size,
    )
    return cfg


def validate_loss_for(cfg: Config, width: int | None, negative_columns: int) -> None:
    """The loss settings that depend on the loaded student (its embedding ``width``) and data
    (the most negative columns of its datasets); ``width`` None: not known, not checked."""
    lo = cfg.loss
    try:
        validate_matryoshka(lo.matryoshka_dims, lo.matryoshka_weights, width)
    except ValueError as e:
        raise ConfigError(f"{e}; model.student = {cfg.model.student!r}") from None
    if lo.hardness_alpha > 0 and lo.hardness_mode == "hard_negatives" and not negative_columns:
        raise ConfigError(
            "loss.hardness_mode = 'hard_negatives' weights the data's negative columns, but it has "
            "none; use in_batch_negatives or all_negatives, or loss.hardness_alpha = 0"
        )


def _changed(section: Any, keys: tuple[str, ...] | None = None) -> list[str]:
    """The fields of a dataclass ``section`` (or only ``keys``) that differ from its defaults."""
    default = type(section)()
    names = keys or tuple(f.name for f in dataclasses.fields(section))
    return [k for k in names if getattr(section, k) != getattr(default, k)]


def _check_lora(m: ModelConfig) -> None:
    lora = m.lora
    if lora.rank < 0:
        raise ConfigError(f"model.lora.rank = {lora.rank} is not allowed; must be > 0 (0 = off)")
    if lora.rank == 0:
        stray = [f"model.lora.{k}" for k in _changed(lora)]
        stray += ["model.lora_export"] if m.lora_export != "merged" else []
        if stray:
            raise ConfigError(
                f"{stray[0]} is set but LoRA is off (model.lora.rank = 0); set model.lora.rank "
                "to the adapter rank, e.g. 16"
            )
    if lora.alpha < 0:
        raise ConfigError(f"model.lora.alpha = {lora.alpha} is not allowed; >= 0 (0 = 2 x rank)")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout = {lora.dropout} is not allowed; must be in [0, 1)")
    for i, name in enumerate(lora.target_modules):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"model.lora.target_modules[{i}] = {name!r}: expected a module name such as q_proj"
            )
    if m.lora_export not in LORA_EXPORTS:
        allowed = ", ".join(LORA_EXPORTS)
        raise ConfigError(f"model.lora_export = {m.lora_export!r} is not allowed; one of {allowed}")


# The guide's own settings: with model.guide: self there is no separate guide to apply them to.
GUIDE_KEYS = (
    "guide_revision",
    "guide_trust_remote_code",
    "guide_model_kwargs",
    "guide_pooling",
    "guide_max_seq_length",
    "guide_prompts",
)


def _check_self_guide(m: ModelConfig) -> None:
    if m.guide != SELF:
        stray = _changed(m, ("self_guide", "self_guide_decay"))
        if stray:
            raise ConfigError(
                f"model.{stray[0]} applies only with model.guide: self (the guide is {m.guide!r})"
            )
        return
    stray = _changed(m, GUIDE_KEYS)
    if stray:
        raise ConfigError(
            f"model.{stray[0]} does not apply with model.guide: self (the student guides itself, "
            "with its own settings); remove it"
        )
    if m.self_guide not in SELF_GUIDES:
        raise ConfigError(
            f"model.self_guide = {m.self_guide!r} is not allowed; one of {', '.join(SELF_GUIDES)}"
        )
    if not 0 < m.self_guide_decay < 1:
        raise ConfigError(
            f"model.self_guide_decay = {m.self_guide_decay} is not allowed; must be in (0, 1)"
        )


def _validate_mine(mi: MineConfig, check: Callable[[bool, str, str, Any], None]) -> None:
    check(mi.k > 0, "mine.k", "must be > 0", mi.k)
    check(
        mi.threshold in THRESHOLDS,
        "mine.threshold",
        f"one of {', '.join(THRESHOLDS)}",
        mi.threshold,
    )
    check(0 < mi.perc <= 1, "mine.perc", "must be in (0, 1]", mi.perc)
    check(mi.margin >= 0, "mine.margin", "must be >= 0", mi.margin)
    check(mi.range_min >= 0, "mine.range_min", "must be >= 0", mi.range_min)
    check(
        mi.shortfall in SHORTFALL, "mine.shortfall", f"one of {', '.join(SHORTFALL)}", mi.shortfall
    )
    check(
        mi.backend in MINE_BACKENDS,
        "mine.backend",
        f"one of {', '.join(MINE_BACKENDS)}",
        mi.backend,
    )
    for key in ("batch_size", "corpus_chunk", "part_rows"):
        check(getattr(mi, key) > 0, f"mine.{key}", "must be > 0", getattr(mi, key))
