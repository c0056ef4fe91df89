"""Encoders: any transformers model + pooling + L2 normalisation, saved in sentence-transformers
format so ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)`` both load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gist_ray import fileio
from gist_ray.errors import ModelError

POOLINGS = ("mean", "cls", "last_token")
# sentence-transformers' Pooling config flag for each of our poolings.
_ST_POOLING_FLAG = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last_token": "pooling_mode_lasttoken",
}
MODEL_DIR = "model"  # <output_dir>/model: the exported model


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states ``[n, t, h]`` to ``[n, h]`` under the attention mask ``[n, t]``."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last_token":
        # Index of the last attended token: correct for left and right padding alike.
        idx = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ModelError(f"model.pooling: unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")


class Encoder(nn.Module):
    """A transformers encoder that maps texts to L2-normalised embeddings."""

    def __init__(self, model: nn.Module, tokenizer, pooling: str, max_seq_length: int) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.max_seq_length = pooling, max_seq_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**features)
        return F.normalize(
            pool(out.last_hidden_state, features["attention_mask"], self.pooling), dim=-1
        )

    def embed(self, texts: list[str]) -> torch.Tensor:
        return self(self.tokenize(texts))

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Inference in batches (eval mode restored afterwards); float32 on CPU."""
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self.embed(texts[i : i + batch_size]).float().cpu()
                for i in range(0, len(texts), batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.dim)

    def load_weights(self, folder: str | Path) -> None:
        """Load the encoder weights of a folder :meth:`save` wrote (e.g. a checkpoint's)."""
        from transformers import AutoModel

        self.model.load_state_dict(AutoModel.from_pretrained(folder).state_dict())

    def save(self, path: str | Path) -> Path:
        """Write a sentence-transformers model folder atomically (temp name, then rename)."""
        with fileio.atomic_dir(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "1_Pooling").mkdir()
            pooling_cfg = {
                "word_embedding_dimension": self.dim,
                **{flag: False for flag in _ST_POOLING_FLAG.values()},
                _ST_POOLING_FLAG[self.pooling]: True,
            }
            _write_json(tmp / "1_Pooling" / "config.json", pooling_cfg)
            (tmp / "2_Normalize").mkdir()
            modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
            _write_json(
                tmp / "modules.json",
                [
                    {
                        "idx": i,
                        "name": str(i),
                        "path": sub,
                        "type": f"sentence_transformers.models.{t}",
                    }
                    for i, (sub, t) in enumerate(modules)
                ],
            )
            _write_json(
                tmp / "sentence_bert_config.json",
                {"max_seq_length": self.max_seq_length, "do_lower_case": False},
            )
            _write_json(
                tmp / "config_sentence_transformers.json",
                {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None},
            )
        return Path(path)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2))


def load_encoder(
    name_or_path: str,
    pooling: str = "mean",
    max_seq_length: int = 128,
    *,
    frozen: bool = False,
    key: str = "model.student",
) -> Encoder:
    """Load a hub name, local folder or built-in alias; ``frozen`` for the guide (eval, no grad).

    ``key`` names the config key in error messages."""
    from transformers import AutoModel, AutoTokenizer

    from gist_ray.assets import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "a local folder" if Path(path).exists() else "a local folder or a cached hub model"
        raise ModelError(
            f"{key} = {name_or_path!r} cannot be loaded: not {where} that transformers can "
            f"read offline ({str(e).splitlines()[0][:160]})"
        ) from e
    enc = Encoder(model, tokenizer, pooling, max_seq_length)
    if frozen:
        enc.eval()
        enc.requires_grad_(False)
    return enc


_POOLING_OF_FLAG = {flag: name for name, flag in _ST_POOLING_FLAG.items()}


def st_settings(
    folder: str | Path, default: tuple[Any, Any] = (None, None)
) -> tuple[str | None, int | None]:
    """(pooling, max_seq_length) a sentence-transformers folder declares; ``default`` for each
    one it does not (a hub name, a plain transformers folder, a pooling gist-ray lacks)."""
    folder = Path(folder)
    pooling, max_len = default
    try:
        flags = json.loads((folder / "1_Pooling" / "config.json").read_text())
        pooling = next(
            (name for flag, name in _POOLING_OF_FLAG.items() if flags.get(flag)), pooling
        )
    except (OSError, ValueError, AttributeError):
        pass
    try:
        max_len = int(
            json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return pooling, max_len


def export_model(checkpoint_model: str | Path, output_dir: str | Path) -> Path:
    """Copy a checkpoint's model folder to ``<output_dir>/model`` (atomically); return it."""
    return fileio.copy_dir(checkpoint_model, Path(output_dir) / MODEL_DIR)
