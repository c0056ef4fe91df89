"""The run configuration's schema: typed dataclasses, one per section, every allowed value that
is not the loss's (the loss, a layer below, keeps its own), and the coercion of a value to its
field's type."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from gist_ray.core.errors import ConfigError

# The loss is a layer below the config: its allowed values live with its code. The allowed
# values of the layers above (models, eval, mining) live here, and those layers import them.

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
    # max_examples} (see gist_ray.data.training.training_sets).
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
    # ... and once this many minutes passed since the last one (bounds the work an interrupt
    # loses; 0 = steps only)
    checkpoint_minutes: float = 10.0
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
    backend: str = "auto"  # auto: triton on CUDA (checked first; chunked if it fails), else chunked
    # the student's rows are cast to it before the gather: auto = bfloat16 on CUDA, float32 on CPU
    compute_dtype: str = "auto"
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


def kind_of(annotation: Any) -> str:
    origin = typing.get_origin(annotation) or annotation
    return {str: "a string", list: "a list", dict: "a mapping"}.get(origin, str(annotation))


def coerce(key: str, value: Any, annotation: Any) -> Any:
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
                return coerce(key, value, arm)
            except ConfigError:
                if len(arms) == 1:
                    raise
        kinds = " or ".join(kind_of(a) for a in arms)
        raise ConfigError(f"{key}: expected {kinds}, got {value!r}")
    if hint is list or annotation is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if args:  # list[int], list[float]: each element checked, named by its index
            return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
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


def ray_storage_path(cfg: Config) -> str:
    """Where Ray Train keeps the run's checkpoints: ``ray.storage_path`` (a local path made
    absolute, a URI as it is), else ``<output_dir>/ray``. The guide cache's default location
    follows it too, so the rule lives here, below both."""
    from gist_ray.core import storage

    return storage.absolute(cfg.ray.storage_path or storage.join(cfg.output_dir, "ray"))
