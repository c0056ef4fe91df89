"""Student and guide are sentence-transformers models: loaded with ``SentenceTransformer`` and run
through their own module stack (pooling, Dense, Normalize, prompts, whatever they have), saved
with sentence-transformers' own ``save``, so the model that comes out is the kind that went in.

:class:`Encoder` adds what training needs on top: a training truncation that is not the model's
max length (the exported model keeps its own), and embedding with a graph."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gist_ray.core import fileio
from gist_ray.models import loading
from gist_ray.models.batching import batching_for, token_batches
from gist_ray.models.loading import pooling_of, quiet_hf
from gist_ray.models.spec import ModelSpec, load_kwargs

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


EXPORT_DIR = "model"  # <output_dir>/model: the exported model


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

    def token_lengths(self, texts: list[str], prompt: str | None = None) -> list[int]:
        """Each text's token count as :meth:`features` gives it (prompt and special tokens
        included, at the training truncation): what batches by token length sort on."""
        prompt = prompt or ""
        tok = self.model.tokenizer(
            [prompt + t for t in texts],
            truncation=True,
            max_length=self.max_seq_length,
            add_special_tokens=True,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return [len(ids) for ids in tok["input_ids"]]

    @torch.no_grad()
    def encode_batch(self, texts: list[str], prompt: str | None = None) -> torch.Tensor:
        """One forward of inference at the training truncation; on CUDA under bf16 autocast
        (:mod:`gist_ray.models.batching`). float32 CPU."""
        dtype = batching_for(self.device).autocast
        with self.eval_mode(), _autocast(self.device, dtype):
            return self.embed(texts, prompt).float().cpu()

    @torch.no_grad()
    def encode(
        self, texts: list[str], prompt: str | None = None, batch_size: int = 64
    ) -> torch.Tensor:
        """Inference at the training truncation (eval mode restored afterwards); float32 CPU.
        On CPU in input order, ``batch_size`` at a time; on CUDA sorted by token length, in
        batches by token budget, under bf16 autocast (rows returned in input order)."""
        if not texts:
            return torch.empty(0, self.dim)
        batching = batching_for(self.device)
        if batching.max_tokens is None:
            batches = [list(range(i, min(i + batch_size, len(texts))))
                       for i in range(0, len(texts), batch_size)]  # fmt: skip
        else:
            lengths = self.token_lengths(texts, prompt)
            batches = token_batches(lengths, batching.max_texts, batching.max_tokens)
        return _in_order([(idx, self.encode_batch([texts[i] for i in idx], prompt))
                          for idx in batches])  # fmt: skip

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
        max length, ``encode_query`` / ``encode_document`` with its own prompts; float32 CPU.
        On CUDA in batches by token budget under bf16 autocast, as :meth:`encode`."""
        batching = batching_for(self.device)

        def run(method):
            def call(texts: list[str], size: int) -> torch.Tensor:
                out = method(texts, batch_size=size, convert_to_tensor=True,
                             show_progress_bar=False)  # fmt: skip
                return out.float().cpu()

            def encode(texts: list[str]) -> torch.Tensor:
                texts = list(texts)
                with self.eval_mode(), torch.no_grad():
                    if batching.max_tokens is None or not texts:
                        return call(texts, batch_size)
                    # CUDA: by token budget (lengths at the model's own max length), bf16
                    most = self.model.max_seq_length
                    ids = self.model.tokenizer(texts, truncation=bool(most), max_length=most)
                    lengths = [len(x) for x in ids["input_ids"]]
                    batches = token_batches(lengths, batching.max_texts, batching.max_tokens)
                    with _autocast(self.device, batching.autocast):
                        parts = [(i, call([texts[j] for j in i], len(i))) for i in batches]
                    return _in_order(parts)

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
                model_kwargs=load_kwargs(self.spec) or None,
            )
        self.model.load_state_dict(saved.state_dict())

    def save(self, path: str | Path) -> Path:
        """sentence-transformers' own save (modules, tokenizer, prompts, similarity function,
        max length), atomically: a crash never leaves a folder that looks complete."""
        with fileio.atomic_dir(path) as tmp, quiet_hf():
            self.model.save(str(tmp), create_model_card=False)
        return Path(path)


def _in_order(parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Rows of batches taken in another order, put back at their indices."""
    rows = torch.cat([emb for _, emb in parts])
    out = torch.empty_like(rows)
    out[torch.tensor([i for idx, _ in parts for i in idx])] = rows
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_encoder(
    spec: ModelSpec | str, device: str | torch.device = "cpu", *, frozen: bool = False
) -> Encoder:
    """Load an :class:`Encoder`; ``frozen`` for the guide (eval mode, no grad). A bare name
    loads the model as it is (its own pooling, prompts and length)."""
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    enc = Encoder(loading.load_model(spec, device), spec)
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
    target = Path(output_dir) / EXPORT_DIR
    with fileio.atomic_dir(target) as tmp:
        if model is None:
            shutil.copytree(checkpoint_model, tmp, dirs_exist_ok=True)
        else:
            with quiet_hf():
                model.save(str(tmp), create_model_card=False)
        if card:
            (tmp / "README.md").write_text(card, encoding="utf-8")
    return target
