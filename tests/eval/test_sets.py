"""load_eval: the built-in InsuranceQA test/valid splits and BEIR folders, and every bad input."""

import json

import pytest

from gist_ray.core.errors import DataError
from gist_ray.eval.sets import EvalSet, load_eval


def test_builtin_insuranceqa_eval():
    import insuranceqa_data

    ev = load_eval("insuranceqa", split="test", max_queries=50, max_corpus=300, seed=0)
    assert isinstance(ev, EvalSet) and len(ev.queries) == 50
    assert len(ev.corpus) <= 300 and set(ev.qrels) == set(ev.queries)
    assert all(d in ev.corpus for rel in ev.qrels.values() for d in rel)
    assert all("  " not in t for t in list(ev.queries.values()) + list(ev.corpus.values()))
    again = load_eval("insuranceqa", split="test", max_queries=50, max_corpus=300, seed=0)
    assert (again.queries, again.corpus) == (ev.queries, ev.corpus)
    assert ev.name == "insuranceqa (split test)"
    train_questions = {" ".join(v["en"].split()) for v in insuranceqa_data.load_train().values()}
    assert not train_questions & set(ev.queries.values())  # held out from training
    # positives are always kept, even past max_corpus
    small = load_eval("insuranceqa", split="valid", max_queries=20, max_corpus=5)
    assert set(small.corpus) == {d for rel in small.qrels.values() for d in rel}
    with pytest.raises(DataError, match="eval split 'train' is not one of: test, valid"):
        load_eval("insuranceqa", split="train")


# ----------------------------------------------------------------------------- BEIR folders


def beir(tmp_path, qrels_lines, qrels_name="qrels/test.tsv"):
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    queries = [{"_id": "q1", "text": "cats purr"}, {"_id": "q2", "text": "stock market"}]
    corpus = [
        {"_id": "d1", "title": "Cats", "text": "they purr"},
        {"_id": "d2", "text": "market fell"},
        {"_id": "d3", "title": "", "text": "guitars"},
    ]
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / qrels_name).write_text("query-id\tcorpus-id\tscore\n" + "".join(qrels_lines))
    return str(root)


def test_beir_folder(tmp_path, caplog):
    root = beir(tmp_path, ["q1\td1\t1\n", "q2\td2\t2\n", "q9\td1\t1\n", "q1\td9\t1\n"])
    ev = load_eval(root, split="test")
    assert ev.queries == {"q1": "cats purr", "q2": "stock market"}
    assert ev.corpus == {"d1": "Cats they purr", "d2": "market fell", "d3": "guitars"}
    assert ev.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}
    assert "ignored 2 qrels naming unknown queries or documents" in ev.notes[0]
    # the name says which folder and which split, not a folder <root>/test that is not there
    assert ev.name == f"{root} (split test)"
    assert len(load_eval(root, max_queries=1, max_corpus=1).corpus) == 1  # its positive only
    flat = beir(tmp_path / "flat", ["q1\td3\t1\n"], qrels_name="qrels.tsv")
    flat_set = load_eval(flat, split="dev")
    assert flat_set.qrels == {"q1": {"d3": 1}}
    assert flat_set.name == flat  # one qrels.tsv: no split to name


def test_beir_bad_input(tmp_path):
    with pytest.raises(DataError, match="nope does not exist"):
        load_eval(str(tmp_path / "nope"))
    root = beir(tmp_path, ["q1\td1\t0\n"])
    with pytest.raises(DataError, match="eval set is empty"):
        load_eval(root)
    with pytest.raises(DataError, match=r"lacks qrels/dev.tsv or qrels.tsv"):
        load_eval(root, split="dev")
    (tmp_path / "beir" / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(DataError, match=r"test.tsv line 2: need query-id, corpus-id"):
        load_eval(root)
    (tmp_path / "beir" / "queries.jsonl").write_text('{"_id": "q1"}\n')
    with pytest.raises(
        DataError, match=r"queries.jsonl line 1: need a JSON object with _id and text"
    ):
        load_eval(root)
    (tmp_path / "beir" / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"queries.jsonl line 2: not valid JSON"):
        load_eval(root)


# ----------------------------------------------------------------------------- writing


def test_held_out_rows_written_as_beir_read_back(tmp_path):
    from gist_ray.eval.sets import held_out_set, write_beir

    anchors = ["cats purr", "stock market", "cats  purr", "guitars"]
    positives = ["they purr", "market fell", "with the larynx", "six strings"]
    negatives = [["market fell", "dogs bark", None, "  "]]  # repeats and blanks are not docs
    ev = held_out_set(anchors, positives, negatives, eval_rows=[0, 2, 3])
    assert ev.queries == {"q1": "cats purr", "q2": "guitars"}  # one query per anchor
    assert ev.corpus == {
        "d1": "they purr", "d2": "market fell", "d3": "dogs bark", "d4": "with the larynx",
        "d5": "six strings",
    }  # fmt: skip
    assert ev.qrels == {"q1": {"d1": 1, "d4": 1}, "q2": {"d5": 1}}
    folder = write_beir(tmp_path / "heldout", ev)
    assert (folder / "qrels" / "test.tsv").read_text() == (
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td4\t1\nq2\td5\t1\n"
    )
    assert json.loads((folder / "corpus.jsonl").read_text().splitlines()[0]) == {
        "_id": "d1",
        "text": "they purr",
    }
    back = load_eval(str(folder), "test", None, None)
    assert (back.queries, back.corpus, back.qrels) == (ev.queries, ev.corpus, ev.qrels)
    assert back.name == f"{folder} (split test)"
