"""Student and guide are sentence-transformers models: loaded with ``SentenceTransformer`` and run
through their own module stack (pooling, Dense, Normalize, prompts, whatever they have), saved
with sentence-transformers' own ``save``, so the model that comes out is the kind that went in.

:class:`Encoder` adds what training needs on top: a training truncation that is not the model's
max length (the exported model keeps its own), and embedding with a graph.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gist_ray.config import SELF
from gist_ray.core import fileio
from gist_ray.core.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from gist_ray.config import Config


_ST_MODE = {"last_token": "lasttoken"}
MODEL_DIR = "model"  # <output_dir>/model: the exported model
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


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """No per-model "Loading weights" / "Writing model shards" bars while loading or saving
    (restored afterwards: the caller may be a library)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _model_kwargs(spec: ModelSpec) -> dict[str, Any]:
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


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> SentenceTransformer:
    """A SentenceTransformer for ``spec`` (a plain transformers checkpoint gets
    sentence-transformers' defaults: mean pooling); bad input is a one-line ModelError."""
    from gist_ray.core.assets import resolve_model_path
    from gist_ray.models.lora import prepare_load

    path = resolve_model_path(spec.name)
    prepare_load(path)
    try:
        with quiet_hf():
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(
                path,
                device=str(device),
                trust_remote_code=spec.trust_remote_code,
                revision=spec.revision or None,
                model_kwargs=_model_kwargs(spec) or None,
            )
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - loaders raise many types; the user needs one line
        raise _load_error(spec, path, e) from e
    if spec.pooling:
        set_pooling(model, spec.pooling, f"{spec.prefix}pooling")
    return model


def _load_error(spec: ModelSpec, path: str, e: Exception) -> ModelError:
    text = str(e).strip()
    first = text.splitlines()[0][:200] if text else type(e).__name__
    where = f"{spec.key} = {spec.name!r}"
    bad = _unimportable_module(Path(path))
    if bad is not None:
        ref, why = bad
        return ModelError(
            f"{Path(path) / 'modules.json'}: module {ref!r} cannot be imported ({why}); install "
            f"the package that defines it, or fix {spec.key}"
        )
    if "trust_remote_code" in text:
        return ModelError(
            f"{where} runs code from its repository ({first.split('. ')[0]}); set "
            f"{spec.prefix}trust_remote_code=true if you trust it"
        )
    what = "a local folder" if Path(path).exists() else "a local folder or a cached hub model"
    return ModelError(
        f"{where} cannot be loaded: not {what} that sentence-transformers can read offline "
        f"({type(e).__name__}: {first})"
    )


def _unimportable_module(folder: Path) -> tuple[str, str] | None:
    """The first ``type`` in ``folder/modules.json`` whose class neither imports from the
    installed packages nor ships as a file in the model folder (custom code, which loads with
    trust_remote_code), with why: the import's own error, which is often a dependency of the
    module rather than the module itself."""
    try:
        entries = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for entry in entries if isinstance(entries, list) else []:
        ref = str(entry.get("type", ""))
        module, _, cls = ref.rpartition(".")
        sub = folder / str(entry.get("path", ""))
        if any((d / f"{module.split('.')[-1]}.py").is_file() for d in (folder, sub)):
            continue
        try:
            if hasattr(importlib.import_module(module), cls):
                continue
            why = f"{module} has no {cls}"
        except Exception as e:  # noqa: BLE001 - any failure to import is the answer
            text = str(e).strip()
            why = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}".rstrip(": ")
        return ref, why
    return None


def set_pooling(model: SentenceTransformer, pooling: str, key: str) -> None:
    """Replace the pooling mode of the model's Pooling module (an explicit override)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    found = [m for m in model if isinstance(m, Pooling)]
    if len(found) != 1:
        raise ModelError(
            f"{key} = {pooling!r}: the model has {len(found)} Pooling modules, so there is no "
            f'pooling to replace; set {key}="" to use the model as it is'
        )
    module = found[0]
    if not isinstance(module.pooling_mode, str):
        raise ModelError(
            f"{key} = {pooling!r}: the model concatenates several poolings "
            f"({', '.join(module.pooling_mode)}); replacing them would change its dimension"
        )
    module.pooling_mode = _ST_MODE.get(pooling, pooling)


def pooling_of(model: SentenceTransformer) -> str:
    """The model's pooling mode(s) in words, e.g. ``mean`` (``-`` when it has no Pooling)."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    modes = [m.pooling_mode for m in model if isinstance(m, Pooling)]
    return ",".join(m if isinstance(m, str) else "+".join(m) for m in modes) or "-"


class Encoder(nn.Module):
    """A SentenceTransformer and the settings gist-ray trains it at.

    The wrapped model keeps its own (or the export) max length at all times; the training
    truncation applies only inside :meth:`embed` / :meth:`encode`, so saving, evaluating and
    exporting see the model as the user will."""

    def __init__(self, model: SentenceTransformer, spec: ModelSpec | None = None) -> None:
        super().__init__()
        spec = spec or ModelSpec(name="")
        self.model, self.spec = model, spec
        self.own_max_seq_length = model.max_seq_length
        self.max_seq_length = spec.max_seq_length or self.own_max_seq_length
        if spec.cap_at_own and self.own_max_seq_length:
            self.max_seq_length = min(self.max_seq_length, self.own_max_seq_length)
        if spec.export_max_seq_length:
            model.max_seq_length = spec.export_max_seq_length

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @contextlib.contextmanager
    def _truncation(self) -> Iterator[None]:
        saved = self.model.max_seq_length
        if saved is None or saved == self.max_seq_length:
            yield
            return
        self.model.max_seq_length = self.max_seq_length
        try:
            yield
        finally:
            self.model.max_seq_length = saved

    def features(self, texts: list[str], prompt: str | None = None) -> dict[str, Any]:
        """The model's own preprocessing (tokenizer, prompt and the prompt length its pooling
        may exclude) at the training truncation, on the model's device."""
        from sentence_transformers.util import batch_to_device

        with self._truncation():
            features = self.model.preprocess(list(texts), prompt=prompt or None)
        return batch_to_device(features, self.device)

    def forward(self, features: dict[str, Any]) -> torch.Tensor:
        return self.model(features)["sentence_embedding"]

    def embed(self, texts: list[str], prompt: str | None = None) -> torch.Tensor:
        """Embeddings ``[n, d]`` through the whole module stack, with a graph."""
        return self(self.features(texts, prompt))

    @torch.no_grad()
    def encode(
        self, texts: list[str], prompt: str | None = None, batch_size: int = 64
    ) -> torch.Tensor:
        """Inference at the training truncation (eval mode restored afterwards); float32 CPU."""
        with self.eval_mode():
            chunks = [
                self.embed(texts[i : i + batch_size], prompt).float().cpu()
                for i in range(0, len(texts), batch_size)
            ]
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def retrieval_encoders(self, batch_size: int = 64):
        """(encode queries, encode documents) the way a user of the saved model would: its own
        max length, ``encode_query`` / ``encode_document`` with its own prompts; float32 CPU."""

        def run(method):
            def encode(texts: list[str]) -> torch.Tensor:
                with self.eval_mode(), torch.no_grad():
                    out = method(
                        list(texts),
                        batch_size=batch_size,
                        convert_to_tensor=True,
                        show_progress_bar=False,
                    )
                return out.float().cpu()

            return encode

        return run(self.model.encode_query), run(self.model.encode_document)

    def load_weights(self, folder: str | Path) -> None:
        """Load the weights of a folder :meth:`save` wrote (e.g. a checkpoint's); with a LoRA
        adapter, only the adapter's."""
        from sentence_transformers import SentenceTransformer

        from gist_ray.models import lora

        if lora.has_adapter(self.model) and lora.is_adapter_folder(folder):
            lora.load_adapter_weights(self.model, folder)
            return

        with quiet_hf():
            saved = SentenceTransformer(
                str(folder),
                device="cpu",
                trust_remote_code=self.spec.trust_remote_code,
                model_kwargs=_model_kwargs(self.spec) or None,
            )
        self.model.load_state_dict(saved.state_dict())

    def save(self, path: str | Path) -> Path:
        """sentence-transformers' own save (modules, tokenizer, prompts, similarity function,
        max length), atomically: a crash never leaves a folder that looks complete."""
        with fileio.atomic_dir(path) as tmp, quiet_hf():
            self.model.save(str(tmp), create_model_card=False)
        return Path(path)


def load_encoder(
    spec: ModelSpec | str, device: str | torch.device = "cpu", *, frozen: bool = False
) -> Encoder:
    """Load an :class:`Encoder`; ``frozen`` for the guide (eval mode, no grad). A bare name
    loads the model as it is (its own pooling, prompts and length)."""
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    enc = Encoder(load_model(spec, device), spec)
    if frozen:
        enc.eval()
        enc.requires_grad_(False)
    return enc


def describe(enc: Encoder) -> dict[str, Any]:
    """What a model is, for logs and reports: modules, pooling, lengths, prompts."""
    return {
        "modules": [type(m).__name__ for m in enc.model],
        "pooling": pooling_of(enc.model),
        "max_seq_length": enc.model.max_seq_length,
        "train_max_seq_length": enc.max_seq_length,
        "dim": enc.dim,
        "prompts": {k: v for k, v in (enc.model.prompts or {}).items() if v},
        "similarity": enc.model.similarity_fn_name,
    }


def export_model(
    checkpoint_model: str | Path,
    output_dir: str | Path,
    card: str = "",
    model: SentenceTransformer | None = None,
) -> Path:
    """Copy a checkpoint's model folder to ``<output_dir>/model`` with the model card
    ``README.md`` (atomically); return it. ``model``: save this model instead (e.g. the
    checkpoint's with its LoRA adapter merged in)."""
    target = Path(output_dir) / MODEL_DIR
    with fileio.atomic_dir(target) as tmp:
        if model is None:
            shutil.copytree(checkpoint_model, tmp, dirs_exist_ok=True)
        else:
            with quiet_hf():
                model.save(str(tmp), create_model_card=False)
        if card:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return target
