"""Which model to load and how: :class:`ModelSpec` (name, revision, pooling, lengths, remote code,
model kwargs) for the student, the guide (or the student guiding itself) and a model as a user
loads it; and the guide's settings that fix its embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gist_ray.config import SELF
from gist_ray.core.errors import ConfigError

if TYPE_CHECKING:
    from gist_ray.config import Config

_DTYPE_KEYS = ("dtype", "torch_dtype")


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how: one of the config's two models (student or guide)."""

    name: str  # hub name, local folder or built-in alias
    key: str = "model.student"  # the config key, for error messages
    revision: str = ""
    trust_remote_code: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: str = ""  # "" = the model's own
    max_seq_length: int = 0  # training truncation; 0 = the model's own
    export_max_seq_length: int = 0  # the saved model's max length; 0 = its own
    cap_at_own: bool = False  # truncate at most at the model's own max length

    @classmethod
    def student(cls, cfg: Config) -> ModelSpec:
        return cls._of(cfg, "student", "")

    @classmethod
    def guide(cls, cfg: Config) -> ModelSpec:
        return cls._of(cfg, "guide", "guide_")

    @classmethod
    def _of(cls, cfg: Config, which: str, prefix: str) -> ModelSpec:
        m = cfg.model
        is_guide = which == "guide"
        return cls(
            getattr(m, which),
            f"model.{which}",
            getattr(m, f"{prefix}revision"),
            getattr(m, f"{prefix}trust_remote_code"),
            dict(getattr(m, f"{prefix}model_kwargs")),
            getattr(m, f"{prefix}pooling"),
            (m.guide_max_seq_length or m.max_seq_length) if is_guide else m.max_seq_length,
            0 if is_guide else m.export_max_seq_length,
            # The guide reads the student's truncation, at most its own length, as
            # sentence-transformers' GISTEmbedLoss does.
            cap_at_own=is_guide and not m.guide_max_seq_length,
        )

    @property
    def prefix(self) -> str:
        """``model.`` or ``model.guide_``: where this model's other keys live."""
        return "model.guide_" if self.key == "model.guide" else "model."


def guide_spec(cfg: Config) -> ModelSpec:
    """The guide to load: ``model.guide``, or with ``model.guide: self`` the student as the config
    names it (the frozen self-guide is the student at step 0; LoRA adapters start as identity)."""
    return ModelSpec.student(cfg) if cfg.model.guide == SELF else ModelSpec.guide(cfg)


def user_spec(cfg: Config, model: str, revision: str = "") -> ModelSpec:
    """How a user loads ``model``: as it is (its own pooling, length, prompts), with the
    student's load settings (remote code, dtype, attention implementation)."""
    m = cfg.model
    return ModelSpec(model, "model.student", revision, m.trust_remote_code, dict(m.model_kwargs))


def guide_settings(cfg: Config) -> dict[str, object]:
    """The guide's settings that, with its files and the prompts, fix its embeddings."""
    spec = guide_spec(cfg)
    settings: dict[str, object] = {
        "revision": spec.revision,
        "model_kwargs": spec.model_kwargs,
        "pooling": spec.pooling or "own",
        "max_seq_length": spec.max_seq_length or "own",
    }
    if cfg.model.guide == SELF:  # the student at step 0
        settings["self_guide"] = cfg.model.self_guide
    return settings


def load_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The config's model kwargs, with dtype names (``bfloat16``) turned into torch dtypes."""
    kwargs = dict(spec.model_kwargs)
    for k in _DTYPE_KEYS:
        value = kwargs.get(k)
        if isinstance(value, str) and value != "auto":
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigError(
                    f"{spec.prefix}model_kwargs.{k} = {value!r} is not a torch dtype; "
                    "e.g. float32, bfloat16, float16 or auto"
                )
            kwargs[k] = dtype
    return kwargs
