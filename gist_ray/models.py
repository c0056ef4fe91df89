"""Encoders: any transformers model + pooling + L2 normalisation, saved in sentence-transformers
format so ``SentenceTransformer(path)`` and ``AutoModel.from_pretrained(path)`` both load it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from gist_ray.config import POOLINGS
from gist_ray.errors import ModelError

# sentence-transformers' Pooling config flag for each of our poolings.
_ST_POOLING_FLAG = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last_token": "pooling_mode_lasttoken",
}


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

    def save(self, path: str | Path) -> Path:
        """Write a sentence-transformers model folder atomically (temp name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
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
            _write_json(
                tmp / "modules.json",
                [
                    {
                        "idx": 0,
                        "name": "0",
                        "path": "",
                        "type": "sentence_transformers.models.Transformer",
                    },
                    {
                        "idx": 1,
                        "name": "1",
                        "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling",
                    },
                    {
                        "idx": 2,
                        "name": "2",
                        "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize",
                    },
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
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


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
