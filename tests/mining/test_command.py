"""``gist-ray mine`` end to end on tiny models: what it writes, against a plain reference; that
training takes it; resume, atomicity, reuse, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from gist_ray.cli import main
from gist_ray.commands import mine as command
from gist_ray.config import load_config
from gist_ray.core.errors import ConfigError
from gist_ray.data.training import load_training_sets
from gist_ray.guide.source import live_guide_embeddings, load_guide
from gist_ray.mining import output
from gist_ray.mining.guide import guide_embeddings_for
from gist_ray.mining.select import Rule
from gist_ray.models.prompts import guide_prompts
from gist_ray.train.checkpoint import LocalReporter
from tests.conftest import make_sentences, run_worker
from tests.mining.test_search_select import reference

ROWS = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A jsonl file with an extra column, the data's own negatives, and a repeated anchor with
    a second positive; its guide cache is built by the first test and reused after."""
    root = tmp_path_factory.mktemp("mine")
    a, p, n = (make_sentences(ROWS, 11 + i) for i in range(3))
    a[5] = a[4]
    path = root / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "anchor": x, "positive": y, "negative": z}) + "\n"
            for i, (x, y, z) in enumerate(zip(a, p, n))
        )
    )
    return path


@pytest.fixture(autouse=True)
def _cache_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GIST_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _overrides(tiny_models, data, out, *extra):
    return [
        f"model.student={tiny_models['student']}",
        f"model.guide={tiny_models['guide']}",
        "model.max_seq_length=32",
        f"data.train={data}",
        "data.max_examples=0",
        "ray.num_workers=1",
        f"output_dir={out}",
        "mine.k=3",
        "mine.backend=torch",
        *extra,
    ]


def _cfg(tiny_models, data, out, *extra):
    return load_config(overrides=_overrides(tiny_models, data, out, *extra))


def _rows(path):
    builder = {".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()


def _expected(cfg, rule: Rule):
    """The plain reference over the cached guide embeddings: row -> negative texts."""
    sets = load_training_sets(cfg)
    emb = guide_embeddings_for(cfg, sets)[0]
    anchors, positives = sets[0].column_texts()["anchor"], sets[0].column_texts()["positive"]
    corpus_texts = list(dict.fromkeys(positives))
    first = [positives.index(t) for t in corpus_texts]
    corpus = F.normalize(emb["positive"][first], dim=-1)
    a = F.normalize(emb["anchor"], dim=-1)
    own = [
        sorted({corpus_texts.index(p) for x, p in zip(anchors, positives) if x == anchor})
        for anchor in anchors
    ]
    pos = torch.stack([(corpus[ids] @ a[r]).min() for r, ids in enumerate(own)])
    chosen = reference(a, corpus, own, pos, rule)
    return {r: [corpus_texts[i] for i in ids] for r, ids in enumerate(chosen)}, own


@pytest.mark.parametrize("shortfall", ["drop", "fill"])
def test_mined_file_matches_the_reference_and_keeps_the_data(
    tiny_models, data, tmp_path, shortfall
):
    cfg = _cfg(
        tiny_models,
        data,
        tmp_path,
        "mine.threshold=margin",
        "mine.margin=0.01",
        f"mine.shortfall={shortfall}",
    )
    [summary] = command.mine(cfg)
    want, own = _expected(cfg, Rule(k=3, threshold="margin", margin=0.01, fill=shortfall == "fill"))
    rows = _rows(tmp_path / "pairs-mined.jsonl")
    full = [r for r, negs in want.items() if len(negs) == 3]
    assert summary.written == len(rows) == len(full) and summary.dropped == ROWS - len(full)
    assert 0 < len(full), "the reference keeps some rows"
    if shortfall == "drop":
        assert summary.dropped > 0, "the margin is strict enough to leave rows short"
    source = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        r = row["id"]  # the extra column survives; the data's own negative does not
        assert set(row) == {"id", "anchor", "positive", "negative_1", "negative_2", "negative_3"}
        assert (row["anchor"], row["positive"]) == (source[r]["anchor"], source[r]["positive"])
        assert [row[f"negative_{j}"] for j in (1, 2, 3)] == want[r]
        positives = {
            source[i]["positive"] for i in range(ROWS) if source[i]["anchor"] == row["anchor"]
        }
        assert not positives & set(want[r]), "a positive of the anchor mined as a negative"


def test_mine_then_train_on_it(tiny_models, data, tmp_path, caplog):
    cfg = _cfg(tiny_models, data, tmp_path / "mine", "mine.shortfall=fill", "mine.perc=0.99")
    [summary] = command.mine(cfg)
    assert summary.written == ROWS and summary.filled > 0
    out = tmp_path / "mine" / "pairs-mined.jsonl"
    train = load_config(
        overrides=[
            *_overrides(tiny_models, out, tmp_path / "train"),
            # mined negatives are other rows' positives: no-duplicate batches must stay small
            "train.batch_size=4",
            "train.max_steps=2",
            "train.checkpoint_every=100",
        ]
    )
    sets = load_training_sets(train)
    assert list(sets[0].column_texts()) == [
        "anchor",
        "positive",
        "negative_1",
        "negative_2",
        "negative_3",
    ]
    caplog.clear()
    result = run_worker(train, LocalReporter(tmp_path / "train"))
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert "guide cache of 'pairs-mined' loaded" in caplog.text, "mine wrote the file's cache"
    # ... and it holds what the guide computes for those texts
    seeded = guide_embeddings_for(train, sets)[0]
    guide, prompts = load_guide(train, torch.device("cpu")), guide_prompts(train, sets)[0]
    for col, texts in sets[0].column_texts().items():
        live = live_guide_embeddings(guide, [texts], [prompts.get(col)])[0]
        # the cache holds unit vectors in data.guide_cache_dtype (float16 by default)
        unit = torch.nn.functional.normalize(live.float(), dim=-1)
        torch.testing.assert_close(seeded[col], unit, atol=2e-3, rtol=0)


def test_resume_after_an_interruption_gives_the_same_output(
    tiny_models, data, tmp_path, monkeypatch
):
    extra = ("mine.part_rows=16", "mine.threshold=none")
    whole = tmp_path / "whole"
    command.mine(_cfg(tiny_models, data, whole, *extra))
    calls, real = [], command.mine_part

    def dies_after_two(*args, **kwargs):
        calls.append(args[5])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C between parts
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "mine_part", dies_after_two)
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        command.mine(_cfg(tiny_models, data, broken, *extra))
    out = broken / "pairs-mined.jsonl"
    assert not out.exists() and not Path(output.sidecar(out)).exists(), "no complete-looking"
    assert len(list(Path(output.parts_dir(out)).glob("part-*.parquet"))) == 2
    calls.clear()
    [summary] = command.mine(_cfg(tiny_models, data, broken, *extra))
    assert calls == [32, 48], "resumed at the third part"
    assert out.read_bytes() == (whole / "pairs-mined.jsonl").read_bytes()
    assert not Path(output.parts_dir(out)).exists()
    calls.clear()
    [again] = command.mine(_cfg(tiny_models, data, broken, *extra))
    assert again.reused and calls == [] and again.written == summary.written


def test_changed_settings_mine_again_and_foreign_files_are_kept(tiny_models, data, tmp_path):
    command.mine(_cfg(tiny_models, data, tmp_path, "mine.threshold=none"))
    out = tmp_path / "pairs-mined.jsonl"
    [s] = command.mine(_cfg(tiny_models, data, tmp_path, "mine.threshold=none", "mine.k=2"))
    assert not s.reused and "negative_3" not in _rows(out)[0]
    out.write_text(out.read_text().replace("a", "b"))  # edited by the user
    with pytest.raises(ConfigError, match="changed after gist-ray mined it"):
        command.mine(_cfg(tiny_models, data, tmp_path, "mine.threshold=none"))
    other = tmp_path / "mine.csv"
    other.write_text("anchor,positive\nx,y\n")
    with pytest.raises(ConfigError, match=r"mine.output = .* was not written by gist-ray mine"):
        command.mine(_cfg(tiny_models, data, tmp_path, f"mine.output={other}"))
    assert other.read_text() == "anchor,positive\nx,y\n"


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_output_keeps_the_input_format(tiny_models, data, tmp_path, suffix):
    ds = datasets.load_dataset("json", data_files=str(data), split="train").select(range(24))
    src = tmp_path / f"pairs{suffix}"
    ds.to_csv(str(src), index=False) if suffix == ".csv" else ds.to_parquet(str(src))
    [s] = command.mine(_cfg(tiny_models, src, tmp_path / "out", "mine.threshold=none"))
    assert (
        s.output.endswith(f"pairs-mined{suffix}")
        and len(_rows(tmp_path / "out" / f"pairs-mined{suffix}")) == 24
    )


def _cli(tiny_models, data, out, capfd, *extra, args=()):
    sets = sum((["--set", o] for o in _overrides(tiny_models, data, out, *extra)), [])
    code = main(["mine", *sets, *args])
    return code, capfd.readouterr()


def test_cli_mines_and_prints_the_next_step(tiny_models, data, tmp_path, capfd):
    out = tmp_path / "neg.parquet"
    code, io = _cli(
        tiny_models,
        data,
        tmp_path,
        capfd,
        "mine.threshold=none",
        args=("--k", "2", "--out", str(out)),
    )  # --k and --out win over mine.k and mine.output
    assert code == 0, io
    assert "written 64" in io.out and f"next: gist-ray train --set data.train={out}" in io.out
    assert [c for c in _rows(out)[0] if c.startswith("negative")] == ["negative_1", "negative_2"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "mine.k=64",
            "mine.k = 64 is larger than the corpus of dataset 'pairs': 64 unique positives",
        ),
        (
            "mine.threshold=top",
            "mine.threshold = 'top' is not allowed; one of perc_pos, margin, none",
        ),
        ("mine.perc=0", "mine.perc = 0.0 is not allowed; must be in (0, 1]"),
        ("mine.perc=1.5", "mine.perc = 1.5 is not allowed; must be in (0, 1]"),
        (
            "mine.output=/proc/version/x.jsonl",
            "mine.output = '/proc/version/x.jsonl': cannot write",
        ),
        ("mine.output=x.txt", "mine.output = 'x.txt': unsupported file type '.txt'"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(tiny_models, data, tmp_path, capfd, setting, message):
    code, io = _cli(tiny_models, data, tmp_path, capfd, setting)
    lines = [line for line in (io.out + io.err).splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and message in lines[0], io


def test_several_datasets_each_get_their_own_output_and_cache(tiny_models, data, tmp_path, caplog):
    csv = tmp_path / "more.csv"
    datasets.load_dataset("json", data_files=str(data), split="train").select(
        range(20)
    ).rename_columns({"anchor": "question", "positive": "answer", "negative": "wrong"}).to_csv(
        str(csv), index=False
    )
    cols = {"anchor": "question", "positive": "answer", "negative": "wrong"}
    train = {"first": str(data), "second": {"source": str(csv), "columns": cols}}
    cfg = _cfg(tiny_models, data, tmp_path / "out", "mine.threshold=none", f"data.train={train}")
    first, second = command.mine(cfg)
    assert (first.dataset, first.written, second.dataset, second.written) == (
        "first",
        64,
        "second",
        20,
    )
    row = _rows(tmp_path / "out" / "second-mined.csv")[0]
    assert set(row) == {"id", "question", "answer", "negative_1", "negative_2", "negative_3"}
    assert caplog.text.count("(training on it runs no guide)") == 2
    with pytest.raises(ConfigError, match="mine.output names one file but data.train has several"):
        command.mine(_cfg(tiny_models, data, tmp_path, f"data.train={train}", "mine.output=x.csv"))
