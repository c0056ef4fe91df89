"""Hardness weighting after the guide mask (``loss.hardness_alpha``/``hardness_mode``): every
backend against a plain-PyTorch float64 oracle of the definition (tests/loss/harness.py), and
against the installed sentence-transformers' ``MultipleNegativesRankingLoss`` hardness modes
where the guide masks nothing (GIST then is MNRL). The Triton twin is in
tests/kernels/test_triton_kernel.py."""

from __future__ import annotations

import pytest
import torch

from gist_ray.loss import GistLoss, gist_loss
from gist_ray.loss.plan import HARDNESS_MODES
from tests.loss.harness import CONTRAST, Case, check_hardness
from tests.loss.test_chunked import _one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("mode", HARDNESS_MODES)
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("contrast", CONTRAST[:2], ids=["aa+pp", "aa"])
def test_against_oracle(backend, mode, k, contrast):
    case = Case(b=35, k=k, margin=0.05, contrast_anchors=contrast[0],
                contrast_positives=contrast[1])  # fmt: skip
    check_hardness(backend, case, alpha=5.0, mode=mode)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(backend, dtype):
    case = Case(b=40, k=1, margin=0.05, strategy="relative", dtype=dtype)
    check_hardness(backend, case, alpha=2.0, mode="all_negatives")


def test_all_masked_rows():
    """Masked entries get no weight: with every candidate but the positive masked, the loss is
    0 whatever α is."""
    case = Case(b=30, k=2, d_g=32, all_masked=True)
    check_hardness("chunked", case, alpha=9.0, mode="all_negatives")


def test_alpha_zero_is_plain_gist():
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(20, 16, generator=gen) for _ in range(3)]
    g = [torch.randn(20, 12, generator=gen) for _ in range(3)]
    plain = gist_loss(x[0], x[1], g[0], g[1], [x[2]], [g[2]], backend="chunked")
    zero = gist_loss(x[0], x[1], g[0], g[1], [x[2]], [g[2]], backend="chunked",
                     hardness_alpha=0.0, hardness_mode="all_negatives")  # fmt: skip
    assert torch.equal(plain, zero)
    weighted = gist_loss(x[0], x[1], g[0], g[1], [x[2]], [g[2]], backend="chunked",
                         hardness_alpha=5.0, hardness_mode="all_negatives")  # fmt: skip
    assert abs(float(weighted - plain)) > 1e-3


@pytest.mark.parametrize("mode", HARDNESS_MODES)
@pytest.mark.parametrize("contrast_anchors", [False, True])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_matches_sentence_transformers_mnrl(mode, contrast_anchors, backend):
    """A guide that masks nothing (the guide positive is the guide anchor: t_i = 1, and every
    other guide row differs) turns GIST into MNRL: AP + AN is ST's query_to_doc, AA its
    query_to_query (never hardness-weighted there either)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    seed = torch.seed()
    gen = torch.Generator().manual_seed(seed)
    b, d, d_g, tau, alpha = 24, 16, 20, 0.05, 4.0
    x = [torch.randn(b, d, generator=gen) for _ in range(4)]
    x[1] = x[0] + torch.randn(b, d, generator=gen)
    g = [torch.randn(b, d_g, generator=gen) for _ in range(3)]
    directions = ("query_to_doc",) + (("query_to_query",) if contrast_anchors else ())
    st = MultipleNegativesRankingLoss(None, scale=1 / tau, directions=directions,
                                      hardness_mode=mode, hardness_strength=alpha)  # fmt: skip
    results = []
    for fn in ("st", "ours"):
        leaves = [t.clone().requires_grad_() for t in x]
        if fn == "st":
            loss = st.compute_loss_from_embeddings(leaves, None)
        else:
            loss = gist_loss(leaves[0], leaves[1], g[0], g[0], leaves[2:], [g[1], g[2]],
                             temperature=tau, contrast_anchors=contrast_anchors,
                             contrast_positives=False, hardness_alpha=alpha,
                             hardness_mode=mode, backend=backend)  # fmt: skip
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (st_loss, st_grads), (loss, grads) = results
    torch.testing.assert_close(loss, st_loss, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    for ours, theirs in zip(grads, st_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hardness_alpha": -1.0}, "loss.hardness_alpha must be >= 0, got -1.0"),
        ({"hardness_alpha": float("nan")}, "loss.hardness_alpha must be >= 0, got nan"),
        ({"hardness_mode": "hard_only"}, "loss.hardness_mode: unknown mode 'hard_only'"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        GistLoss(**kwargs)
    assert "\n" not in str(err.value)
