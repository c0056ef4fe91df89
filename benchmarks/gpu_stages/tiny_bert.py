"""A tiny random BERT as a sentence-transformers model (Transformer → mean Pooling → Normalize),
built offline in a few seconds, and what the training step hands the loss from it.

The training step (gist_ray.train.step.training_step) embeds under
``torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")`` and calls
the loss outside it; this module does the same. That module itself cannot be imported here: it
imports gist_ray.data.training, which imports ``datasets`` (absent on the GPU machine).
"""

from __future__ import annotations

import random
import tempfile
from functools import partial
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpu_stages.common import dtype_name

WORDS = (
    "what is the cost of car home life health insurance policy coverage premium claim does my "
    "plan pay for a doctor visit when i move to another state can you cancel the annuity "
    "retirement disability medicare term whole renters deductible"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )  # fmt: skip
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64,
    )  # fmt: skip


def build(folder: Path, device: str, hidden: int = 64, seed: int = 0):
    """A SentenceTransformer: random 2-layer BERT (no dropout, so two ways of running one step
    can be compared), mean pooling, Normalize; its last modules are LayerNorm → Pooling →
    Normalize, like most embedding models."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    tok = _tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = SentenceTransformer(str(folder), device=device)  # Transformer + mean Pooling
    model.append(_normalize())
    return model


def _normalize():
    try:  # sentence-transformers >= 6 moved its modules
        from sentence_transformers.sentence_transformer.modules import Normalize
    except ImportError:
        from sentence_transformers.models import Normalize
    return Normalize()


def autocast_of(device: torch.device):
    """The training step's autocast (gist_ray.train.step.training_step)."""
    return partial(torch.autocast, device.type, dtype=torch.bfloat16,
                   enabled=device.type == "cuda")  # fmt: skip


class OpDtypes(TorchDispatchMode):
    """The dtype of the student rows each call of the loss's custom op receives (what the
    kernel, or chunked, computes in)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("gist_ray.gist_rows.") and args and args[0]:
            self.seen.append(dtype_name(args[0][0].dtype))
        return func(*args, **(kwargs or {}))


class Probe:
    """While inside: the dtype of the embeddings ``loss_fn`` is called with (a forward pre-hook)
    and the dtype its custom op computes in."""

    def __init__(self, loss_fn: torch.nn.Module) -> None:
        self.loss_fn, self.ops, self.loss_input = loss_fn, OpDtypes(), None

    def __enter__(self) -> Probe:
        self.handle = self.loss_fn.register_forward_pre_hook(self._hook)
        self.ops.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ops.__exit__(*exc)
        self.handle.remove()

    def _hook(self, _module, args) -> None:
        self.loss_input = dtype_name(args[0][0].dtype)

    @property
    def kernel_input(self) -> str | None:
        return self.ops.seen[0] if self.ops.seen else None


def dtype_probe(dev: str, out: Path, backend: str = "auto") -> dict:
    """Embed three columns of 16 texts with the tiny BERT under the training step's autocast,
    call ``GistLoss(backend=backend)`` on them with a 16-bit guide (as the guide cache stores
    it), backward: which dtype the model returns, the loss receives and its kernel computes in.
    A measurement, not a pass/fail: the target (bf16 at the kernel on CUDA, docs/loss.md
    "Precision") is checked by gpu_check's targets."""
    import gist_ray.loss.op as op
    from gist_ray.loss import GistLoss
    from gist_ray.models.encoder import Encoder

    device = torch.device(dev)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        enc = Encoder(build(Path(tmp) / "student", dev))
    enc.train()
    with autocast_of(device)():
        emb = [enc.embed(sentences(16, seed)) for seed in range(3)]
    guide = [torch.nn.functional.normalize(torch.randn(16, 48), dim=-1).half() for _ in range(3)]
    loss_fn = GistLoss(backend=backend)
    with Probe(loss_fn) as probe:
        loss, _ = loss_fn(emb, [g.to(device) for g in guide])
    loss.backward()
    assert torch.isfinite(loss), "non-finite loss"
    return {
        "autocast": "bf16" if device.type == "cuda" else "off (CPU)",
        "model_output": dtype_name(emb[0].dtype), "loss_input": probe.loss_input,
        "kernel_input": probe.kernel_input,
        "backend": op.resolve(backend, device) if hasattr(op, "resolve") else backend,
        "loss": round(float(loss), 5),
    }  # fmt: skip
