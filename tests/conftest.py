"""Shared fixtures: tiny random encoders built on the fly, one Ray instance, MLflow stores."""

from __future__ import annotations

import os

# The Triton interpreter must be chosen before triton is first imported (CPU machines).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests are small; torch's thread pool only adds contention on a shared 2-core machine.
torch.set_num_threads(1)

WORDS = (
    "what is the cost of car home life health insurance policy coverage premium claim "
    "does my plan pay for a doctor visit when i move to another state can you cancel "
    "the annuity retirement disability medicare term whole renters deductible"
).split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def build_tiny_bert(
    path: Path, hidden: int = 32, layers: int = 2, seed: int = 0, dropout: float = 0.1
) -> Path:
    """A random BERT with a WordPiece tokenizer trained on a few sentences, saved to ``path``."""
    import torch
    from transformers import BertConfig, BertModel

    fast = _word_piece(add_specials=True)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def build_short_guide(path: Path, positions: int = 12) -> Path:
    """A real model that fails on long texts: a tiny BERT whose position table (``positions``)
    is shorter than the max length it is run at (``model.guide_max_seq_length=64``)."""
    import json

    import safetensors.torch as st

    build_tiny_bert(path, hidden=16, seed=3)
    conf = json.loads((path / "config.json").read_text())
    conf["max_position_embeddings"] = positions
    (path / "config.json").write_text(json.dumps(conf))
    weights = st.load_file(str(path / "model.safetensors"))
    for k in [k for k in weights if "position_embeddings" in k]:
        weights[k] = weights[k][:positions].clone()
    st.save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def write_triplets(path: Path, rows: int, seed: int) -> Path:
    """A jsonl file of (anchor, positive, negative) sentences."""
    import json

    a, p, n = (make_sentences(rows, seed + i) for i in range(3))
    path.write_text(
        "".join(
            json.dumps({"anchor": x, "positive": y, "negative": z}) + "\n"
            for x, y, z in zip(a, p, n)
        )
    )
    return path


@functools.cache
def _word_piece(add_specials: bool):
    """The tiny models' tokenizer: WordPiece trained on WORDS, once per session (training it
    twice may give another vocabulary), so a student and a guide share token ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        make_sentences(200) + [" ".join(WORDS)],
        trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials),
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if add_specials:
        tok.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    else:  # a decoder: the text, then an end-of-sequence token (last-token pooling reads it)
        tok.post_processor = TemplateProcessing(
            single="$A [SEP]", pair="$A [SEP] $B [SEP]", special_tokens=[("[SEP]", sep_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def build_tiny_decoder(path: Path, hidden: int = 32, seed: int = 0, dropout: float = 0.0) -> Path:
    """A random 2-layer Llama-style decoder (causal attention) with the tiny WordPiece
    tokenizer, saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    tok = _word_piece(add_specials=False)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        attention_dropout=dropout,
        pad_token_id=tok.pad_token_id,
    )
    LlamaModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _console_log_session():
    """The same before any module-scoped fixture runs (they run before function ones)."""
    from gist_ray.core import log

    log.configure(stream="stdout", propagate=True)


@pytest.fixture(autouse=True)
def _console_log(_console_log_session):
    """gist-ray's progress lines on stdout, as ``gist-ray train`` configures them (a test of
    ``gist-ray eval`` moves them to stderr); propagated for ``caplog``."""
    from gist_ray.core import log

    log.configure(stream="stdout", propagate=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Two different tiny BERTs: a student (hidden 32) and a guide (hidden 48)."""
    root = tmp_path_factory.mktemp("models")
    return {
        "student": build_tiny_bert(root / "student", hidden=32, seed=0),
        "guide": build_tiny_bert(root / "guide", hidden=48, seed=1),
    }


@pytest.fixture(scope="session")
def tiny_pairs_file(tmp_path_factory) -> Path:
    """A jsonl training file with anchor/positive/negative columns."""
    return write_triplets(tmp_path_factory.mktemp("data") / "pairs.jsonl", 64, seed=1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's) on 127.0.0.1 for the session; its endpoint and
    credentials are put in this process's environment, where pyarrow, boto3, MLflow and the Ray
    workers started after it find them."""
    from tests.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray instance (2 CPUs) shared by every test that needs it. The S3 server starts
    first, so the Ray workers inherit its endpoint and credentials."""
    import ray

    tmp = tempfile.mkdtemp(prefix="gist-ray-test-ray-")
    ray.init(num_cpus=2, _temp_dir=tmp, log_to_driver=True)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    """Every test on the shared Ray instance is slow (a cold TorchTrainer fit takes ~25 s)."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def run_worker(cfg, reporter, *args, **kwargs) -> dict:
    """``train_worker`` with this session's per-step losses added to its summary (``losses``),
    collected through the loop's step hook (and any ``on_step`` given, still called)."""
    from gist_ray.train.loop import train_worker

    losses: list[float] = []
    given = kwargs.pop("on_step", None)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        losses.append(metrics["loss"])
        if given is not None:
            given(step, metrics)

    return {**train_worker(cfg, reporter, *args, on_step=on_step, **kwargs), "losses": losses}
