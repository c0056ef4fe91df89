"""Training, init, mining and eval data read from object storage: a real S3-compatible server
(moto's, on 127.0.0.1) holds the files; every node stages them once into its gist-ray cache and
reads them there exactly as local files, and errors name the URI, never the staged copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest

from gist_ray.config import load_config, load_config_dict
from gist_ray.core import storage
from gist_ray.core.errors import ConfigError, DataError
from gist_ray.data import training
from gist_ray.data.training import load_pairs, load_training_sets
from tests.conftest import make_sentences
from tests.s3 import local_s3_folders

REPO = Path(__file__).resolve().parents[1]
MAPPING = {"anchor": "question", "positive": "answer", "negative": "wrong"}


def _rows(n: int, seed: int = 0) -> list[dict]:
    q, a, w = (make_sentences(n, seed + i) for i in range(3))
    return [
        {"question": x, "answer": y, "wrong": z, "id": i}
        for i, (x, y, z) in enumerate(zip(q, a, w))
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.bucket()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test stages into its own cache and runs in its own folder (where a stray ``s3:``
    folder would appear)."""
    monkeypatch.setenv("GIST_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(training, "_STAGED", {})
    yield
    assert local_s3_folders(tmp_path) == []


def _staged(tmp_path: Path) -> dict[str, tuple[int, int]]:
    """The staged copies: relative path -> (inode, mtime), hidden lock files left out."""
    root = tmp_path / "cache" / "staged"
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".json"])
def test_a_file_on_s3_gives_the_rows_of_the_local_file(suffix, bucket, tmp_path):
    local = _write(tmp_path / f"pairs{suffix}", _rows(20))
    uri = f"{bucket}/data/pairs{suffix}"
    storage.upload(local, uri)
    want = load_pairs(str(local), MAPPING).to_list()
    got = load_pairs(uri, MAPPING)
    assert got.to_list() == want and len(want) == 20
    staged = _staged(tmp_path)
    (name,) = staged
    assert name.endswith(f"-pairs{suffix}")  # one copy, named by its content version
    # the rows are memory-mapped from the datasets cache, as for a local file
    assert got.cache_files and all(Path(f["filename"]).is_file() for f in got.cache_files)


def test_staging_happens_once_per_node_and_again_when_the_data_changes(bucket, tmp_path):
    local = _write(tmp_path / "pairs.jsonl", _rows(12))
    uri = f"{bucket}/pairs.jsonl"
    storage.upload(local, uri)
    assert len(load_pairs(uri, MAPPING)) == 12
    first = _staged(tmp_path)
    (copy,) = (tmp_path / "cache" / "staged" / n for n in first)
    # A second load (a second worker on the node, a rerun) reads the staged copy: a row added
    # to that copy shows up, and nothing in the staging folder was written again.
    training._STAGED.clear()
    with open(copy, "a") as f:
        f.write(json.dumps({"question": "local q", "answer": "local a", "wrong": "w"}) + "\n")
    first = _staged(tmp_path)
    again = load_pairs(uri, MAPPING)
    assert len(again) == 13 and again[12]["anchor"] == "local q"
    assert _staged(tmp_path) == first
    # a new upload is a new version: staged again, beside the old one
    storage.upload(_write(tmp_path / "pairs.jsonl", _rows(7, seed=5)), uri)
    assert load_pairs(uri, MAPPING).to_list() == load_pairs(str(local), MAPPING).to_list()
    assert len(_staged(tmp_path)) == 2


def test_a_folder_of_parquet_parts_is_one_dataset(bucket, tmp_path):
    rows = _rows(30)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):  # written out of order: read in name order
        _write(parts / f"part-{2 - i:05d}.parquet", rows[(2 - i) * 10 : (3 - i) * 10])
    (parts / "_SUCCESS").write_text("")  # what Spark writes beside its parts: skipped
    uri = f"{bucket}/train/parts"
    storage.upload(parts, uri)
    want = load_pairs(str(parts), MAPPING).to_list()
    assert [r["anchor"] for r in want] == [r["question"] for r in rows]
    assert load_pairs(uri, MAPPING).to_list() == want
    assert load_pairs(uri + "/", MAPPING).to_list() == want
    # data.train naming the prefix: the dataset is named after it
    cfg = load_config(overrides=[f"data.train={uri}", "data.columns=" + json.dumps(MAPPING)])
    (s,) = load_training_sets(cfg)
    assert (s.name, s.rows, s.columns) == ("parts", 30, ["anchor", "positive", "negative_1"])
    # a folder saved with save_to_disk, uploaded as it is, loads as one too
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    storage.upload(saved, f"{bucket}/saved")
    assert load_pairs(f"{bucket}/saved", MAPPING).to_list() == want


def test_a_folder_mixing_formats_or_without_data_is_one_line(bucket, tmp_path):
    _write(tmp_path / "a.csv", _rows(3))
    _write(tmp_path / "b.parquet", _rows(3))
    storage.upload(tmp_path / "a.csv", f"{bucket}/mixed/a.csv")
    storage.upload(tmp_path / "b.parquet", f"{bucket}/mixed/b.parquet")
    storage.write_text(f"{bucket}/notes/readme.txt", "no data here")
    with pytest.raises(DataError) as e:
        load_pairs(f"{bucket}/mixed", MAPPING)
    assert str(e.value).startswith(f"{bucket}/mixed: folder mixes .csv, .parquet files; give")
    with pytest.raises(DataError) as e:
        load_pairs(f"{bucket}/notes", MAPPING)
    assert str(e.value).startswith(f"{bucket}/notes: folder is not a dataset saved with")
    assert "\n" not in str(e.value) and str(tmp_path) not in str(e.value)  # the URI, not the copy


def test_a_bad_row_of_a_remote_csv_names_the_uri_and_the_line(bucket, tmp_path):
    rows = _rows(8)
    rows[3]["question"] = "   "  # row 3: line 5 of the file (header on line 1)
    rows[1]["answer"] = "two\nlines"  # a quoted multi-line cell moves the later rows down
    uri = f"{bucket}/bad.csv"
    storage.upload(_write(tmp_path / "bad.csv", rows), uri)
    with pytest.raises(DataError) as e:
        load_pairs(uri, MAPPING)
    assert str(e.value).startswith(f"line 6 of {uri}, column 'anchor' (source column 'question')")
    assert "cache" not in str(e.value)
    # the same for a JSON Lines file whose line 3 is not JSON
    storage.write_text(f"{bucket}/bad.jsonl", '{"question": "a", "answer": "b"}\n' * 2 + "{oops\n")
    with pytest.raises(DataError, match=rf"^line 3 of {bucket}/bad.jsonl: not valid JSON"):
        load_pairs(f"{bucket}/bad.jsonl", MAPPING)


def test_missing_key_prefix_or_bucket_is_one_line_naming_the_config_key(bucket, s3_server):
    def refused(source: str, error=DataError) -> str:
        cfg = load_config(overrides=[f"data.train={source}"])
        with pytest.raises(error) as e:
            load_training_sets(cfg)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = refused(f"{bucket}/x.csv")
    assert msg == (
        f"data.train = '{bucket}/x.csv' does not exist; give a .parquet, .jsonl, .json or .csv "
        "file or a folder (prefix) of such files"
    )
    assert refused(f"{bucket}/no/prefix/").startswith(f"data.train = '{bucket}/no/prefix/' does")
    msg = refused("s3://no-such-bucket-gist-ray/x.csv", ConfigError)
    missing = "no-such-bucket-gist-ray"
    assert msg == f"data.train = 's3://{missing}/x.csv': bucket '{missing}' does not exist"
    cfg = load_config_dict({"data": {"train": {"a": f"{bucket}/x.jsonl"}}})
    with pytest.raises(DataError, match=rf"^data.train.a = '{bucket}/x.jsonl' does not exist"):
        load_training_sets(cfg)
    with pytest.raises(DataError, match=rf"^{bucket}/y.parquet does not exist; give"):
        load_pairs(f"{bucket}/y.parquet")  # without a config key (init, mine's source rows)
    assert s3_server.keys(bucket) == []


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, with this session's S3 endpoint and credentials."""
    full = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "gist_ray.cli", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_refuses_a_missing_bucket_in_one_line_before_ray_starts(tmp_path):
    proc = _cli(
        "train", "--set", "data.train=s3://no-such-bucket-gist-ray/train.parquet", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "gist-ray: error: data.train = 's3://no-such-bucket-gist-ray/train.parquet': bucket "
        "'no-such-bucket-gist-ray' does not exist"
    )
    assert "Ray" not in proc.stdout  # nothing started


def test_init_reads_a_csv_on_s3(bucket, tmp_path):
    rows = [
        {"question": f"how do I change setting {i}", "answer": f"Open the settings page, item {i}."}
        for i in range(40)
    ]
    local = _write(tmp_path / "faq.csv", rows)
    uri = f"{bucket}/docs/faq.csv"
    storage.upload(local, uri)
    work = tmp_path / "work"
    work.mkdir()
    proc = _cli("init", uri, "--eval-fraction", "0.25", "--seed", "1", cwd=work,
                GIST_RAY_CACHE=str(tmp_path / "cache"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(work / "gist-ray.yaml")
    assert cfg.data.columns == {"anchor": "question", "positive": "answer"}
    assert cfg.data.train == str(work / "faq-train.csv")  # written next to the config
    assert (work / "faq-eval" / "queries.jsonl").is_file()
    train = pd.read_csv(work / "faq-train.csv")
    assert len(train) == 30 and set(train["question"]) < {r["question"] for r in rows}
    assert "# gist-ray config for s3://" in (work / "gist-ray.yaml").read_text()
    # with nothing held out the config trains on the URI itself
    proc = _cli("init", uri, "--eval-fraction", "0", "-o", "direct.yaml", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert load_config(work / "direct.yaml").data.train == uri
    proc = _cli("init", f"{bucket}/docs/missing.csv", "-o", "m.yaml", cwd=work)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"gist-ray: error: {bucket}/docs/missing.csv does not exist; give")
    assert local_s3_folders(work) == []


def test_eval_sets_read_a_beir_folder_and_an_sts_file_on_s3(bucket, tmp_path):
    from gist_ray.eval.sets import EvalSet, load_eval, load_eval_for, write_beir
    from gist_ray.eval.sts import load_sts

    ev = EvalSet(
        {"q1": "how do cats purr", "q2": "is rain wet"},
        {"d1": "with their larynx", "d2": "yes rain is water", "d3": "a car"},
        {"q1": {"d1": 1}, "q2": {"d2": 1}},
    )
    write_beir(tmp_path / "beir", ev)
    storage.upload(tmp_path / "beir", f"{bucket}/eval/beir")
    got = load_eval(f"{bucket}/eval/beir", "test", None, None)
    assert (got.queries, got.corpus, got.qrels) == (ev.queries, ev.corpus, ev.qrels)
    assert got.name == f"{bucket}/eval/beir (split test)"
    with pytest.raises(DataError) as e:
        load_eval(f"{bucket}/eval/beir", "dev", None, None)
    assert str(e.value) == f"{bucket}/eval/beir: BEIR eval folder lacks qrels/dev.tsv or qrels.tsv"
    with pytest.raises(DataError, match=rf"^{bucket}/eval/none does not exist; need a BEIR"):
        load_eval(f"{bucket}/eval/none", "test", None, None)
    cfg = load_config(overrides=["eval.source=s3://no-such-bucket-gist-ray/beir"])
    with pytest.raises(ConfigError) as e:
        load_eval_for(cfg)
    assert str(e.value) == (
        "eval.source = 's3://no-such-bucket-gist-ray/beir': bucket 'no-such-bucket-gist-ray' "
        "does not exist"
    )

    sts = "sentence1,sentence2,score\na cat,a kitten,4.5\na car,the sea,0.5\nrain,snow,x\n"
    storage.write_text(f"{bucket}/eval/sts.csv", sts)
    with pytest.raises(DataError) as e:
        load_sts(f"{bucket}/eval/sts.csv")
    assert str(e.value) == f"STS file {bucket}/eval/sts.csv line 4: score 'x' is not a number"
    # another size: a version is the listing (names, sizes, mtimes to the second on S3)
    storage.write_text(f"{bucket}/eval/sts.csv", sts.replace(",x", ",2.0"))
    s = load_sts(f"{bucket}/eval/sts.csv")
    assert (s.sentence1, s.scores, s.name) == (
        ["a cat", "a car", "rain"],
        [4.5, 0.5, 2.0],
        f"{bucket}/eval/sts.csv",
    )


def _tiny(tiny_models, data: str, out: Path, *extra: str):
    return load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            f"model.guide={tiny_models['guide']}",
            "model.max_seq_length=32",
            f"data.train={data}",
            "data.columns=" + json.dumps(MAPPING),
            "data.max_examples=0",
            "ray.num_workers=1",
            f"output_dir={out}",
            *extra,
        ]
    )


def test_mine_reads_its_input_from_s3(tiny_models, bucket, tmp_path):
    from gist_ray.commands import mine as command

    local = _write(tmp_path / "pairs.csv", _rows(24, seed=3))
    uri = f"{bucket}/in/pairs.csv"
    storage.upload(local, uri)
    settings = ("mine.k=2", "mine.backend=torch", "mine.threshold=none")
    [remote] = command.mine(_tiny(tiny_models, uri, tmp_path / "remote", *settings))
    [mine_local] = command.mine(_tiny(tiny_models, str(local), tmp_path / "local", *settings))
    # the input's format is kept and the rows are those mined from the same file on disk
    assert remote.output == str(tmp_path / "remote" / "pairs-mined.csv")
    assert (tmp_path / "remote" / "pairs-mined.csv").read_bytes() == (
        tmp_path / "local" / "pairs-mined.csv"
    ).read_bytes()
    assert remote.written == mine_local.written == 24


def test_training_from_s3_matches_training_from_the_local_file(tiny_models, bucket, tmp_path):
    """The per-worker train function (what each Ray worker runs) on s3:// data: it stages the
    file itself and takes the very steps training on the local file takes."""
    from gist_ray.train.checkpoint import LocalReporter
    from tests.conftest import run_worker

    local = _write(tmp_path / "pairs.parquet", _rows(32, seed=7))
    uri = f"{bucket}/train/pairs.parquet"
    storage.upload(local, uri)
    steps = ("train.batch_size=8", "train.max_steps=3", "train.checkpoint_every=100")
    losses = {}
    for name, source in (("s3", uri), ("local", str(local))):
        cfg = _tiny(tiny_models, source, tmp_path / name, *steps)
        training._STAGED.clear()  # a worker process of its own
        losses[name] = run_worker(cfg, LocalReporter(tmp_path / name / "ckpt"))["losses"]
    assert len(losses["s3"]) == 3 and losses["s3"] == losses["local"]
    assert len(_staged(tmp_path)) == 1


def test_ray_training_run_reads_data_and_eval_set_from_s3(
    ray_cluster, tiny_models, bucket, tmp_path
):
    """``gist-ray train`` on 2 Ray workers with the training data (a prefix of parquet parts)
    and the eval set (a BEIR folder) only on s3://: the driver checks them, each worker stages
    them into its own node's cache, and the run logs the URI as its data's source."""
    import mlflow

    from gist_ray.commands.train import train
    from gist_ray.core.assets import cache_root
    from gist_ray.eval.sets import EvalSet, write_beir

    rows = _rows(32, seed=9)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(2):
        _write(parts / f"part-{i}.parquet", rows[i * 16 : (i + 1) * 16])
    storage.upload(parts, f"{bucket}/train")
    ev = EvalSet(
        {f"q{i}": r["question"] for i, r in enumerate(rows[:6])},
        {f"d{i}": r["answer"] for i, r in enumerate(rows)},
        {f"q{i}": {f"d{i}": 1} for i in range(6)},
    )
    write_beir(tmp_path / "beir", ev)
    storage.upload(tmp_path / "beir", f"{bucket}/eval")
    cfg = _tiny(
        tiny_models,
        f"{bucket}/train",
        tmp_path / "out",
        f"eval.source={bucket}/eval",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.checkpoint_every=100",
        "ray.num_workers=2",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    )
    result = train(cfg)
    client = mlflow.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(result["run_id"], "loss")) == 2
    assert "eval/after/ndcg_at_10" in run.data.metrics
    (data_input,) = [d for d in run.inputs.dataset_inputs if d.tags[0].value == "training"]
    assert f'"{bucket}/train"' in data_input.dataset.source
    # the workers staged the data into their node's cache (on this one machine it may be the
    # driver's, when the local Ray started with this test's environment; the 3-node test in
    # tests/test_multinode.py gives each node its own)
    worker_cache = Path(ray_cluster.get(ray_cluster.remote(lambda: str(cache_root())).remote()))
    for uri in (f"{bucket}/train", f"{bucket}/eval"):  # the driver checked both
        assert (
            tmp_path / "cache" / "staged" / f"{storage.version(uri)}-{storage.name(uri)}"
        ).is_dir()
    copy = worker_cache / "staged" / f"{storage.version(f'{bucket}/train')}-train"
    assert sorted(p.name for p in copy.iterdir()) == ["part-0.parquet", "part-1.parquet"]
    storage.remove(str(copy))
