"""STS: correlations against scipy and hand values; file loading and its one-line errors."""

import json

import pytest
import torch

from gist_ray.core.errors import DataError
from gist_ray.eval.sts import StsSet, load_sts, pearson, spearman, sts_metrics


def test_pearson_and_spearman_hand_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    # monotone but not linear: Spearman 1, Pearson below 1
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert pearson(x, x**3) < 0.99
    # ties share the mean rank: y ranks (1.5, 1.5, 3, 4) against x ranks (1, 2, 3, 4)
    y = torch.tensor([5.0, 5.0, 6.0, 7.0])
    rx, ry = torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.5, 1.5, 3, 4])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert spearman(x, y) == pytest.approx(float(rx @ ry / (rx.norm() * ry.norm())))
    assert torch.isnan(torch.tensor(pearson(x, torch.ones(4))))  # constant: undefined


def test_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
    y[::7] = y[0]  # some ties
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-10)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-10)


def test_sts_metrics_on_a_known_encoder():
    # one-hot "embeddings": identical sentences score 1, different ones 0
    vocab = {"a": 0, "b": 1, "c": 2}

    def encode(texts):
        return torch.nn.functional.one_hot(torch.tensor([vocab[t] for t in texts]), 3).float()

    sts = StsSet(["a", "a", "b", "c"], ["a", "b", "b", "a"], [5.0, 1.0, 4.0, 0.0])
    m = sts_metrics(encode, sts, batch_size=2)
    cos = torch.tensor([1.0, 0.0, 1.0, 0.0])
    gold = torch.tensor(sts.scores)
    assert m["pairs"] == 4
    assert m["pearson"] == pytest.approx(pearson(cos, gold))
    assert m["spearman"] == pytest.approx(spearman(cos, gold))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_load_sts_formats(tmp_path, suffix):
    rows = [("a cat", "a kitten", 4.5), ("a car", "the sea", 0.0)]
    path = tmp_path / f"sts{suffix}"
    if suffix == ".jsonl":
        path.write_text(
            "".join(
                json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in rows
            )
        )
    else:
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(
            sep.join(["sentence1", "sentence2", "score"])
            + "\n"
            + "".join(sep.join([a, b, str(s)]) + "\n" for a, b, s in rows)
        )
    sts = load_sts(path)
    assert sts.sentence1 == ["a cat", "a car"] and sts.scores == [4.5, 0.0]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("noscore.csv", "sentence1,sentence2\na,b\n", r"noscore.csv: no column 'score'"),
        ("bad.csv", "sentence1,sentence2,score\na,b,1\nc,d,high\n", r"bad.csv line 3: score"),
        ("blank.csv", "sentence1,sentence2,score\na,,1\n", r"blank.csv line 2: sentence2"),
        ("empty.csv", "sentence1,sentence2,score\n", r"empty.csv is empty"),
        (
            "rows.jsonl",
            '{"sentence1":"a","sentence2":"b","score":1}\n{"sentence1":"a"}\n',
            r"rows.jsonl line 2: no sentence2",
        ),
        ("junk.jsonl", "{not json\n", r"junk.jsonl line 1: not valid JSON"),
        ("x.parquet", "", r"unsupported type"),
    ],
)
def test_load_sts_bad_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        load_sts(path)
    assert "\n" not in str(err.value)


def test_missing_sts_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_sts(tmp_path / "nope.csv")
