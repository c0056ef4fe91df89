"""Loading a sentence-transformers model offline, with bad input as one line: a folder that does
not exist, a module that cannot be imported (and why), remote code without trust; and the
pooling override."""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gist_ray.core.errors import ConfigError, ModelError
from gist_ray.models.spec import ModelSpec, load_kwargs

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


_ST_MODE = {"last_token": "lasttoken"}


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
                model_kwargs=load_kwargs(spec) or None,
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
