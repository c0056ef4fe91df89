"""Any sentence-transformers model in, the same model out: the fidelity matrix.

Small models built on the fly, each a different kind a user may bring. For each:
(a) after one real training step at a learning rate of 1e-20, the exported model has the same
    modules, max length and prompts as the input and embeds text like it (with and without a
    prompt), loaded the way a user loads it;
(b) with dropout off, gist-ray's step-1 loss equals sentence-transformers' GISTEmbedLoss for the
    same student, guide and batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gist_ray.config import load_config
from gist_ray.train.checkpoint import LocalReporter
from tests.conftest import build_tiny_bert, build_tiny_decoder, write_triplets

PROMPTS = {"query": "query: ", "document": "passage: "}
TEXTS = ["what does my car insurance cover", "cancel a life policy", "renters deductible"]


def _st(modules, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=modules, device="cpu", **kwargs)


def _cls_dense(root: Path):
    """CLS pooling, a Dense head 32 -> 24 (tanh), no Normalize."""
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer

    torch.manual_seed(3)
    tr = Transformer(str(build_tiny_bert(root / "bert", dropout=0.0)))
    return _st([tr, Pooling(32, "cls"), Dense(32, 24, activation_function=torch.nn.Tanh())])


def _mean_normalize(root: Path):
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tr = Transformer(str(build_tiny_bert(root / "bert", dropout=0.0)))
    return _st([tr, Pooling(32, "mean"), Normalize()])


def _decoder(root: Path):
    """Last-token pooling on a tiny causal decoder (the e5-mistral / Qwen-embedding shape)."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    tr = Transformer(str(build_tiny_decoder(root / "llama")))
    return _st([tr, Pooling(32, "lasttoken"), Normalize()])


def _prompts(root: Path):
    """Query/document prompts, and a pooling that leaves the prompt's tokens out."""
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tr = Transformer(str(build_tiny_bert(root / "bert", dropout=0.0)))
    return _st([tr, Pooling(32, "mean", include_prompt=False)], prompts=PROMPTS)


def _max_len_40(root: Path):
    """Its own max length (40) is not the config's (training truncation at 8 tokens)."""
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    tr = Transformer(str(build_tiny_bert(root / "bert", dropout=0.0)), max_seq_length=40)
    return _st([tr, Pooling(32, "mean")])


CASES = {
    "cls-dense": (_cls_dense, 0, "bert"),
    "mean-normalize": (_mean_normalize, 0, "bert"),
    "decoder-last-token": (_decoder, 0, "decoder"),
    "prompts": (_prompts, 0, "bert"),
    "max-len-40": (_max_len_40, 8, "bert"),
}


@pytest.fixture(scope="module")
def guides(tmp_path_factory):
    """Guides that share the students' vocabulary, so sentence-transformers hands the guide the
    student's own token ids (it re-tokenizes decoded text otherwise)."""
    root = tmp_path_factory.mktemp("guides")
    return {
        "bert": build_tiny_bert(root / "bert", hidden=48, seed=1, dropout=0.0),
        "decoder": build_tiny_decoder(root / "llama", hidden=48, seed=1),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_triplets(tmp_path_factory.mktemp("data") / "pairs.jsonl", 48, seed=21)


def _train_one_step(student_dir, guide_dir, data, out, train_len, *extra):
    """One real step through the training loop (one worker, no Ray); the exported model."""
    from gist_ray.models.encoder import export_model
    from tests.conftest import run_worker

    cfg = load_config(
        overrides=[
            f"model.student={student_dir}",
            f"model.guide={guide_dir}",
            f"model.max_seq_length={train_len}",
            f"data.train={data}",
            "data.max_examples=0",
            "train.batch_size=16",
            "train.max_steps=1",
            "train.lr=1e-20",
            "data.guide_cache_dtype=float32",  # the guide's precision: parity to 1e-5
            "train.warmup_ratio=0",
            "ray.num_workers=1",
            f"output_dir={out}",
            *extra,
        ]
    )
    result = run_worker(cfg, LocalReporter(out))
    exported = export_model(out / "checkpoints" / "checkpoint-0000001" / "model", out)
    return cfg, result, exported


def _describe(model) -> dict:
    return {
        "modules": [(type(m).__name__, m.get_config_dict()) for m in model],
        "max_seq_length": model.max_seq_length,
        "prompts": model.prompts,
        "default_prompt_name": model.default_prompt_name,
        "similarity": model.similarity_fn_name,
    }


def _st_step1_loss(cfg, student_dir, guide_dir, prompts, train_len):
    """sentence-transformers' GISTEmbedLoss on gist-ray's first global batch."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.data_collator import (
        SentenceTransformerDataCollator,
    )
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss

    from gist_ray.data.batches import GlobalBatches
    from gist_ray.data.training import load_training_sets

    sets = load_training_sets(cfg)
    rows = GlobalBatches.for_config(cfg, sets).batch(0).rows
    features = [
        {"anchor": a, "positive": p, "negative": n} for a, p, n in zip(*sets[0].texts_at(rows))
    ]
    student = SentenceTransformer(str(student_dir), device="cpu")
    guide = SentenceTransformer(str(guide_dir), device="cpu")
    if train_len:
        student.max_seq_length = train_len  # sentence-transformers trains at the model's length
    student.train()
    batch = SentenceTransformerDataCollator(student.preprocess, prompts=prompts)(features)
    columns = [
        {k[len(c) + 1 :]: v for k, v in batch.items() if k.startswith(c + "_")}
        for c in ("anchor", "positive", "negative")
    ]
    loss_fn = GISTEmbedLoss(student, guide, temperature=cfg.loss.temperature)
    assert not loss_fn.must_retokenize, "the guide must see the student's own token ids"
    return loss_fn(columns, None).item()


@pytest.mark.parametrize("case", list(CASES))
def test_fidelity(case, guides, data, tmp_path):
    from sentence_transformers import SentenceTransformer

    build, train_len, kind = CASES[case]
    student_dir = tmp_path / "student"
    build(tmp_path).save(str(student_dir))
    guide_dir = guides[kind]
    has_prompts = case == "prompts"
    # Where the model has prompts, the guide sees the prompted text, as it does in
    # sentence-transformers' GISTEmbedLoss (gist-ray's default is the guide's own prompts).
    st_prompts = {"anchor": "query: ", "positive": "passage: ", "negative": "passage: "}
    extra = [f"model.guide_prompts={json.dumps(st_prompts)}"] if has_prompts else []
    cfg, result, exported = _train_one_step(
        student_dir, guide_dir, data, tmp_path / "out", train_len, *extra
    )

    # (a) The same kind of model comes out, and it embeds like the input.
    before = SentenceTransformer(str(student_dir), device="cpu")
    after = SentenceTransformer(str(exported), device="cpu")
    assert _describe(after) == _describe(before)
    for prompt_name in (None, "query", "document"):
        torch.testing.assert_close(
            after.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True),
            before.encode(TEXTS, prompt_name=prompt_name, convert_to_tensor=True),
            rtol=1e-5,
            atol=1e-5,
        )
    if has_prompts:  # the prompt really changes the embedding (so the check above means it)
        q = after.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
        assert not torch.allclose(q, after.encode(TEXTS, convert_to_tensor=True), atol=1e-3)

    # (b) Step 1's loss is sentence-transformers' GISTEmbedLoss on the same batch.
    expected = _st_step1_loss(
        cfg, student_dir, guide_dir, st_prompts if has_prompts else None, train_len
    )
    assert result["losses"][0] == pytest.approx(expected, abs=1e-5, rel=1e-5)


def test_pooling_override_replaces_the_models_pooling(tmp_path):
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.loading import pooling_of
    from gist_ray.models.spec import ModelSpec

    student_dir = tmp_path / "student"
    _cls_dense(tmp_path).save(str(student_dir))
    own = load_encoder(str(student_dir))
    assert pooling_of(own.model) == "cls"
    assert [type(m).__name__ for m in own.model] == ["Transformer", "Pooling", "Dense"]
    mean = load_encoder(ModelSpec(str(student_dir), pooling="mean"))
    assert pooling_of(mean.model) == "mean" and mean.dim == 24
    assert not torch.allclose(mean.encode(TEXTS), own.encode(TEXTS))


def test_plain_transformers_checkpoint_gets_sentence_transformers_defaults(tiny_models):
    from gist_ray.models.encoder import load_encoder

    enc = load_encoder(str(tiny_models["student"]))
    assert [type(m).__name__ for m in enc.model] == ["Transformer", "Pooling"]
    assert enc.model[1].pooling_mode == "mean" and enc.max_seq_length == 64


def test_training_truncation_is_not_the_saved_length(tiny_models, tmp_path):
    from sentence_transformers import SentenceTransformer

    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec

    enc = load_encoder(ModelSpec(str(tiny_models["student"]), max_seq_length=4))
    long = " ".join(["insurance policy coverage"] * 6)
    assert enc.features([long])["input_ids"].shape[1] == 4
    enc.save(tmp_path / "saved")
    assert SentenceTransformer(str(tmp_path / "saved"), device="cpu").max_seq_length == 64
    asked = load_encoder(
        ModelSpec(str(tiny_models["student"]), max_seq_length=4, export_max_seq_length=32)
    )
    asked.save(tmp_path / "asked")
    assert SentenceTransformer(str(tmp_path / "asked"), device="cpu").max_seq_length == 32


# ----------------------------------------------------------------------------- bad input


def _train_cli(tmp_path, capfd, *overrides) -> str:
    """``gist-ray train`` with tiny inputs; returns its one-line error (it must fail before any
    cluster starts and write nothing)."""
    from gist_ray.cli import main

    out = tmp_path / "out"
    args = ["eval.source=", "ray.num_workers=1", f"output_dir={out}", *overrides]
    capfd.readouterr()  # the test's own setup output
    assert main(["train", *sum((["--set", a] for a in args), [])]) == 2
    # The last stderr line (datasets may draw a progress bar before it); while the log file is
    # open the error goes to the terminal's own stream, so capture at the file-descriptor level.
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gist-ray: error: "), err
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written in ([], ["gist-ray.log"]), f"nothing but the log may be written: {written}"
    return err.split(" (full log: ")[0]


def _student_with_module(tmp_path, tiny_models, module_type: str) -> Path:
    from gist_ray.models.encoder import load_encoder

    folder = tmp_path / "odd-student"
    load_encoder(str(tiny_models["student"])).save(folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = module_type
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def test_unimportable_module_names_the_file_and_module(tmp_path, tiny_models, capfd):
    folder = _student_with_module(tmp_path, tiny_models, "my_pkg.modules.FancyPooling")
    err = _train_cli(tmp_path, capfd, f"model.student={folder}")
    assert f"{folder / 'modules.json'}: module 'my_pkg.modules.FancyPooling' cannot be" in err
    assert "(ModuleNotFoundError: No module named 'my_pkg')" in err


def test_unimportable_module_names_the_underlying_error(tmp_path, tiny_models, capfd, monkeypatch):
    """The module exists but one of its own imports fails: the message names that import, not
    only the module (a shadowed package once sent users looking for the wrong thing)."""
    (tmp_path / "fancy_pooling_pkg.py").write_text("import gist_ray_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = _student_with_module(tmp_path, tiny_models, "fancy_pooling_pkg.FancyPooling")
    err = _train_cli(tmp_path, capfd, f"model.student={folder}")
    assert "module 'fancy_pooling_pkg.FancyPooling' cannot be imported" in err
    assert "No module named 'gist_ray_missing_dependency'" in err


def test_remote_code_needs_trust_remote_code_and_says_which_key(tmp_path, tiny_models, capfd):
    import shutil

    from gist_ray.models.encoder import load_encoder

    folder = shutil.copytree(tiny_models["guide"], tmp_path / "custom-guide")
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom-tiny",
        architectures=["CustomModel"],
        auto_map={
            "AutoConfig": "modeling_custom.CustomConfig",
            "AutoModel": "modeling_custom.CustomModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(
        "from transformers import BertConfig, BertModel\n\n\n"
        "class CustomConfig(BertConfig):\n    model_type = 'custom-tiny'\n\n\n"
        "class CustomModel(BertModel):\n    config_class = CustomConfig\n"
    )
    err = _train_cli(
        tmp_path, capfd, f"model.student={tiny_models['student']}", f"model.guide={folder}"
    )
    assert "model.guide = " in err and "set model.guide_trust_remote_code=true" in err
    from gist_ray.models.spec import ModelSpec

    trusted = load_encoder(ModelSpec(str(folder), trust_remote_code=True))
    assert type(trusted.model[0].auto_model).__name__ == "CustomModel"


def test_prompt_for_a_missing_column(tmp_path, tiny_models, tiny_pairs_file, capfd):
    import datasets

    pairs = tmp_path / "pairs"
    datasets.load_dataset("json", data_files=str(tiny_pairs_file), split="train").select_columns(
        ["anchor", "positive"]
    ).save_to_disk(str(pairs))
    err = _train_cli(
        tmp_path,
        capfd,
        f"model.student={tiny_models['student']}",
        f"model.guide={tiny_models['guide']}",
        f"data.train={pairs}",
        'model.prompts={anchor: "query: ", negative: "passage: "}',
    )
    assert "model.prompts: no column 'negative' in dataset 'pairs'" in err
    assert "the columns are anchor, positive" in err


def test_empty_dataset_in_a_list_names_it(tmp_path, tiny_models, tiny_pairs_file, capfd):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _train_cli(
        tmp_path,
        capfd,
        f"model.student={tiny_models['student']}",
        f"data.train=[{tiny_pairs_file}, {empty}]",
    )
    assert "data.train[1] (dataset 'empty'):" in err and "is empty" in err


def test_too_few_unique_texts_for_the_global_batch(tmp_path, tiny_models, capfd):
    data = tmp_path / "faq.jsonl"
    data.write_text(
        "".join(json.dumps({"anchor": "same", "positive": f"a{i % 3}"}) + "\n" for i in range(40))
    )
    err = _train_cli(tmp_path, capfd, f"data.train={data}", "train.batch_size=8")
    assert "dataset 'faq': cannot fill the global batch of epoch 0 with train.batch_size = 8" in err
    assert "without repeating a text (found 1 after" in err


def test_prompts_resolve_like_the_sentence_transformers_trainer():
    from gist_ray.core.errors import ConfigError
    from gist_ray.models.prompts import check_prompt_columns, column_prompts, own_prompts

    three, two = ["anchor", "positive", "negative_1"], ["anchor", "positive"]
    own = own_prompts({"query": "query: ", "passage": "passage: ", "other": "x"})
    assert own == {"anchor": "query: ", "positive": "passage: ", "negative": "passage: "}
    assert column_prompts(None, "a", three, own) == {
        "anchor": "query: ",
        "positive": "passage: ",
        "negative_1": "passage: ",
    }
    assert column_prompts({}, "a", three, own) == {}  # {} = no prompts
    assert column_prompts("p: ", "a", two, own) == {"anchor": "p: ", "positive": "p: "}
    nested = {"a": {"anchor": "qa: "}, "b": {"negative": "nb: "}}
    assert column_prompts(nested, "b", three, own) == {"negative_1": "nb: "}
    assert column_prompts(nested, "c", three, own) == {}  # datasets not named get none
    # A {column: prompt} shared by datasets needs the column in one of them...
    check_prompt_columns({"negative": "n: "}, "model.prompts", {"a": two, "b": three})
    with pytest.raises(ConfigError, match="model.prompts: no column 'query' in any dataset"):
        check_prompt_columns({"query": "q: "}, "model.prompts", {"a": two, "b": three})
    # ... a per-dataset one, in that dataset.
    with pytest.raises(ConfigError, match="model.prompts.a: no column 'negative' in dataset 'a'"):
        check_prompt_columns({"a": {"negative": "n"}}, "model.prompts", {"a": two, "b": three})
