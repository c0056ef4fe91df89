"""The guide cache: built once, fingerprinted, atomic, and exact."""

from __future__ import annotations

import pytest
import torch

from gist_ray import guide_cache
from gist_ray.checkpoint import LocalReporter
from gist_ray.config import load_config
from gist_ray.train import train_worker


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GIST_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _cfg(tiny_models, data_file, out, *extra):
    return load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            f"model.guide={tiny_models['guide']}",
            "model.max_seq_length=32",
            f"data.train={data_file}",
            "data.max_examples=0",
            "train.batch_size=16",
            "train.max_steps=3",
            "train.checkpoint_every=100",
            "ray.num_workers=1",
            f"output_dir={out}",
            *extra,
        ]
    )


def test_training_with_cache_equals_live_guide(tiny_models, tiny_pairs_file, cache_env):
    live = train_worker(
        _cfg(tiny_models, tiny_pairs_file, cache_env / "live", "data.guide_cache=false"),
        LocalReporter(cache_env / "live"),
    )
    cached = train_worker(
        _cfg(tiny_models, tiny_pairs_file, cache_env / "cached"),
        LocalReporter(cache_env / "cached"),
    )
    assert len(live["losses"]) == len(cached["losses"]) == 3
    torch.testing.assert_close(
        torch.tensor(cached["losses"]), torch.tensor(live["losses"]), rtol=1e-5, atol=1e-6
    )
    files = list((tiny_pairs_file.parent / ".gist-ray-guide-cache").glob("*.safetensors"))
    assert files, "the cache is stored beside the dataset"
    assert not list(files[0].parent.glob(".*tmp")), "temporary file left behind"


def _columns():
    return {"anchor": ["a b", "c d", "a b"], "positive": ["e f", "g h", "i j"]}


class _CountingGuide:
    """Stands in for an Encoder in compute(): deterministic embeddings, counts its calls."""

    dim = 4

    def __init__(self):
        self.calls = 0

    def encode(self, texts, prompt=None, batch_size=64):
        self.calls += 1
        return torch.stack(
            [
                torch.tensor([len(t), t.count("a"), len(prompt or ""), float(hash(t) % 7)])
                for t in texts
            ]
        )


SETTINGS = {"revision": "", "model_kwargs": {}, "pooling": "own", "max_seq_length": 32}


def test_cache_is_reused_then_rebuilt_on_mismatch_or_truncation(tiny_models, tmp_path, capsys):
    guide = _CountingGuide()
    model_dir = str(tiny_models["guide"])
    args = ("insuranceqa-test", model_dir, SETTINGS)

    first, path, built = guide_cache.get_or_build(lambda: guide, *args, _columns(), {}, tmp_path)
    assert built and guide.calls == 1 and path.is_file()
    torch.testing.assert_close(first["anchor"][0], first["anchor"][2])  # same text, same row

    again, path2, built2 = guide_cache.get_or_build(lambda: guide, *args, _columns(), {}, tmp_path)
    assert not built2 and path2 == path and guide.calls == 1
    torch.testing.assert_close(again["positive"], first["positive"])

    # Another max length is another fingerprint: another file, built fresh.
    longer = {**SETTINGS, "max_seq_length": 64}
    _, path3, built3 = guide_cache.get_or_build(
        lambda: guide, "insuranceqa-test", model_dir, longer, _columns(), {}, tmp_path
    )
    assert built3 and path3 != path

    # Other prompts too; and the same text under two prompts gets two embeddings.
    prompts = {"anchor": "query: "}
    with_prompts, path4, built4 = guide_cache.get_or_build(
        lambda: guide, *args, _columns(), prompts, tmp_path
    )
    assert built4 and path4 not in (path, path3)
    assert with_prompts["anchor"][0, 2] == len("query: ") and with_prompts["positive"][0, 2] == 0

    # A file whose metadata belongs to other texts is never used.
    other = {"anchor": ["x"] * 3, "positive": ["y"] * 3}
    fp_other = guide_cache.fingerprint(model_dir, SETTINGS, other, {})
    guide_cache.save(path, fp_other, guide_cache.compute(guide, other, {}))
    calls = guide.calls
    _, _, rebuilt = guide_cache.get_or_build(lambda: guide, *args, _columns(), {}, tmp_path)
    assert rebuilt and guide.calls == calls + 1
    assert "another guide or dataset" in capsys.readouterr().out

    # A truncated file is detected and rebuilt.
    path.write_bytes(path.read_bytes()[:40])
    _, _, rebuilt = guide_cache.get_or_build(lambda: guide, *args, _columns(), {}, tmp_path)
    assert rebuilt
    assert "truncated or corrupt" in capsys.readouterr().out


def test_compute_embeds_each_prompt_and_text_pair_once():
    guide = _CountingGuide()
    columns = {"anchor": ["a b", "a b", "c"], "positive": ["a b", "d", "c"]}
    out = guide_cache.compute(guide, columns, {"anchor": "q: "})
    # "a b" as an anchor (with the prompt) differs from "a b" as a positive (without).
    assert out["anchor"][0, 2] == 3 and out["positive"][0, 2] == 0
    torch.testing.assert_close(out["anchor"][0], out["anchor"][1])


def test_fingerprint_tracks_the_guide_files_settings_and_prompts(tiny_models, tmp_path):
    import shutil

    cols = _columns()
    a = guide_cache.fingerprint(str(tiny_models["guide"]), SETTINGS, cols, {})
    b = guide_cache.fingerprint(str(tiny_models["student"]), SETTINGS, cols, {})
    c = guide_cache.fingerprint(str(tiny_models["guide"]), {**SETTINGS, "pooling": "cls"}, cols, {})
    d = guide_cache.fingerprint(str(tiny_models["guide"]), SETTINGS, cols, {"anchor": "q: "})
    assert a["guide"] != b["guide"] and len({str(x) for x in (a, c, d)}) == 3
    # The module stack counts: a changed module folder (e.g. 2_Dense) is another guide.
    copy = shutil.copytree(tiny_models["guide"], tmp_path / "guide")
    (copy / "2_Dense").mkdir()
    (copy / "2_Dense" / "config.json").write_text('{"out_features": 8}')
    e = guide_cache.fingerprint(str(copy), SETTINGS, cols, {})
    assert e["guide"] != a["guide"]


def test_cache_guide_command_on_ray(ray_cluster, tiny_models, tmp_path):
    """`gist-ray cache-guide` shards the guide over 2 Ray workers and writes one valid file."""
    import json

    from gist_ray.cli import main
    from tests.conftest import make_sentences

    data = tmp_path / "pairs.jsonl"
    rows = zip(make_sentences(20, 5), make_sentences(20, 6))
    data.write_text("".join(json.dumps({"anchor": a, "positive": p}) + "\n" for a, p in rows))
    args = [
        f"model.guide={tiny_models['guide']}",
        "model.max_seq_length=32",
        f"data.train={data}",
        "data.max_examples=0",
        "train.batch_size=4",
        "ray.num_workers=2",
        f"output_dir={tmp_path / 'out'}",
    ]
    assert main(["cache-guide", *sum((["--set", a] for a in args), [])]) == 0
    (path,) = (tmp_path / ".gist-ray-guide-cache").glob("*.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    assert set(tensors) == {"anchor", "positive"}
    assert tensors["anchor"].shape == (20, 48)
    # The shards gathered from the two workers land on the right rows.
    from gist_ray.models import ModelSpec, load_encoder

    guide = load_encoder(ModelSpec(str(tiny_models["guide"]), max_seq_length=32), frozen=True)
    direct = guide.encode(make_sentences(20, 6))
    torch.testing.assert_close(tensors["positive"], direct, rtol=1e-4, atol=1e-5)
    direct = guide.encode(make_sentences(20, 5))
    torch.testing.assert_close(tensors["anchor"], direct, rtol=1e-4, atol=1e-5)
