"""Typed run configuration: dataclasses, loadable from YAML and overridable with ``--set``.

Every key is validated: an unknown key or a value of the wrong type or range raises
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gist_ray.errors import ConfigError

# The loss is a layer below the config: its allowed values live with its code. The allowed
# values of the layers above (models, eval, mining) live here, and those layers import them.
from gist_ray.loss import BACKENDS, HARDNESS_MODES, STRATEGIES, validate_matryoshka

# Pooling overrides (model.pooling, model.guide_pooling): sentence-transformers' pooling modes;
# last_token is its "lasttoken".
POOLINGS = ("mean", "cls", "last_token", "max", "mean_sqrt_len_tokens", "weightedmean")
# The metrics gist-ray reports, selects the best step by (eval.metric) and plots.
EVAL_METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10", "map@100")
MINE_BACKENDS = ("auto", "torch", "faiss")  # gist-ray mine's exact search
THRESHOLDS = ("perc_pos", "margin", "none")  # which mined candidates are too close to the positive
SHORTFALL = ("drop", "fill")  # rows with fewer than k negatives left
SAMPLINGS = ("proportional", "round_robin")  # how several datasets share the steps
LORA_EXPORTS = ("merged", "adapter")
SELF_GUIDES = ("frozen", "ema")
SELF = "self"  # model.guide: self = the student guides itself (model.self_guide says how)


@dataclass
class LoraConfig:
    """LoRA adapters on the student through PEFT (``model.lora``); off while ``rank`` is 0."""

    rank: int = 0  # 0 = off: full fine-tuning
    alpha: float = 0.0  # scaling alpha / rank; 0 = 2 x rank
    dropout: float = 0.0
    # Module-name patterns (PEFT's target_modules: names or suffixes such as q_proj); [] or
    # ["auto"] = PEFT's defaults for the architecture (e.g. q_proj, v_proj for Llama/Qwen2)
    target_modules: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Student and guide are sentence-transformers models, used with their own module stack,
    prompts and max length; the keys below override that only where set."""

    student: str = "all-MiniLM-L6-v2"  # hub name, local path or built-in alias
    guide: str = "all-mpnet-base-v2"
    revision: str = ""  # hub branch, tag or commit of the student; "" = the default branch
    guide_revision: str = ""
    trust_remote_code: bool = False  # run the model repository's own code (only if you trust it)
    guide_trust_remote_code: bool = False
    # transformers from_pretrained kwargs, e.g. {dtype: bfloat16, attn_implementation: sdpa}
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    guide_model_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: str = ""  # "" = the model's own; else replaces its pooling mode (see POOLINGS)
    guide_pooling: str = ""
    # Training truncation in tokens; 0 = the student's own max length. 64 keeps the default CPU
    # run within 15 minutes. The exported model keeps its own max length regardless.
    max_seq_length: int = 64
    guide_max_seq_length: int = 0  # 0 = the training truncation, capped at the guide's own
    export_max_seq_length: int = 0  # 0 = the input model's own max length
    # Column (anchor/positive/negative/negative_k) -> prompt, one prompt for all columns, or
    # dataset name -> {column: prompt}. null = the model's own "query" prompt for anchors and its
    # "document" prompt for the others (where it defines them); {} = no prompts.
    prompts: str | dict[str, Any] | None = None
    guide_prompts: str | dict[str, Any] | None = None  # the same, for the guide
    lora: LoraConfig = field(default_factory=LoraConfig)
    # LoRA export: merged = a plain model with the adapter merged in; adapter = the adapter alone,
    # a folder sentence-transformers loads on top of the base model it names
    lora_export: str = "merged"
    # model.guide: self: the student at step 0 (frozen, cacheable) or an EMA of its weights
    self_guide: str = "frozen"
    self_guide_decay: float = 0.999  # ema: guide = decay * guide + (1 - decay) * student


@dataclass
class DataConfig:
    # One source (a file, a saved dataset folder, a hub name or "insuranceqa"), a list of them,
    # or a mapping name -> source; a source may be a mapping {source, columns, prompts,
    # max_examples} (see gist_ray.data.training_sets).
    train: str | list[Any] | dict[str, Any] = "insuranceqa"
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> column in the file
    max_examples: int = 1024  # per dataset; 0 = all rows
    sampling: str = "proportional"  # several datasets: proportional | round_robin
    no_duplicates: bool = True  # no text twice in one global batch (anchor, positive, negatives)
    guide_cache: bool = True  # embed every text with the guide once, before training
    # where guide caches live; "" = beside a local dataset, else under ray.storage_path, else
    # the gist-ray cache (node-local: set this on a multi-node cluster)
    guide_cache_dir: str = ""
    # float16 halves the cache (guide cosines to ~1e-3); float32 keeps the live guide's precision
    guide_cache_dtype: str = "float16"


@dataclass
class EvalConfig:
    source: str = "insuranceqa"  # "insuranceqa", a BEIR-style folder, or "" for none
    split: str = "test"
    max_queries: int = 150
    max_corpus: int = 1000
    every: int = 0  # steps between evaluations during training; 0 = only before and after
    metric: str = "ndcg@10"  # picks the best checkpoint
    # resources of the validation task that evaluates a checkpoint beside training on Ray
    # (eval.every): 0 CPUs keeps it schedulable on a cluster the workers fill; GPUs: 0 = CPU,
    # a fraction shares a GPU (e.g. 0.25 on a node with a GPU the workers do not hold)
    num_cpus: float = 0.0
    num_gpus: float = 0.0


@dataclass
class TrainConfig:
    batch_size: int = 32  # the global batch, split evenly over the workers
    mini_batch_size: int = 0  # gradient caching: encoder chunk per worker; 0 = off
    max_steps: int = 0  # 0 = run `epochs` full epochs
    epochs: int = 1
    lr: float = 3e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 50  # steps; a checkpoint is also written at the end
    log_every: int = 1
    max_failures: int = 0  # worker failures Ray Train recovers from (restart from checkpoint)
    # Recompute the transformer's activations in the backward pass: less memory, ~1/3 more compute
    gradient_checkpointing: bool = False
    guide_warmup_steps: int = 0  # plain InfoNCE (no guide mask) for the first N steps


@dataclass
class LossConfig:
    temperature: float = 0.01
    margin: float = 0.0
    margin_strategy: str = "absolute"
    contrast_anchors: bool = True
    contrast_positives: bool = True
    backend: str = "auto"
    # Matryoshka: the loss at each of these widths (strictly decreasing; empty = off), one guide
    # mask for all; weights: one per width (None = all 1)
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] | None = None
    hardness_alpha: float = 0.0  # hardness weighting after the guide mask; 0 = off
    hardness_mode: str = "hard_negatives"  # which negatives: see loss.HARDNESS_MODES


@dataclass
class RayConfig:
    num_workers: int = 2
    use_gpu: bool = False
    address: str | None = None  # None: start a local cluster (or use RAY_ADDRESS when set)
    num_cpus: int | None = None  # CPUs for a local cluster; None = all of this machine's
    storage_path: str | None = None  # Ray Train storage; None = <output_dir>/ray
    # true: storage_path is shared by every node although gist-ray cannot tell (a network file
    # system it does not recognise); a multi-node run otherwise refuses a node-local path
    shared_storage: bool = False
    resource_wait_s: int = 0  # autoscaling clusters: wait this long for the workers' GPUs/CPUs


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "gist-ray"
    run_name: str | None = None
    artifact_location: str | None = None  # None: ./mlruns next to the SQLite store
    register_as: str | None = None  # also register the final model under this name


@dataclass
class MineConfig:
    """``gist-ray mine``: hard negatives for every row of data.train, from the guide cache."""

    k: int = 5  # negatives per row, written as negative_1..negative_k
    threshold: str = "perc_pos"  # perc_pos (NV-Retriever's TopK-PercPos) | margin | none
    perc: float = 0.95  # perc_pos: keep candidates scoring below perc x the positive's score
    margin: float = 0.05  # margin: keep candidates scoring below the positive's score - margin
    range_min: int = 0  # skip the best range_min surviving candidates (possible positives)
    shortfall: str = "drop"  # rows with fewer than k negatives: drop | fill (nearest above)
    backend: str = "auto"  # auto (faiss when installed) | torch | faiss; both are exact
    batch_size: int = 1024  # anchors searched at a time
    corpus_chunk: int = 65536  # torch: corpus rows scored at a time (memory bound)
    part_rows: int = 8192  # rows per resumable part
    output: str = ""  # "" = <output_dir>/<dataset>-mined.<the input's format or parquet>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    output_dir: str = "gist-ray-output"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value``, e.g. for logging as MLflow params."""
        return _flat(self)


def _flat(section: Any, prefix: str = "") -> dict[str, Any]:
    """A dataclass's fields as dotted keys; nested sections (model.lora) are expanded, user
    mappings (prompts, model_kwargs, columns) kept whole."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = copy.deepcopy(value)  # callers cannot alter the config
    return out


def _kind(annotation: Any) -> str:
    origin = typing.get_origin(annotation) or annotation
    return {str: "a string", list: "a list", dict: "a mapping"}.get(origin, str(annotation))


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
    columns = _coerce(f"{key}.columns", value.get("columns", d.columns), dict[str, str])
    prompts = value.get("prompts")
    if prompts is not None:
        prompts = _coerce(f"{key}.prompts", prompts, str | dict[str, str])
    max_examples = _coerce(f"{key}.max_examples", value.get("max_examples", d.max_examples), int)
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


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type, converting only where it is lossless."""
    hint = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if hint in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:  # e.g. str | list | dict: the first arm the value fits
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                if len(arms) == 1:
                    raise
        kinds = " or ".join(_kind(a) for a in arms)
        raise ConfigError(f"{key}: expected {kinds}, got {value!r}")
    if hint is list or annotation is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args:  # list[int], list[float]: each element checked, named by its index
            return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return list(value)
    if hint is dict:
        names_only = args == (str, str)
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and (isinstance(v, str) or not names_only) for k, v in value.items()
        ):
            what = "names to names" if names_only else "names to values"
            raise ConfigError(f"{key}: expected a mapping of {what}, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


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
    setattr(obj, head, _coerce(name, value, hints[head]))


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


def validate(cfg: Config) -> Config:
    """Range checks that no type can express."""

    def check(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{key} = {value!r} is not allowed; {allowed}")

    m, t, lo, r = cfg.model, cfg.train, cfg.loss, cfg.ray
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
