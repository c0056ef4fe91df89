"""The reference backend against sentence-transformers' GISTEmbedLoss and a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gist_ray.loss import gist_loss


def st_gist_loss(anchor, positive, g_anchor, g_positive, negative=None, g_negative=None, **kw):
    """Run the installed sentence-transformers GISTEmbedLoss.forward on given embeddings.

    Its forward embeds texts with the two models; we swap that step for the given tensors and
    keep everything after it (similarities, masking, cross-entropy) as shipped."""
    from sentence_transformers.sentence_transformer.losses import gist_embed

    student_emb = [anchor, positive] + ([negative] if negative is not None else [])
    guide_emb = [g_anchor, g_positive] + ([g_negative] if g_negative is not None else [])
    student, guide = object(), object()

    def fake_embed(model, features):
        return student_emb if model is student else guide_emb

    loss = gist_embed.GISTEmbedLoss.__new__(gist_embed.GISTEmbedLoss)
    nn.Module.__init__(loss)
    loss.model, loss.guide, loss.must_retokenize = student, guide, False
    loss.similarity_fct = nn.CosineSimilarity(dim=-1)
    loss.cross_entropy_loss = nn.CrossEntropyLoss()
    loss.gather_across_devices = False
    loss.temperature = kw["temperature"]
    loss.margin, loss.margin_strategy = kw["margin"], kw["margin_strategy"]
    loss.contrast_anchors, loss.contrast_positives = (
        kw["contrast_anchors"],
        kw["contrast_positives"],
    )
    original = gist_embed.embed_columns
    gist_embed.embed_columns = fake_embed
    try:
        n_cols = len(student_emb)
        return loss([{} for _ in range(n_cols)], None)
    finally:
        gist_embed.embed_columns = original


def correlated(b: int, d: int, d_g: int, gen: torch.Generator):
    """Student and guide embeddings that agree partly, so the guide masks a real fraction."""
    centers = torch.randn(3, d_g, generator=gen)  # clusters: same-cluster rows look alike
    base = centers[torch.arange(b) % 3] + 0.9 * torch.randn(b, d_g, generator=gen)
    proj = torch.randn(d_g, d, generator=gen) / math.sqrt(d_g)
    student = base @ proj + 0.5 * torch.randn(b, d, generator=gen)
    return student, base


@pytest.mark.parametrize("strategy", ["absolute", "relative"])
@pytest.mark.parametrize("margin", [0.0, 0.1])
@pytest.mark.parametrize("with_negative", [False, True])
@pytest.mark.parametrize(
    ("contrast_a", "contrast_p"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_reference_matches_sentence_transformers(
    strategy, margin, with_negative, contrast_a, contrast_p
):
    seed = torch.seed()
    gen = torch.Generator().manual_seed(seed)
    b, d, d_g = 12, 16, 24
    a, ga = correlated(b, d, d_g, gen)
    p = a + 0.8 * torch.randn(b, d, generator=gen)
    gp = ga + 1.2 * torch.randn(b, d_g, generator=gen)
    gp[0] = -ga[0]  # t_0 = -1: row 0 masks nearly everything
    gp[1] = ga[1] + 0.05 * torch.randn(d_g, generator=gen)  # t_1 ≈ 1: row 1 masks ~nothing
    n, gn = correlated(b, d, d_g, gen) if with_negative else (None, None)
    kw = dict(
        temperature=0.05,
        margin=margin,
        margin_strategy=strategy,
        contrast_anchors=contrast_a,
        contrast_positives=contrast_p,
    )

    ours_in = [t.clone().requires_grad_() for t in (a, p)] + (
        [n.clone().requires_grad_()] if with_negative else []
    )
    st_in = [t.clone().requires_grad_() for t in (a, p)] + (
        [n.clone().requires_grad_()] if with_negative else []
    )
    ours, stats = gist_loss(
        ours_in[0],
        ours_in[1],
        ga,
        gp,
        ours_in[2:],
        [gn] if with_negative else [],
        backend="reference",
        return_stats=True,
        **kw,
    )
    theirs = st_gist_loss(st_in[0], st_in[1], ga, gp, st_in[2] if with_negative else None, gn, **kw)
    assert 0 < stats["mask_frac/all"] < 1, f"seed {seed}: masking is trivial"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    ours.backward()
    theirs.backward()
    for x, y in zip(ours_in, st_in):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6, msg=f"seed {seed}")


def test_hand_computed_3x3():
    """Three rows, unit vectors in 2-d so every cosine is known; τ = 1 for readable numbers.
    The angles avoid exact ties with the threshold (a tie is decided by the rounded inputs)."""
    deg = [0.0, 75.0, 160.0]

    def unit(angles):
        return torch.tensor(
            [[math.cos(math.radians(x)), math.sin(math.radians(x))] for x in angles]
        )

    a = unit(deg)
    p = unit([x + 30 for x in deg])  # s(a_i, p_i) = cos 30°
    # Guide: identical to the student, so g = s and t_i = cos 30° ≈ 0.866.
    loss, stats = gist_loss(a, p, a, p, temperature=1.0, backend="reference", return_stats=True)
    # Row 0: AP candidates p_0 (30°), p_1 (105°), p_2 (190°): cos 30 (positive), cos 105,
    # cos 190. AA: a_1 (75°), a_2 (160°). PP: p_1, p_2 seen from p_0 (75°, 160°).
    # Nothing is as close as 30° except the protected positive, so nothing is masked.
    c30 = math.cos(math.radians(30))
    cos = [math.cos(math.radians(x)) for x in (30, 105, 190, 75, 160, 75, 160)]
    expected_row = math.log(sum(math.exp(x) for x in cos)) - c30
    expected = []
    for i in range(3):
        cands = [float(a[i] @ p[j]) for j in range(3)]
        cands += [float(a[i] @ a[j]) for j in range(3) if j != i]
        cands += [float(p[i] @ p[j]) for j in range(3) if j != i]
        expected.append(math.log(sum(math.exp(x) for x in cands)) - c30)
    assert expected[0] == pytest.approx(expected_row)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert stats["mask_frac/all"] == 0.0

    # Now a guide that ranks a_0's AP candidate p_1 above the positive: it is masked for row 0.
    gp = p.clone()
    gp[1] = a[0]  # g(a_0, p_1) = 1 > t_0 = g(a_0, p_0)
    loss2, stats2 = gist_loss(a, p, a, gp, temperature=1.0, backend="reference", return_stats=True)
    assert stats2["mask_frac/ap"] > 0
    assert loss2.item() != pytest.approx(loss.item())


def test_all_negatives_masked_gives_zero_loss_not_nan():
    """When the guide masks every candidate but the positive, the row's loss is exactly 0."""
    b, d = 5, 8
    a, p = torch.randn(b, d, requires_grad=True), torch.randn(b, d, requires_grad=True)
    ga = torch.randn(b, 4)
    gp = -ga  # t_i = -1: every other candidate's guide similarity is above it
    loss, stats = gist_loss(a, p, ga, gp, backend="reference", return_stats=True)
    # Logits are s/τ (up to 100 at τ = 0.01): fp32 rounding of the two dot products is ~1e-5.
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-4)
    assert stats["no_negative_frac"] == 1.0
    loss.backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"temperature": 0.0}, "loss.temperature"),
        ({"margin": -0.5}, "loss.margin"),
        ({"margin_strategy": "percent"}, "loss.margin_strategy"),
        ({"backend": "cuda"}, "loss.backend"),
    ],
)
def test_bad_arguments(kwargs, needle):
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match=needle):
        gist_loss(a, a, a, a, **kwargs)
