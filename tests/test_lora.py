"""Large students: LoRA adapters (PEFT through sentence-transformers), gradient checkpointing
and both export modes, on a tiny Llama-style decoder with last-token pooling and an instruction
prompt for the queries, built on the fly."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from gist_ray.config import load_config
from gist_ray.core.errors import ConfigError
from gist_ray.loss import GistLoss
from gist_ray.models.encoder import export_model, load_encoder
from gist_ray.models.lora import is_adapter_folder, merge_adapter, prepare_student
from gist_ray.models.spec import ModelSpec
from gist_ray.train.checkpoint import LocalReporter
from gist_ray.train.loop import optimizer_step
from gist_ray.train.step import training_step
from tests.conftest import (
    build_tiny_bert,
    build_tiny_decoder,
    make_sentences,
    run_worker,
    write_triplets,
)
from tests.test_fault_tolerance import _reference_worker  # one gloo rank of train_worker

INSTRUCTION = "Instruct: find the answer to the question\nQuery: "


def _st_decoder(root: Path, dropout: float) -> Path:
    """A sentence-transformers decoder embedder: last-token pooling, an instruction prompt for
    queries, max length 48."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    hf = build_tiny_decoder(root / "hf", seed=3, dropout=dropout)
    module = Transformer(str(hf), max_seq_length=48)
    pooling = Pooling(module.get_embedding_dimension(), "lasttoken")
    model = SentenceTransformer(modules=[module, pooling], prompts={"query": INSTRUCTION})
    model.save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    """Attention dropout on, so replayed and recomputed forwards must draw the same masks."""
    return _st_decoder(tmp_path_factory.mktemp("lora"), dropout=0.1)


@pytest.fixture(scope="module")
def guide(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("lora") / "guide", hidden=48, seed=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_triplets(tmp_path_factory.mktemp("lora") / "pairs.jsonl", 48, seed=5)


def _cfg(decoder, guide, data, out, *extra):
    return load_config(
        overrides=[
            f"model.student={decoder}",
            f"model.guide={guide}",
            "model.max_seq_length=32",
            "model.lora.rank=4",
            "model.lora.dropout=0.1",
            f"data.train={data}",
            "data.max_examples=0",
            "data.guide_cache=false",
            "eval.source=",
            "train.batch_size=8",
            "train.lr=1e-2",
            "train.warmup_ratio=0",
            "ray.num_workers=1",
            f"output_dir={out}",
            *extra,
        ]
    )


def _student(cfg):
    student = load_encoder(ModelSpec.student(cfg))
    prepare_student(student.model, cfg)
    student.train()
    return student


def _batch(n=8, guide_dim=48):
    columns = [make_sentences(n, s) for s in (31, 32, 33)]
    gen = torch.Generator().manual_seed(0)
    return columns, [torch.randn(n, guide_dim, generator=gen) for _ in columns]


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_only_adapter_weights_change(decoder, guide, data, tmp_path):
    from gist_ray.train.checkpoint import TrainState
    from gist_ray.train.optim import build_optimizer, build_scheduler

    cfg = _cfg(decoder, guide, data, tmp_path)
    student = _student(cfg)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    adapters = {n for n, p in student.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert {n for n in before if "q_proj" in n and "lora_A" in n}, "PEFT's defaults for Llama"
    opt = build_optimizer(student, cfg.train)
    state = TrainState(opt, build_scheduler(opt, cfg.train, 10), None)
    columns, guide_emb = _batch()
    prompts = [INSTRUCTION, "", ""]
    for _ in range(2):
        optimizer_step(cfg, student, GistLoss(), state, columns, guide_emb, prompts)
    after = dict(student.named_parameters())
    for name, value in before.items():
        if name in adapters:
            assert not torch.equal(after[name], value), f"{name} did not train"
        else:
            assert torch.equal(after[name], value), f"base weight {name} changed"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_caching_with_lora_is_exact(decoder, guide, data, tmp_path, checkpointing):
    """Mini-batches of 4 under gradient caching (and with gradient checkpointing) give the
    adapter gradients of one backward over the same mini-batches with their dropout masks."""
    from gist_ray.loss import gist_loss

    extra = [f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    student = _student(_cfg(decoder, guide, data, tmp_path, *extra))
    columns, guide_emb = _batch()
    prompts = [INSTRUCTION, "", ""]
    torch.manual_seed(11)
    cached_loss, _ = training_step(student, GistLoss(), columns, guide_emb, 4, prompts)
    cached = _grads(student)
    student.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    emb = [
        torch.cat([student.embed(t[i : i + 4], p or None) for i in range(0, 8, 4)])
        for t, p in zip(columns, prompts)
    ]
    loss = gist_loss(emb[0], emb[1], guide_emb[0], guide_emb[1], emb[2:], guide_emb[2:])
    loss.backward()
    direct = _grads(student)
    torch.testing.assert_close(cached_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    assert direct.abs().sum() > 0
    assert _rel_err(cached, direct) < 1e-5


def test_gradient_checkpointing_is_exact_with_dropout(decoder, guide, data, tmp_path):
    grads = []
    for checkpointing in ("false", "true"):
        cfg = _cfg(decoder, guide, data, tmp_path, f"train.gradient_checkpointing={checkpointing}")
        student = _student(cfg)
        torch.manual_seed(3)
        with torch.no_grad():  # the same adapter init in both runs
            for p in student.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1)
        torch.manual_seed(5)
        training_step(student, GistLoss(), *_batch(), prompts=[INSTRUCTION, "", ""])
        grads.append(_grads(student))
    assert _rel_err(grads[1], grads[0]) < 1e-6


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_from_a_lora_checkpoint_is_exact(decoder, guide, data, tmp_path):
    """A run resumed from its step-2 checkpoint equals the uninterrupted run: the checkpoint
    holds the adapter, optimizer, schedule and RNG (LoRA dropout replays)."""
    extra = ("train.max_steps=4", "train.checkpoint_every=2", "train.mini_batch_size=4")
    cfg = _cfg(decoder, guide, data, tmp_path / "run", *extra)
    full = run_worker(cfg, LocalReporter(cfg.output_dir))
    ckpts = tmp_path / "run" / "checkpoints"
    final = ckpts / "checkpoint-0000004"
    assert is_adapter_folder(final / "model")
    assert not (final / "model" / "model.safetensors").exists(), "the base is not copied"
    uninterrupted = _adapter_weights(final / "model")
    shutil.rmtree(final)
    resumed = run_worker(cfg, LocalReporter(cfg.output_dir))
    assert resumed["steps"] == 4 and len(resumed["losses"]) == 2
    torch.testing.assert_close(
        torch.tensor(resumed["losses"]), torch.tensor(full["losses"][2:]), rtol=0, atol=0
    )
    again = _adapter_weights(final / "model")
    assert again.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():
        assert torch.equal(again[k], v), k


@pytest.fixture(scope="module")
def trained(decoder, guide, data, tmp_path_factory):
    """Three LoRA steps; the final checkpoint's model folder (the adapter) and the trained
    student loaded from it."""
    out = tmp_path_factory.mktemp("trained")
    cfg = _cfg(decoder, guide, data, out, "train.max_steps=3")
    run_worker(cfg, LocalReporter(out))
    return cfg, out / "checkpoints" / "checkpoint-0000003" / "model"


def _user_embeddings(path: Path, queries, docs):
    """Loaded and used the way a user does: ``SentenceTransformer(path)`` at its own settings."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path))
    return model, (
        model.encode_query(queries, convert_to_tensor=True),
        model.encode_document(docs, convert_to_tensor=True),
    )


def test_both_exports_embed_like_the_trained_model(trained, decoder, tmp_path):
    cfg, ckpt_model = trained
    queries, docs = make_sentences(6, 901), make_sentences(6, 902)  # never trained on
    reference = load_encoder(ModelSpec(str(ckpt_model)), frozen=True)
    q_ref, d_ref = (e(t) for e, t in zip(reference.retrieval_encoders(), (queries, docs)))
    base = load_encoder(ModelSpec(str(decoder)), frozen=True)
    q_base = base.retrieval_encoders()[0](queries)
    assert (q_ref - q_base).abs().max() > 1e-3, "the adapter changed nothing"

    adapter_dir = export_model(ckpt_model, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == decoder
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    model, (q, d) = _user_embeddings(adapter_dir, queries, docs)
    torch.testing.assert_close(q.float(), q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d.float(), d_ref, rtol=1e-5, atol=1e-6)

    merged_model = load_encoder(ModelSpec(str(ckpt_model)), frozen=True).model
    merge_adapter(merged_model)
    merged_dir = export_model(ckpt_model, tmp_path / "merged", model=merged_model)
    assert not is_adapter_folder(merged_dir) and (merged_dir / "model.safetensors").is_file()
    merged, (q, d) = _user_embeddings(merged_dir, queries, docs)
    torch.testing.assert_close(q.float(), q_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.float(), d_ref, rtol=1e-4, atol=1e-5)
    for m in (model, merged):  # the same kind of model that went in
        assert m.prompts["query"] == INSTRUCTION
        assert m[1].pooling_mode == "lasttoken"
        assert m.max_seq_length == 48
    assert not any("lora" in k for k in merged.state_dict())


def test_bf16_base_keeps_float32_adapters(decoder, guide, data, tmp_path):
    cfg = _cfg(decoder, guide, data, tmp_path, "model.model_kwargs={dtype: bfloat16}")
    student = _student(cfg)
    dtypes = {p.dtype for p in student.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}
    training_step(student, GistLoss(), *_batch(), prompts=[INSTRUCTION, "", ""])
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_target_modules_that_match_nothing(decoder, guide, data, tmp_path):
    cfg = _cfg(decoder, guide, data, tmp_path, "model.lora.target_modules=[query_proj]")
    with pytest.raises(ConfigError, match="model.lora.target_modules") as e:
        _student(cfg)
    assert "q_proj" in str(e.value) and "\n" not in str(e.value)


def test_lora_without_peft_says_how_to_install(decoder, guide, data, tmp_path, monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "peft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ConfigError, match="model.lora needs the peft package, not installed: pip"):
        _student(_cfg(decoder, guide, data, tmp_path))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.lora.rank=-2"], "model.lora.rank = -2 is not allowed"),
        (["model.lora.rank=0", "model.lora.alpha=8"], "model.lora.alpha is set but LoRA is off"),
        (["model.lora.rank=0", "model.lora_export=adapter"], "model.lora_export is set"),
        (["model.lora.rank=2", "model.lora_export=gguf"], "model.lora_export = 'gguf'"),
        (["model.lora.rank=2", "model.lora.dropout=1"], "model.lora.dropout = 1.0"),
    ],
)
def test_bad_lora_settings(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=overrides)


@pytest.mark.slow
def test_global_pool_with_lora_equals_one_worker(decoder, guide, data, tmp_path):
    """Two gloo workers with half the batch each (candidates gathered) train the adapter like
    one worker with the whole batch (dropout off: the ranks' streams differ by design). Both
    runs are fresh processes with one thread each, so nothing this test process ran before
    changes either side's arithmetic."""
    extra = ("train.max_steps=3", "model.lora.dropout=0", "train.mini_batch_size=2")
    no_dropout = _st_decoder(tmp_path, dropout=0.0)
    one = _cfg(no_dropout, guide, data, tmp_path / "one", *extra)
    two = _cfg(no_dropout, guide, data, tmp_path / "two", *extra, "ray.num_workers=2")
    losses = {}
    for name, cfg, world in (("one", one, 1), ("two", two, 2)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        losses[name] = tmp_path / f"losses-{name}.json"
        torch.multiprocessing.spawn(
            _reference_worker, args=(cfg.to_dict(), port, str(losses[name]), world), nprocs=world
        )
    torch.testing.assert_close(
        torch.tensor(json.loads(losses["two"].read_text())),
        torch.tensor(json.loads(losses["one"].read_text())),
        rtol=1e-5,
        atol=1e-6,
    )
    name = "checkpoints/checkpoint-0000003/model"
    a, b = _adapter_weights(tmp_path / "one" / name), _adapter_weights(tmp_path / "two" / name)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)


def test_adapter_export_loads_in_a_process_without_gist_ray(trained, tmp_path):
    """A user's serving process never imports gist-ray: plain ``SentenceTransformer(path)`` of
    the adapter export loads it (PEFT and transformers' own version check, nothing of ours) and
    embeds like the trained model."""
    import os
    import subprocess
    import sys

    _, ckpt_model = trained
    adapter_dir = export_model(ckpt_model, tmp_path / "adapter")
    queries = make_sentences(4, 903)
    reference = load_encoder(ModelSpec(str(ckpt_model)), frozen=True)
    expected = reference.retrieval_encoders()[0](queries)
    code = (
        "import json, sys\n"
        "from sentence_transformers import SentenceTransformer\n"
        "model = SentenceTransformer(sys.argv[1])\n"
        "emb = model.encode_query(json.loads(sys.argv[2]))\n"
        "assert not [m for m in sys.modules if m.startswith('gist_ray')], 'gist_ray imported'\n"
        "print(json.dumps(emb.tolist()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(adapter_dir), json.dumps(queries)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)
