"""`gist-ray eval` end to end on tiny random BERTs and a tiny BEIR folder, and its bad input."""

import csv
import json

import pytest

from gist_ray.cli import main
from tests.conftest import make_sentences


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir-cli")
    queries, docs = make_sentences(6, 11), make_sentences(12, 12)
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(queries))
    )
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )
    (root / "qrels").mkdir()
    # two judgements name things that do not exist: counted, reported with their line, skipped
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"q{i}\td{i}\t1\n" for i in range(6))
        + "q1\td99\t1\nq42\td1\t1\n"
    )
    sts = root / "sts.csv"
    with open(sts, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence1", "sentence2", "score"])
        w.writerows((q, d, i % 5) for i, (q, d) in enumerate(zip(queries, docs)))
    return root


def test_eval_writes_json_and_compares(beir, tiny_models, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = [str(tiny_models["student"]), "--data", str(beir), "--sts", str(beir / "sts.csv")]
    rc = main(
        [
            "eval",
            *args,
            "--compare",
            str(tiny_models["guide"]),
            "--max-seq-length",
            "32",
            "--batch-size",
            "4",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    a, b = res["models"]
    for m in (a, b):
        assert set(m["retrieval"]) >= {
            "ndcg@10",
            "recall@1",
            "recall@10",
            "recall@100",
            "mrr@10",
            "map@100",
        }
        assert m["retrieval"]["num_queries"] == 6
        assert 0 <= m["retrieval"]["ndcg@10"] <= 1
        assert set(m["sts"]) == {"spearman", "pearson", "pairs"}
    assert res["eval"]["retrieval"]["documents"] == 12
    assert res["diff"]["retrieval"]["ndcg@10"] == pytest.approx(
        a["retrieval"]["ndcg@10"] - b["retrieval"]["ndcg@10"]
    )
    assert res["diff"]["sts"]["spearman"] == pytest.approx(
        a["sts"]["spearman"] - b["sts"]["spearman"]
    )
    notes = res["eval"]["retrieval"]["notes"]
    assert len(notes) == 1 and "ignored 2 qrels" in notes[0] and "line 8" in notes[0]
    captured = capsys.readouterr()
    table = captured.out
    # side by side: A, B and the difference, for retrieval and STS
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "A", "B", "diff"]
    row = next(line for line in table.splitlines() if line.startswith("ndcg@10"))
    va, vb, d = (float(x) for x in row.split()[1:])
    assert va == pytest.approx(a["retrieval"]["ndcg@10"], abs=1e-4)
    assert d == pytest.approx(va - vb, abs=2e-4)
    assert "spearman" in table and "diff = A - B" in table
    assert table.rstrip().splitlines()[-1] == f"results: {out.resolve()}"  # where they went
    assert "ignored 2 qrels" in captured.err and "line 8" in captured.err


def test_eval_matryoshka_widths(beir, tiny_models, tmp_path, capsys):
    """``--dims``: a table section and JSON entries per width, with the comparison's diff."""
    out = tmp_path / "dims.json"
    model, guide = str(tiny_models["student"]), str(tiny_models["guide"])
    rc = main(["eval", model, "--data", str(beir), "--compare", guide, "--dims", "16", "8",
               "--max-seq-length", "32", "--output", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    a, b = res["models"]
    for w in (16, 8):
        assert 0 <= a[f"retrieval_dim_{w}"]["ndcg@10"] <= 1
        assert res["diff"][f"retrieval_dim_{w}"]["ndcg@10"] == pytest.approx(
            a[f"retrieval_dim_{w}"]["ndcg@10"] - b[f"retrieval_dim_{w}"]["ndcg@10"]
        )
    table = capsys.readouterr().out
    assert "Retrieval at 16 dims (truncated, re-normalised)" in table
    assert "Retrieval at 8 dims" in table
    rc = main(["eval", model, "--data", str(beir), "--dims", "64"])  # the student has 32
    assert rc == 2
    assert "Matryoshka width 64 is not in 1..32" in capsys.readouterr().err


def test_eval_single_model_sts_only(beir, tiny_models, capsys):
    rc = main(["eval", str(tiny_models["student"]), "--sts", str(beir / "sts.csv")])
    assert rc == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "STS on" in out and "Retrieval" not in out and "diff" not in out
    assert "results: the table above only; --output FILE" in captured.err  # nothing written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sts", "{root}/noscore.csv"], "noscore.csv: no column 'score'"),
        (["--data", "{root}/empty"], "eval set is empty"),
        (["--data", "{root}", "--compare", "{root}/nomodel"], "nomodel' does not exist"),
        (["--data", "{root}", "--compare", "{root}/qrels"], "--compare = "),
        (["--data", "{root}", "--max-queries", "-1"], "--max-queries = -1"),
    ],
)
def test_eval_bad_input_is_one_line(beir, tiny_models, capsys, extra, message):
    (beir / "noscore.csv").write_text("sentence1,sentence2\na,b\n")
    empty = beir / "empty"
    empty.mkdir(exist_ok=True)
    for name in ("queries.jsonl", "corpus.jsonl", "qrels.tsv"):
        (empty / name).write_text("")
    rc = main(["eval", str(tiny_models["student"]), *(e.format(root=beir) for e in extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("gist-ray: error: ") and message in err[-1], err


def test_the_diff_column_shows_no_negative_zero():
    from gist_ray.commands.eval import SHOWN, format_table

    a = {k: 0.5 for k in SHOWN}
    b = {k: 0.5 + 1e-7 for k in SHOWN}  # A - B = -1e-7: rounds to zero
    b["ndcg@10"] = 0.25
    result = {
        "eval": {"retrieval": {"name": "x (split test)", "queries": 3, "documents": 9}},
        "models": [
            {"model": "A", "pooling": "mean", "seconds": 1.0, "retrieval": a},
            {"model": "B", "pooling": "mean", "seconds": 1.0, "retrieval": b},
        ],
    }
    table = format_table(result)
    assert "-0.0000" not in table and "+0.0000" in table
    assert table.splitlines()[0] == "Retrieval on x (split test): 3 queries, 9 documents"
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("ndcg@10")] == [
        "+0.2500"
    ]
