"""gist_ray.core.storage against a real S3-compatible server (moto's, on 127.0.0.1) and the
local disk: the same calls for both, one-line errors, node-local staging by content version."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gist_ray.core import storage
from gist_ray.core.errors import ConfigError
from tests.s3 import local_s3_folders, next_second


def test_paths_and_uris_are_told_apart_and_joined_without_path():
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert not storage.is_remote("relative/x") and not storage.is_remote(None)
    assert storage.join("s3://b/out/", "model", "a.json") == "s3://b/out/model/a.json"
    assert storage.join("/tmp/out", "model") == "/tmp/out/model"
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    assert storage.name("s3://b/data/train.csv") == "train.csv"
    assert storage.parent("s3://b/data/train.csv") == "s3://b/data"
    assert storage.parent("s3://b") == "s3://b"
    assert storage.absolute("s3://b/k") == "s3://b/k"


@pytest.fixture
def bucket(s3_server) -> str:
    return s3_server.bucket()


def test_write_read_list_and_remove_on_s3(bucket, s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_json(f"{bucket}/run/run.json", {"a": 1})
    storage.write_text(f"{bucket}/run/sub/b.txt", "hello")
    assert storage.read_json(f"{bucket}/run/run.json") == {"a": 1}
    assert storage.kind(f"{bucket}/run") == "dir"
    assert storage.kind(f"{bucket}/run/run.json") == "file"
    assert storage.kind(f"{bucket}/nothing") == "missing"
    assert [e.relpath for e in storage.listing(f"{bucket}/run")] == ["run.json", "sub/b.txt"]
    storage.remove(f"{bucket}/run/sub")
    assert s3_server.keys(bucket) == ["run/run.json"]
    assert local_s3_folders(tmp_path) == []


def test_upload_and_download_a_folder_round_trip(bucket, tmp_path):
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3000))
    (src / "deep" / "b.txt").write_text("b")
    storage.upload(src, f"{bucket}/copy")
    back = storage.download(f"{bucket}/copy", tmp_path / "back")
    assert (back / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (back / "deep" / "b.txt").read_text() == "b"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".back")]  # no temp left


def test_stage_downloads_once_per_version(bucket, tmp_path):
    uri = f"{bucket}/data/train.jsonl"
    storage.write_text(uri, '{"anchor": "a", "positive": "b"}\n')
    first = storage.stage(uri, tmp_path / "cache")
    assert first.read_text().startswith('{"anchor"') and first.name.endswith("train.jsonl")
    first.write_text("touched")  # a second stage of the same version reuses the copy
    assert storage.stage(uri, tmp_path / "cache") == first and first.read_text() == "touched"
    storage.write_text(uri, '{"anchor": "c", "positive": "d"}\n{"anchor": "e", "positive": "f"}\n')
    second = storage.stage(uri, tmp_path / "cache")
    assert second != first and "c" in second.read_text()
    assert storage.stage(str(tmp_path / "x.csv"), tmp_path / "cache") == tmp_path / "x.csv"


def test_versions_follow_the_content_by_etag_and_fall_back_to_mtimes(
    bucket, s3_server, monkeypatch
):
    """On S3 a version is the objects' ETags (as boto3 lists them), not their modification
    times, which S3 gives to the second: a same-size rewrite within one second is a new
    version, an identical re-upload is not. Without boto3 it falls back to the times."""
    folder = f"{bucket}/data/train"
    storage.write_text(f"{folder}/a.csv", "x,y\n1,2\n")
    storage.write_text(f"{folder}/part/b.csv", "x,y\n3,4\n")
    storage.write_text(f"{bucket}/data/train2.csv", "beside the folder, not in it")
    listed = storage.listing(folder, etags=True)
    head = s3_server.client().head_object
    name = bucket[len("s3://") :]
    assert [(e.relpath, e.etag) for e in listed] == [
        (rel, head(Bucket=name, Key=f"data/train/{rel}")["ETag"]) for rel in ("a.csv", "part/b.csv")
    ]
    assert [e.etag for e in storage.listing(f"{folder}/a.csv", etags=True)] == [listed[0].etag]
    assert {e.relpath for e in storage.listing(bucket, etags=True) if e.etag} == {
        "data/train/a.csv", "data/train/part/b.csv", "data/train2.csv"
    }  # fmt: skip
    assert all(e.etag == "" for e in storage.listing(folder))  # only when asked for

    first = storage.version(folder)
    storage.write_text(f"{folder}/a.csv", "x,y\n5,6\n")  # same size, most likely same second
    second = storage.version(folder)
    assert second != first
    next_second()  # a new modification time
    storage.write_text(f"{folder}/a.csv", "x,y\n5,6\n")  # the same bytes again
    assert storage.version(folder) == second

    monkeypatch.setitem(sys.modules, "boto3", None)  # as without the [cloud] extra
    assert all(e.etag == "" for e in storage.listing(folder, etags=True))
    by_time = storage.version(folder)
    next_second()
    storage.write_text(f"{folder}/a.csv", "x,y\n5,6\n")
    assert storage.version(folder) != by_time  # a re-upload looks new: a needless download


def test_local_writes_are_atomic_and_need_no_store(tmp_path):
    target = tmp_path / "out" / "r.json"
    storage.write_json(str(target), {"k": [1, 2]})
    assert storage.read_json(str(target)) == {"k": [1, 2]}
    assert storage.kind(str(tmp_path / "out")) == "dir"
    storage.remove(str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_check_location_fails_in_one_line_naming_the_key(bucket, s3_server, monkeypatch):
    storage.check_location(f"{bucket}/out", "output_dir", write=True)  # fine: no error
    assert s3_server.keys(bucket) == []  # the write probe is removed
    with pytest.raises(ConfigError) as e:
        storage.check_location("s3://no-such-bucket-gist/out", "output_dir", write=True)
    msg = str(e.value)
    assert msg.startswith("output_dir = 's3://no-such-bucket-gist/out': ") and "\n" not in msg
    assert "does not exist" in msg
    with pytest.raises(ConfigError, match="data.train = 'nope://x/y': not a storage URI"):
        storage.check_location("nope://x/y", "data.train")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match="output_dir = .*connect") as e:
        storage.check_location(f"{bucket}/out", "output_dir", write=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "output_dir=s3:/bucket/out",
        "data.guide_cache_dir=gs:/bucket/cache",
        "data.train=s3:/bucket/train.csv",
        "mlflow.artifact_location=s3:/bucket/mlflow",
        "ray.storage_path=abfs:/container/ray",
    ],
)
def test_a_uri_with_one_slash_is_refused_before_it_becomes_a_local_folder(override):
    from gist_ray.config import load_config

    key, value = override.split("=", 1)
    scheme = value.split(":", 1)[0]
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(f"{key} = {value!r} is not allowed: a URI needs two slashes")
    assert f"({scheme}://" in str(e.value) and "\n" not in str(e.value)
    assert storage.mistyped_uri("C:/data") is None  # a drive letter is a path
    assert storage.mistyped_uri(value.replace(":/", "://")) is None
