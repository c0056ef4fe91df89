"""LoRA adapters on the student (``model.lora``) through sentence-transformers' own PEFT
integration (``SentenceTransformer.add_adapter``), so a checkpoint's model folder is the
adapter format sentence-transformers saves and loads: ``adapter_config.json`` naming the base
model, ``adapter_model.safetensors`` with the adapter weights, and the model's own modules.

Also here: gradient checkpointing (``train.gradient_checkpointing``) and the merged export.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gist_ray.core.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from gist_ray.config import Config

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # transformers saves adapter keys in PEFT's layout
INSTALL = "pip install 'gist-ray[lora]' (or pip install -U peft)"


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def require_peft(key: str = "model.lora") -> None:
    """PEFT installed at the version transformers' PEFT integration asks for; else a one-line
    ConfigError saying how to install it."""
    try:
        version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{key} needs the peft package, not installed: {INSTALL}") from None
    from packaging.version import Version
    from transformers.integrations import peft as hf_peft

    required = getattr(hf_peft, "MIN_PEFT_VERSION", "0")
    if Version(version) < Version(required):
        raise ConfigError(
            f"{key} needs peft >= {required} (transformers' PEFT integration), found {version}: "
            f"{INSTALL}"
        )


def add_lora(model: SentenceTransformer, cfg: Config) -> None:
    """Add a fresh LoRA adapter to the student; only its weights train afterwards. The adapter
    weights stay float32 when the base weights are 16-bit (as PEFT's own models keep them)."""
    require_peft()
    from peft import LoraConfig

    lora = cfg.model.lora
    if not model.has_peft_compatible_model():
        raise ModelError(
            f"model.lora: {cfg.model.student!r} has no transformers module to put adapters on"
        )
    hf = model.transformers_model
    targets = _target_modules(hf, list(lora.target_modules))
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or 2 * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
    )
    try:
        # The same adapter init on every worker (and in every run of this seed), without
        # moving the workers' own dropout streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            model.add_adapter(config)
    except ValueError as e:
        if "not found in the base model" not in str(e) and "not find any" not in str(e):
            raise
        raise ConfigError(
            f"model.lora.target_modules = {targets} matches no module of {cfg.model.student!r}; "
            f"its linear layers are named {', '.join(linear_names(hf)[:8])}"
        ) from e
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "LoRA rank %d on %s: %s of %s parameters train (%.2f%%)",
        lora.rank,
        ", ".join(sorted(targets)) if isinstance(targets, list) else targets,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )


def _target_modules(hf: torch.nn.Module, names: list[str]) -> list[str]:
    """The config's patterns, or PEFT's defaults for the architecture ([] or ["auto"])."""
    if names and names != ["auto"]:
        return names
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    model_type = getattr(getattr(hf, "config", None), "model_type", "")
    if model_type not in known:
        raise ConfigError(
            f"model.lora.target_modules: PEFT has no default for model type {model_type!r}; name "
            f"them, e.g. [{', '.join(linear_names(hf)[:4])}]"
        )
    return list(known[model_type])


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules matches)."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear))


def has_adapter(model: SentenceTransformer) -> bool:
    hf = getattr(model, "transformers_model", None)
    return bool(getattr(hf, "_hf_peft_config_loaded", False))


def load_adapter_weights(model: SentenceTransformer, folder: str | Path) -> None:
    """Load the adapter weights of a folder the student saved (a checkpoint's) into its own
    adapter: the base weights are frozen, so they are not read again."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
    result = set_peft_model_state_dict(model.transformers_model, state, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ModelError(f"{folder}: the adapter lacks {missing[0]} (another LoRA config?)")


def merge_adapter(model: SentenceTransformer) -> None:
    """Merge the adapter into the base weights and remove it, in place: ``model`` becomes a
    plain sentence-transformers model of the base architecture (its modules, pooling, prompts
    and max length unchanged)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    hf = model.transformers_model
    for name, module in list(hf.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(hf.get_submodule(parent) if parent else hf, child, module.get_base_layer())
    hf._hf_peft_config_loaded = False
    if hasattr(hf, "peft_config"):
        del hf.peft_config
    # Loading the adapter added key renamings (PEFT's "base_model.model." prefix, "lora_*"
    # names) that saving would revert: the merged weights are saved under the base's names.
    conversions = getattr(hf, "_weight_conversions", None)
    if conversions:
        hf._weight_conversions = [c for c in conversions if not _adapter_renaming(c)]


def _adapter_renaming(conversion: object) -> bool:
    patterns = getattr(conversion, "source_patterns", None) or []
    return any(PEFT_PREFIX in str(p) or "lora_" in str(p) for p in patterns)


def enable_gradient_checkpointing(model: SentenceTransformer) -> None:
    """Recompute the transformer's activations in the backward pass (non-reentrant, so frozen
    inputs need no gradient; the RNG state is restored for the recomputation, so dropout draws
    the same masks and gradients are exact)."""
    hf = getattr(model, "transformers_model", None)
    if hf is None or not getattr(hf, "supports_gradient_checkpointing", False):
        raise ModelError(
            "train.gradient_checkpointing: the student's transformer "
            f"({type(hf).__name__}) does not support gradient checkpointing; set it to false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5's name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_load(path: str | Path) -> None:
    """Before loading a model folder: an adapter folder needs PEFT."""
    if is_adapter_folder(path):
        require_peft(f"{path} (a LoRA adapter)")


def prepare_student(model: SentenceTransformer, cfg: Config) -> None:
    """What a large student needs before training: LoRA adapters, gradient checkpointing."""
    if cfg.model.lora.rank:
        add_lora(model, cfg)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
