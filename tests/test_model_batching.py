"""Inference batches: sorted by token length, cut by a text count and a padded-token budget (the
CUDA path), and encodes through them equal to the plain CPU path."""

from __future__ import annotations

import random

import pytest
import torch

from gist_ray.models import batching, encoder
from gist_ray.models.batching import InferenceBatching, token_batches
from tests.conftest import make_sentences


def test_token_batches_cover_every_text_once_longest_first_within_both_caps():
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.randint(1, 80) for _ in range(rng.randint(0, 300))]
        max_texts = rng.randint(1, 40)
        max_tokens = rng.choice([None, rng.randint(1, 400)])
        batches = token_batches(lengths, max_texts, max_tokens)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
        for b in batches:
            assert 1 <= len(b) <= max_texts
            if max_tokens is not None and len(b) > 1:
                assert len(b) * max(lengths[i] for i in b) <= max_tokens
        # greedy: a batch was closed only because the next text did not fit
        for b, nxt in zip(batches, batches[1:]):
            grown = len(b) + 1
            assert grown > max_texts or (
                max_tokens is not None and grown * lengths[b[0]] > max_tokens
            )
            assert lengths[nxt[0]] <= lengths[b[-1]]


def test_token_batches_without_a_budget_are_fixed_size_chunks_of_the_sorted_order():
    lengths = [5, 9, 9, 1, 7, 3, 9]
    assert token_batches(lengths, 3) == [[1, 2, 6], [4, 0, 5], [3]]  # ties keep input order


def test_token_batches_by_budget_put_short_texts_in_larger_batches():
    lengths = [64] * 4 + [16] * 8
    assert token_batches(lengths, 100, 128) == [[0, 1], [2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert token_batches([500, 10], 8, 100) == [[0], [1]]  # too long for the budget: alone
    with pytest.raises(ValueError, match="must be >= 1"):
        token_batches([1], 0)


def test_the_device_decides_the_batching():
    assert batching.batching_for("cpu") == batching.CPU_BATCHING
    cuda = batching.batching_for(torch.device("cuda", 1))  # a decision, no GPU needed
    assert cuda.autocast == torch.bfloat16 and cuda.max_tokens
    assert batching.CPU_BATCHING.autocast is None and batching.CPU_BATCHING.max_tokens is None


@pytest.fixture()
def guide(tiny_models):
    from gist_ray.models.spec import ModelSpec

    return encoder.load_encoder(ModelSpec(str(tiny_models["guide"]), max_seq_length=32),
                                frozen=True)  # fmt: skip


def test_token_lengths_are_those_of_the_features(guide):
    texts = make_sentences(12, 7) + [" ".join(make_sentences(20, 8))]  # one past truncation
    lengths = guide.token_lengths(texts, "query: ")
    feats = guide.features(texts, "query: ")
    assert lengths == feats["attention_mask"].sum(1).tolist() and max(lengths) == 32


def test_encodes_by_token_budget_equal_the_plain_path(guide, monkeypatch):
    """The CUDA path's batching (by token budget, sorted) run on the CPU, in fp32 and under
    bf16 autocast: rows come back in input order, equal to the plain CPU encode."""
    texts = make_sentences(40, 9)
    plain = guide.encode(texts, batch_size=7)
    q_plain, d_plain = (f(texts) for f in guide.retrieval_encoders(batch_size=7))
    by_budget = InferenceBatching(max_texts=16, max_tokens=60, autocast=None)
    monkeypatch.setattr(encoder, "batching_for", lambda _device: by_budget)
    torch.testing.assert_close(guide.encode(texts), plain, rtol=1e-5, atol=1e-6)
    q, d = (f(texts) for f in guide.retrieval_encoders())
    torch.testing.assert_close(q, q_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d, d_plain, rtol=1e-5, atol=1e-6)
    bf16 = InferenceBatching(max_texts=16, max_tokens=60, autocast=torch.bfloat16)
    monkeypatch.setattr(encoder, "batching_for", lambda _device: bf16)
    half = guide.encode(texts)
    assert half.dtype == torch.float32 and not torch.equal(half, plain)  # autocast did run
    cos = torch.nn.functional.cosine_similarity(half, plain, dim=-1)
    assert cos.min() > 0.99
