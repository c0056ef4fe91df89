"""load_pairs on real files, the built-in InsuranceQA source, and every bad input."""

import json

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest

from gist_ray.core.errors import DataError
from gist_ray.data.training import load_pairs

ROWS = [
    {"question": "how do cats purr", "answer": "with their larynx", "wrong": "by singing", "id": 1},
    {
        "question": "what is term life",
        "answer": "cover for a fixed term",
        "wrong": "a car",
        "id": 2,
    },
    {"question": "is rain wet", "answer": "yes, rain is water", "wrong": "it is dry", "id": 3},
]
MAPPING = {"anchor": "question", "positive": "answer", "negative": "wrong"}


def write(path, rows):
    """Write rows in the format named by the file's suffix."""
    df = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path)
    return str(path)


def expect(match, source, **kw):
    with pytest.raises(DataError, match=match) as e:
        load_pairs(source, **kw)
    assert "\n" not in str(e.value)  # one line, for the CLI
    return str(e.value)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_files_with_column_mapping(tmp_path, suffix):
    ds = load_pairs(write(tmp_path / f"d{suffix}", ROWS), columns=MAPPING)
    assert ds.column_names == ["anchor", "positive", "negative_1"]  # extras (id) dropped
    assert ds[1] == {
        "anchor": "what is term life",
        "positive": "cover for a fixed term",
        "negative_1": "a car",
    }


def test_canonical_columns_need_no_mapping_and_keep_numbered_negatives(tmp_path):
    rows = [{"anchor": "a", "positive": "p", "negative_2": "n2", "negative_1": "n1", "x": 1}]
    ds = load_pairs(write(tmp_path / "c.jsonl", rows))
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert ds[0]["negative_2"] == "n2"
    ds = load_pairs(
        write(tmp_path / "n.jsonl", [{"anchor": "a", "positive": "p", "negative": "n"}])
    )
    assert ds.column_names == ["anchor", "positive", "negative_1"]


def test_swapped_mapping(tmp_path):
    ds = load_pairs(
        write(tmp_path / "s.csv", [{"anchor": "x", "positive": "y"}]),
        columns={"anchor": "positive", "positive": "anchor"},
    )
    assert ds[0] == {"anchor": "y", "positive": "x"}


def test_save_to_disk_folders(tmp_path):
    data = {"anchor": ["a1", "a2"], "positive": ["p1", "p2"]}
    datasets.Dataset.from_dict(data).save_to_disk(tmp_path / "one")
    assert load_pairs(str(tmp_path / "one"))["positive"] == ["p1", "p2"]
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(data),
        dev=datasets.Dataset.from_dict({"anchor": ["x"], "positive": ["y"]}),
    )
    dd.save_to_disk(tmp_path / "dict")
    assert len(load_pairs(str(tmp_path / "dict"))) == 2
    assert load_pairs(str(tmp_path / "dict"), split="dev")["anchor"] == ["x"]
    expect(r"dict: no split 'test'; splits are: train, dev", str(tmp_path / "dict"), split="test")


def test_max_examples_takes_first_rows(tmp_path):
    rows = ROWS + [{"question": "bad", "answer": None, "wrong": "w", "id": 4}]
    path = write(tmp_path / "m.jsonl", rows)
    ds = load_pairs(path, columns=MAPPING, max_examples=2)
    assert ds["anchor"] == ["how do cats purr", "what is term life"]
    assert len(load_pairs(path, columns=MAPPING, max_examples=3)) == 3  # bad row 3 not read
    expect("max_examples must be a positive integer", path, max_examples=0)


# ----------------------------------------------------------------------------- bad input


def test_missing_file_and_bad_types(tmp_path):
    msg = expect("does not exist", str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in msg
    (tmp_path / "d.txt").write_text("hello")
    expect(r"d.txt: unsupported file type '.txt'", str(tmp_path / "d.txt"))
    (tmp_path / "bad.json").write_text('{"anchor": ')
    expect(r"bad.json: cannot be read as json: .*JSON parse error", str(tmp_path / "bad.json"))
    (tmp_path / "folder").mkdir()
    expect("folder: folder is not a dataset saved with save_to_disk", str(tmp_path / "folder"))


def test_hub_name_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = expect("does not exist locally and cannot be fetched", "someorg/no-such-dataset")
    assert "'someorg/no-such-dataset'" in msg


def test_missing_columns_name_what_exists(tmp_path):
    path = write(tmp_path / "q.csv", ROWS)
    msg = expect(r"q.csv: no column 'anchor'; columns are: question, answer, wrong, id", path)
    assert "columns" in msg
    expect(
        r"q.csv: no column 'reply' \(mapped to 'positive'\); columns are: question",
        path,
        columns={"anchor": "question", "positive": "reply"},
    )
    expect(r"q.csv: no column 'positive'", path, columns={"anchor": "question"})
    expect(
        r"unknown column role\(s\) 'query'; allowed: anchor, positive, negative",
        path,
        columns={"query": "question"},
    )
    expect(
        "mapped to more than one role", path, columns={"anchor": "question", "positive": "question"}
    )


def test_negative_numbering(tmp_path):
    rows = [{"anchor": "a", "positive": "p", "negative_1": "n", "negative_3": "m"}]
    expect(
        "negative_1..negative_k without gaps; got negative_1, negative_3",
        write(tmp_path / "g.jsonl", rows),
    )
    rows = [{"anchor": "a", "positive": "p", "negative": "n", "negative_1": "m"}]
    expect("both 'negative' and 'negative_1'", write(tmp_path / "b.jsonl", rows))


def test_empty_datasets(tmp_path):
    (tmp_path / "zero.jsonl").write_text("")
    expect(r"zero.jsonl is empty", str(tmp_path / "zero.jsonl"))
    (tmp_path / "header.csv").write_text("anchor,positive\n")
    expect(r"header.csv is empty \(0 rows\)", str(tmp_path / "header.csv"))
    (tmp_path / "list.json").write_text("[]")
    expect(r"list.json is empty \(0 rows\)", str(tmp_path / "list.json"))


@pytest.mark.parametrize(
    "value, what",
    [(None, "null"), ("", "empty or whitespace"), ("  \t ", "empty or whitespace")],
)
def test_bad_texts_name_column_and_row(tmp_path, value, what):
    rows = [dict(r) for r in ROWS] + [{"question": "q", "answer": "a", "wrong": "w", "id": 4}]
    rows[2]["answer"] = value
    path = write(tmp_path / "t.jsonl", rows)
    msg = expect(
        rf"line 3 of .*t.jsonl, column 'positive' \(source column 'answer'\): {what}",
        path,
        columns=MAPPING,
    )
    assert "(1 bad in all)" in msg


def test_csv_whitespace_and_non_string_texts(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("anchor,positive\nq1,a1\nq2,   \n")
    expect(r"line 3 of .*w.csv, column 'positive': empty or whitespace", str(path))
    nums = write(
        tmp_path / "n.jsonl", [{"anchor": "q", "positive": 5}, {"anchor": "q", "positive": 6}]
    )
    expect(r"line 1 of .*n.jsonl, column 'positive': int 5; texts must be", nums)
    mixed = write(
        tmp_path / "x.jsonl",
        [{"anchor": "q", "positive": "ok"}, {"anchor": "q", "positive": ["a"]}],
    )
    expect(r"line 2 of .*x.jsonl, column 'positive': list \['a'\]", mixed)
    nulls = write(tmp_path / "z.jsonl", [{"anchor": "q", "positive": None}])
    expect(r"line 1 of .*z.jsonl, column 'positive': null", nulls)


def test_a_bad_cell_is_named_by_the_line_an_editor_shows(tmp_path):
    """CSV: the header is line 1, so data row 41 (0-based) is line 43; blank lines and the extra
    lines of a quoted multi-line cell count as an editor counts them."""
    rows = [(f"question {i}", f"answer {i}") for i in range(60)]
    rows[41] = ("question 41", " ")
    path = tmp_path / "faq.csv"
    path.write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in rows))
    msg = expect(
        r"^line 43 of .*faq.csv, column 'positive' \(source column 'answer'\): empty",
        str(path),
        columns={"anchor": "question", "positive": "answer"},
    )
    lines = path.read_text().splitlines()
    assert lines[43 - 1] == "question 41, "  # the editor's line 43 is the bad row
    assert "(1 bad in all)" in msg
    # a quoted cell over two lines and a blank line push the bad row down by two lines
    path.write_text('anchor,positive\n"two\nlines",a\n\nq,a\nq,\n')
    expect(r"^line 6 of .*faq.csv, column 'positive': null", str(path))
    # JSON Lines: a blank line counts as a line; the json builder skips it
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"anchor": "q", "positive": "a"}\n\n{"anchor": "q", "positive": " "}\n')
    expect(r"^line 3 of .*d.jsonl, column 'positive': empty", str(jl))


def test_a_json_lines_file_that_does_not_parse_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"anchor": "a", "positive": "b"}\n\n{"anchor": "c", positive: "d"}\n')
    expect(
        r"^line 3 of .*bad.jsonl: not valid JSON \(Expecting property name .* column 17\)$",
        str(path),
    )


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_a_bad_cell_without_lines_is_named_by_row(tmp_path, suffix):
    rows = [dict(r) for r in ROWS]
    rows[1]["answer"] = ""
    path = write(tmp_path / f"d{suffix}", rows)  # .json: one array, its rows are not lines
    expect(rf"^row 2 \(index 1\) of .*d{suffix}, column 'positive'", path, columns=MAPPING)


# ----------------------------------------------------------------------------- built-in data


def test_builtin_insuranceqa_pairs():
    ds = load_pairs("insuranceqa", max_examples=40, seed=0)
    assert ds.column_names == ["anchor", "positive", "negative_1"] and len(ds) == 40
    assert ds[:] == load_pairs("insuranceqa", max_examples=40, seed=0)[:]  # deterministic
    assert ds[:5] == load_pairs("insuranceqa", max_examples=5, seed=0)[:]  # subsets are prefixes
    assert ds["anchor"] != load_pairs("insuranceqa", max_examples=40, seed=1)["anchor"]
    assert len(set(ds["anchor"])) > 30  # shuffled: diverse questions, not one question's answers
    for row in ds:
        assert row["positive"] != row["negative_1"]
        assert all("  " not in t and t == t.strip() for t in row.values())
    expect("training split must be 'train'", "insuranceqa", split="test")


def test_several_training_sets_each_with_its_columns(tmp_path):
    from gist_ray.config import load_config
    from gist_ray.data.training import load_training_sets

    first, second = tmp_path / "a.jsonl", tmp_path / "b.csv"
    write(first, ROWS)
    write(second, [{"q": r["question"], "a": r["answer"]} for r in ROWS])
    cfg = load_config(
        overrides=[
            f"data.train={{one: {{source: {first}, columns: {json.dumps(MAPPING)}}}, "
            f"two: {{source: {second}, columns: {{anchor: q, positive: a}}, max_examples: 2}}}}",
        ]
    )
    one, two = load_training_sets(cfg)
    assert (one.name, one.rows, one.columns) == ("one", 3, ["anchor", "positive", "negative_1"])
    assert (two.name, two.rows, two.columns) == ("two", 2, ["anchor", "positive"])
    assert two.texts_at([1, 0])[0] == [ROWS[1]["question"], ROWS[0]["question"]]


def test_an_empty_dataset_in_a_list_names_its_key(tmp_path):
    from gist_ray.config import load_config
    from gist_ray.data.training import load_training_sets

    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    write(good, [{"anchor": r["question"], "positive": r["answer"]} for r in ROWS])
    empty.write_text("")
    cfg = load_config(overrides=[f"data.train=[{good}, {empty}]"])
    with pytest.raises(DataError, match=r"^data.train\[1\] \(dataset 'empty'\): .* is empty"):
        load_training_sets(cfg)


def test_training_data_is_memory_mapped_not_held_in_memory(tmp_path, monkeypatch):
    """Files and the built-in set are read from Arrow files on disk (the built-in rows are
    written once, atomically, under the gist-ray cache) and rows are read on demand."""
    from gist_ray.config import load_config
    from gist_ray.data.training import load_training_sets

    monkeypatch.setenv("GIST_RAY_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    write(pairs, [{"anchor": r["question"], "positive": r["answer"]} for r in ROWS])
    cfg = load_config(
        overrides=[f"data.train={{file: {pairs}, builtin: insuranceqa}}", "data.max_examples=64"]
    )
    for s in load_training_sets(cfg):
        assert s.data.cache_files, f"{s.name} is held in memory"
        assert type(s.data._data).__name__ == "MemoryMappedTable", s.name
    saved = list((tmp_path / "cache" / "datasets").iterdir())
    assert [p.name for p in saved] == ["insuranceqa-v1-seed42-64"]
    again = load_training_sets(cfg)[1]
    assert again.data.cache_files[0]["filename"].startswith(str(saved[0]))
    assert again.texts_at([3])[0][0] == load_training_sets(cfg)[1].texts_at([3])[0][0]
