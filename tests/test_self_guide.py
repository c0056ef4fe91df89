"""Self-guide (``model.guide: self``): the student frozen at step 0 (cacheable) or an EMA of its
weights, no second model loaded; and the guide warm-up (plain InfoNCE for the first steps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gist_ray.config import load_config
from gist_ray.core.errors import ConfigError
from gist_ray.data.batches import GlobalBatches
from gist_ray.data.training import load_training_sets
from gist_ray.guide.source import live_guide_embeddings
from gist_ray.loss import GistLoss
from gist_ray.models import loading
from gist_ray.models.encoder import load_encoder
from gist_ray.models.prompts import student_prompts
from gist_ray.models.self_guide import SelfGuide
from gist_ray.models.spec import ModelSpec
from gist_ray.train.checkpoint import STATE_FILE, LocalReporter, TrainState
from gist_ray.train.loop import optimizer_step, unmasked
from gist_ray.train.optim import build_optimizer, build_scheduler
from tests.conftest import build_tiny_bert, make_sentences, run_worker


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """Dropout off: the step-1 student embeddings can be recomputed outside the loop."""
    return build_tiny_bert(tmp_path_factory.mktemp("self") / "bert", seed=4, dropout=0.0)


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GIST_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _cfg(student, data, out, *extra):
    return load_config(
        overrides=[
            f"model.student={student}",
            "model.guide=self",
            "data.guide_cache_dtype=float32",  # the live guide's precision: losses to 1e-5
            "model.max_seq_length=32",
            f"data.train={data}",
            "data.max_examples=0",
            "eval.source=",
            "train.batch_size=8",
            "train.max_steps=1",
            "train.lr=1e-3",
            "train.warmup_ratio=0",
            "loss.margin=0.05",
            "ray.num_workers=1",
            f"output_dir={out}",
            *extra,
        ]
    )


def _cache_folders(data):
    """The complete guide caches beside ``data`` (a folder each, with its manifest)."""
    from gist_ray.guide.cache import MANIFEST

    return [p for p in (data.parent / ".gist-ray-guide-cache").glob("*") if (p / MANIFEST).exists()]


def _step1(cfg):
    """The first batch's student embeddings and the guide embeddings of a separately loaded copy
    of the student (the step-0 student)."""
    sets = load_training_sets(cfg)
    d, idx = GlobalBatches.for_config(cfg, sets).local(0, 0, 1)
    columns = sets[d].texts_at(idx)
    student = load_encoder(ModelSpec.student(cfg))
    prompts = student_prompts(cfg, sets, student.model.prompts)[d]
    copy = load_encoder(ModelSpec.student(cfg), frozen=True)
    guide = live_guide_embeddings(copy, columns, [p or None for p in prompts])
    with torch.no_grad():
        emb = [student.embed(t, p or None) for t, p in zip(columns, prompts)]
    return emb, guide


def _infonce(emb, temperature):
    """Plain in-batch InfoNCE, written out: anchor vs positives, other anchors, other positives
    (self-pairs excluded) and negatives."""
    a, p, *negs = [F.normalize(e.float(), dim=-1) for e in emb]
    eye = torch.eye(a.shape[0], dtype=torch.bool)
    scores = [a @ p.T, *((x @ x.T).masked_fill(eye, -torch.inf) for x in (a, p))]
    scores += [a @ n.T for n in negs]
    logits = torch.cat(scores, dim=1) / temperature
    return (torch.logsumexp(logits, 1) - (a * p).sum(1) / temperature).mean()


def test_frozen_self_guide_is_the_student_at_step_0_and_cached(
    student, tiny_pairs_file, cache_env, monkeypatch
):
    loaded = []
    real = loading.load_model
    monkeypatch.setattr(
        loading, "load_model", lambda spec, *a, **k: loaded.append(spec) or real(spec, *a, **k)
    )
    cfg = _cfg(student, tiny_pairs_file, cache_env / "a")
    result = run_worker(cfg, LocalReporter(cfg.output_dir))
    # Only the student's folder is ever loaded: as the student, and once more by the guide-cache
    # build that embeds the texts with the step-0 student (no guide model anywhere).
    assert {s.name for s in loaded} == {str(student)}, "only the student is loaded"
    emb, guide = _step1(cfg)
    expected, _ = GistLoss.from_config(cfg.loss)(emb, guide)
    assert abs(result["losses"][0] - expected.item()) < 1e-5
    files = _cache_folders(tiny_pairs_file)
    assert files, "the frozen self-guide is cached"
    # A second run loads that cache (no guide forward) and trains the same.
    second = _cfg(student, tiny_pairs_file, cache_env / "b")
    again = run_worker(second, LocalReporter(second.output_dir))
    assert again["losses"] == result["losses"]
    # The student named as an ordinary guide is another cache entry: the fingerprint says self.
    other = _cfg(student, tiny_pairs_file, cache_env / "c", f"model.guide={student}")
    run_worker(other, LocalReporter(cache_env / "c"))
    after = _cache_folders(tiny_pairs_file)
    assert len(after) == len(files) + 1


def test_guide_warmup_is_plain_infonce(student, tiny_pairs_file, cache_env):
    cfg = _cfg(student, tiny_pairs_file, cache_env / "w", "train.guide_warmup_steps=1")
    emb, guide = _step1(cfg)
    masked, stats = GistLoss.from_config(cfg.loss)(emb, guide)
    assert stats["mask_frac/all"] > 0, "the guide masks something in this batch"
    infonce = _infonce(emb, cfg.loss.temperature)
    assert abs(masked.item() - infonce.item()) > 1e-3
    for backend in ("reference", "chunked"):
        plain, stats = unmasked(GistLoss(margin=0.05, backend=backend))(emb, guide)
        torch.testing.assert_close(plain, infonce, rtol=1e-5, atol=1e-5)
        assert stats["mask_frac/all"] == 0
    warm = run_worker(cfg, LocalReporter(cfg.output_dir))
    assert abs(warm["losses"][0] - infonce.item()) < 1e-4


def _lora_cfg(tiny_models, tmp_path, *extra):
    return load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            "model.guide=self",
            "model.max_seq_length=32",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            f"output_dir={tmp_path}",
            *extra,
        ]
    )


@pytest.mark.parametrize("lora", [False, True])
def test_ema_after_two_steps_matches_a_hand_computed_ema(tiny_models, tmp_path, lora):
    from gist_ray.models.lora import prepare_student

    extra = ["model.self_guide=ema", "model.self_guide_decay=0.9"]
    cfg = _lora_cfg(tiny_models, tmp_path, *extra, *(["model.lora.rank=4"] if lora else []))
    enc = load_encoder(ModelSpec.student(cfg))
    prepare_student(enc.model, cfg)
    enc.train()
    guide = SelfGuide(enc, "ema", 0.9)
    trained = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    ours = dict(guide.encoder.named_parameters())
    for n, p in enc.named_parameters():  # frozen weights are shared, trained ones copied
        same = ours[n].data_ptr() == p.data_ptr()
        assert same == (n not in trained), n
    thetas = [{n: p.detach().clone() for n, p in trained.items()}]
    opt = build_optimizer(enc, cfg.train)
    state = TrainState(opt, build_scheduler(opt, cfg.train, 10), None)
    columns = [make_sentences(8, s) for s in (1, 2, 3)]
    guide_emb = [torch.randn(8, 48) for _ in columns]
    for _ in range(2):
        optimizer_step(cfg, enc, GistLoss(), state, columns, guide_emb)
        guide.update()
        thetas.append({n: p.detach().clone() for n, p in trained.items()})
    assert any(not torch.equal(thetas[2][n], thetas[0][n]) for n in trained), "nothing trained"
    for n in trained:
        t0, t1, t2 = (t[n] for t in thetas)
        expected = 0.9 * (0.9 * t0 + 0.1 * t1) + 0.1 * t2
        torch.testing.assert_close(ours[n], expected, rtol=1e-6, atol=1e-7)
    assert not ours[next(iter(trained))].requires_grad


def test_frozen_copy_does_not_move(tiny_models, tmp_path):
    cfg = _lora_cfg(tiny_models, tmp_path)
    enc = load_encoder(ModelSpec.student(cfg))
    guide = SelfGuide(enc, "frozen")
    before = {n: p.clone() for n, p in guide.encoder.named_parameters()}
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    guide.update()
    for n, p in guide.encoder.named_parameters():
        assert torch.equal(p, before[n]), n


def test_resume_with_ema_is_exact(tiny_models, tiny_pairs_file, cache_env):
    """Dropout on; the EMA weights are in the checkpoint, so the resumed run's guide, losses
    and final EMA equal the uninterrupted run's."""
    cfg = _cfg(
        tiny_models["student"],
        tiny_pairs_file,
        cache_env / "run",
        "model.self_guide=ema",
        "model.self_guide_decay=0.5",
        "train.max_steps=4",
        "train.checkpoint_every=2",
    )
    full = run_worker(cfg, LocalReporter(cfg.output_dir))
    final = cache_env / "run" / "checkpoints" / "checkpoint-0000004"
    ema = torch.load(final / STATE_FILE, weights_only=False)["parts"]["self_guide"]
    assert ema, "the checkpoint holds the EMA weights"
    shutil.rmtree(final)
    resumed = run_worker(cfg, LocalReporter(cfg.output_dir))
    assert resumed["losses"] == full["losses"][2:]
    again = torch.load(final / STATE_FILE, weights_only=False)["parts"]["self_guide"]
    for k, v in ema.items():
        assert torch.equal(again[k], v), k
    assert not list(tiny_pairs_file.parent.glob(".gist-ray-guide-cache/*ema*"))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.guide=self", "model.guide_pooling=cls"], "model.guide_pooling does not apply"),
        (["model.guide=self", "model.guide_revision=v2"], "model.guide_revision does not apply"),
        (["model.guide=self", "model.guide_max_seq_length=8"], "model.guide_max_seq_length"),
        (["model.guide=self", "model.guide_prompts={}"], "model.guide_prompts does not apply"),
        (["model.guide=self", "model.self_guide=average"], "model.self_guide = 'average'"),
        (["model.guide=self", "model.self_guide_decay=1"], "model.self_guide_decay = 1.0"),
        (["model.self_guide=ema"], "model.self_guide applies only with model.guide: self"),
        (["train.guide_warmup_steps=-1"], "train.guide_warmup_steps = -1"),
    ],
)
def test_bad_self_guide_settings(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(overrides=overrides)
    assert "\n" not in str(e.value)


def test_cache_guide_refuses_an_ema_guide(tmp_path):
    from gist_ray.commands.train import cache_guide

    cfg = load_config(overrides=["model.guide=self", "model.self_guide=ema"])
    with pytest.raises(ConfigError, match="nothing to cache"):
        cache_guide(cfg)
