"""The guide cache on object storage, against a real S3-compatible server (moto's, on
127.0.0.1): built to s3:// (in this process and by the Ray Data job), each object uploaded whole,
read back by a node-local download made once, equal to the local-disk cache; a second build with
the same fingerprint embeds nothing; a deleted or truncated shard object is rebuilt alone; and a
URI counts as shared storage on a multi-node cluster."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gist_ray.config import load_config
from gist_ray.core import storage
from gist_ray.core.errors import ConfigError, GistRayError
from gist_ray.data.training import load_training_sets
from gist_ray.guide import build
from gist_ray.guide import cache as guide_cache
from gist_ray.guide.embed import run_local
from gist_ray.models.prompts import guide_prompts
from gist_ray.train.checkpoint import LocalReporter
from tests.conftest import make_sentences, run_worker
from tests.s3 import local_s3_folders, next_second


@pytest.fixture()
def node(tmp_path, monkeypatch):
    """A node of its own: a working directory and a gist-ray cache nothing else uses."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIST_RAY_CACHE", str(tmp_path / "node-cache"))
    return tmp_path


def _pairs(path: Path, rows: int, seed: int) -> Path:
    anchors, positives = make_sentences(rows, seed), make_sentences(rows, seed + 1)
    path.write_text("".join(json.dumps({"anchor": a, "positive": p}) + "\n"
                            for a, p in zip(anchors, positives)))  # fmt: skip
    return path


def _cfg(tiny_models, data, out, *extra):
    return load_config(
        overrides=[
            f"model.student={tiny_models['student']}",
            f"model.guide={tiny_models['guide']}",
            "model.max_seq_length=32",
            f"data.train={data}",
            "data.max_examples=0",
            "train.batch_size=4",
            "train.max_steps=3",
            "train.checkpoint_every=100",
            "ray.num_workers=1",
            f"output_dir={out}",
            *extra,
        ]
    )


class _Counting:
    """run_local, counting the shards it embeds (each shard is guide forwards)."""

    def __init__(self):
        self.shards: list[int] = []

    def __call__(self, cfg, folder, shards):
        self.shards += shards
        return run_local(cfg, folder, shards)


def _ensure(cfg):
    sets = load_training_sets(cfg)
    runner = _Counting()
    return build.ensure(cfg, sets, guide_prompts(cfg, sets), runner), runner


def _objects(folder: str) -> dict[str, tuple[int, int]]:
    return {e.relpath: (e.size, e.mtime_ns) for e in storage.listing(folder)}


def test_cache_on_s3_equals_the_local_one_loads_and_rebuilds_one_shard(
    s3_server, tiny_models, node, monkeypatch, caplog
):
    monkeypatch.setattr(guide_cache, "MIN_SHARD_TEXTS", 8)  # several shards from little data
    data = _pairs(node / "pairs.jsonl", 40, 1)
    bucket = s3_server.bucket()
    on_s3 = _cfg(tiny_models, data, node / "out", f"data.guide_cache_dir={bucket}/caches")
    (folder,), first = _ensure(on_s3)
    assert folder.startswith(f"{bucket}/caches/pairs-")
    shards = guide_cache.read_manifest(folder)["shards"]
    assert shards > 2 and first.shards == list(range(shards))
    prefix = folder[len("s3://") :].split("/", 1)[1]
    keys = set(s3_server.keys(folder))
    want = {"manifest.json", "texts.parquet", "index-anchor.npy", "index-positive.npy"}
    want |= {f"emb-{k:05d}.npy" for k in range(shards)}
    assert keys == {f"{prefix}/{f}" for f in want}  # nothing else: no temporary object
    assert f"{bucket[5:]}/caches/pairs.latest.json" in {
        f"{bucket[5:]}/{k}" for k in s3_server.keys(bucket)
    }

    # Read back (downloaded once into this node's cache): equal to the local-disk cache.
    on_disk = _cfg(tiny_models, data, node / "out", f"data.guide_cache_dir={node / 'local'}")
    (local,), _ = _ensure(on_disk)
    remote = guide_cache.GuideCache(folder, 40)
    staged = node / "node-cache" / guide_cache.STAGED
    assert remote.folder.parent == staged and not (remote.folder / "texts.parquet").exists()
    for column in ("anchor", "positive"):
        torch.testing.assert_close(
            remote.embeddings(column, range(40)),
            guide_cache.GuideCache(local, 40).embeddings(column, range(40)),
            rtol=0,
            atol=0,
        )
    assert guide_cache.GuideCache(folder, 40).folder == remote.folder  # no second download
    assert [p.name for p in staged.iterdir() if not p.name.startswith(".")] == [remote.folder.name]

    # Workers of one node that open it at once share one download.
    monkeypatch.setenv("GIST_RAY_CACHE", str(node / "busy-node"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gist_ray"), ThreadPoolExecutor(4) as pool:
        opened = list(pool.map(lambda _: guide_cache.GuideCache(folder, 40).folder, range(4)))
    assert len(set(opened)) == 1 and opened[0].parent == node / "busy-node" / guide_cache.STAGED
    assert caplog.text.count("(once per node)") == 1

    # Another job with the same fingerprint (a fresh node: nothing local) embeds nothing.
    monkeypatch.setenv("GIST_RAY_CACHE", str(node / "other-node"))
    before = _objects(folder)
    (again,), second = _ensure(on_s3)
    assert again == folder and second.shards == [] and _objects(folder) == before

    # A deleted shard object and a truncated one are rebuilt alone; a worker refuses meanwhile.
    next_second()
    storage.remove(guide_cache.shard_path(folder, 1))
    two = guide_cache.shard_path(folder, 2)
    storage.write_bytes(two, storage.read_bytes(two)[:100])
    with pytest.raises(GistRayError, match="guide cache .* is incomplete \\(shard 1: missing\\)"):
        guide_cache.GuideCache(folder, 40)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        _, third = _ensure(on_s3)
    assert third.shards == [1, 2]
    assert "shard 1 is missing; rebuilding that shard" in caplog.text
    assert "shard 2 is truncated or damaged (100 bytes); rebuilding that shard" in caplog.text
    after = _objects(folder)
    assert {f for f in after if after[f] != before.get(f)} == {"emb-00001.npy", "emb-00002.npy"}
    # The rebuilt shards are the same bytes (the same ETags), so they are the same version: a
    # node that staged the cache before keeps its copy, and a fresh node stages it under that name.
    etags = {e.relpath: e.etag for e in storage.listing(folder, etags=True)}
    assert set(etags) == set(after) and all(etags.values())
    monkeypatch.setenv("GIST_RAY_CACHE", str(node / "node-cache"))
    assert guide_cache.GuideCache(folder, 40).folder == remote.folder
    monkeypatch.setenv("GIST_RAY_CACHE", str(node / "fresh-node"))
    rebuilt = guide_cache.GuideCache(folder, 40)
    assert rebuilt.folder == node / "fresh-node" / guide_cache.STAGED / remote.folder.name
    torch.testing.assert_close(
        rebuilt.embeddings("anchor", range(40)), remote.embeddings("anchor", range(40)), rtol=0,
        atol=0,
    )  # fmt: skip
    assert local_s3_folders(node) == []


def test_training_reads_the_s3_cache_as_the_local_one(s3_server, tiny_models, node):
    """A worker (here in this process) trains from the cache on s3://: the same losses as from
    the local-disk cache."""
    data = _pairs(node / "pairs.jsonl", 32, 3)
    bucket = s3_server.bucket()
    losses = {}
    for name, where in (("s3", f"{bucket}/caches"), ("disk", str(node / "caches"))):
        cfg = _cfg(tiny_models, data, node / name, f"data.guide_cache_dir={where}")
        losses[name] = run_worker(cfg, LocalReporter(node / name))["losses"]
    assert len(losses["s3"]) == 3
    assert losses["s3"] == losses["disk"]
    assert any(k.endswith("/manifest.json") for k in s3_server.keys(bucket))
    assert local_s3_folders(node) == []


def test_the_default_location_on_object_storage(tiny_models, tmp_path):
    """``data.guide_cache_dir`` unset: under an ``s3://`` ``ray.storage_path`` (for local and
    remote data alike); beside a local dataset otherwise; a URI is never made a local path."""
    data = _pairs(tmp_path / "pairs.jsonl", 4, 1)
    s3 = "s3://bucket/runs"
    cfg = _cfg(tiny_models, data, tmp_path / "out", f"ray.storage_path={s3}")
    for source in (str(data), "s3://data-bucket/train.parquet"):
        assert guide_cache.cache_root(cfg, source) == (
            "s3://bucket/runs/.gist-ray-guide-cache",
            "ray.storage_path",
        )
    local_storage = _cfg(tiny_models, data, tmp_path / "out", f"ray.storage_path={tmp_path}/r")
    assert guide_cache.cache_root(local_storage, str(data)) == (
        str(tmp_path / ".gist-ray-guide-cache"),
        "beside the data",
    )
    assert guide_cache.cache_root(local_storage, "s3://data-bucket/train.parquet") == (
        str(tmp_path / "r" / ".gist-ray-guide-cache"),
        "ray.storage_path",
    )
    explicit = _cfg(tiny_models, data, tmp_path / "out", "data.guide_cache_dir=gs://b/cache/")
    assert guide_cache.cache_root(explicit, str(data)) == ("gs://b/cache/", "data.guide_cache_dir")
    assert guide_cache.folder_for("gs://b/cache/", "pairs", {"a": "b"}).startswith(
        "gs://b/cache/pairs-"
    )
    plain = _cfg(tiny_models, data, tmp_path / "out")
    root, chosen = guide_cache.cache_root(plain, "s3://data-bucket/train.parquet")
    assert chosen == "the gist-ray cache" and not storage.is_remote(root)


def test_object_storage_counts_as_shared_on_several_nodes(s3_server, tmp_path):
    from gist_ray.launch.resources import check_storage, is_shared_storage

    bucket = s3_server.bucket()
    guide_cache.check_root(f"{bucket}/cache", "ray.storage_path", 3, False)
    guide_cache.check_root(f"{bucket}/cache", "data.guide_cache_dir", 3, False)
    assert is_shared_storage(f"{bucket}/cache") and not is_shared_storage(str(tmp_path))
    with pytest.raises(ConfigError) as e:  # a local folder on 3 nodes: refused, as before
        guide_cache.check_root(str(tmp_path / "c"), "ray.storage_path", 3, False)
    assert "node-local but the cluster has 3 nodes" in str(e.value)
    with pytest.raises(ConfigError) as e:
        guide_cache.check_root("s3://no-such-bucket-gist/c", "data.guide_cache_dir", 1, False)
    msg = str(e.value)
    assert msg.startswith("data.guide_cache_dir = 's3://no-such-bucket-gist/c'") and "\n" not in msg
    assert "does not exist" in msg
    assert s3_server.keys(bucket) == []  # the write probe is gone

    check_storage(load_config(overrides=[f"ray.storage_path={bucket}/ray"]), 3)
    with pytest.raises(GistRayError, match="is node-local but the cluster has 3 nodes"):
        check_storage(load_config(overrides=[f"ray.storage_path={tmp_path / 'ray'}"]), 3)


def test_cache_guide_builds_on_s3_with_ray_data_and_another_job_embeds_nothing(
    ray_cluster, s3_server, tiny_models, node, caplog
):
    """`gist-ray cache-guide` to s3://: the Ray Data job's actors upload their shards; a second
    job loads them (no guide forward, no object rewritten); a deleted shard object is rebuilt
    alone by the job."""
    from gist_ray.commands.train import cache_guide
    from gist_ray.launch.guide_job import LAST_JOB
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec

    data = _pairs(node / "pairs.jsonl", 40, 5)
    bucket = s3_server.bucket()
    cfg = _cfg(tiny_models, data, node / "out", f"data.guide_cache_dir={bucket}/caches",
               "ray.num_workers=2")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        (folder,) = cache_guide(cfg)
    assert folder.startswith(f"{bucket}/caches/pairs-") and "built in" in caplog.text
    assert LAST_JOB["actors"] == 2 and LAST_JOB["texts"] == 80
    shards = guide_cache.read_manifest(folder)["shards"]
    assert {k.rsplit("/", 1)[1] for k in s3_server.keys(folder) if "/emb-" in k} == {
        f"emb-{k:05d}.npy" for k in range(shards)
    }
    cache = guide_cache.GuideCache(folder, 40)
    guide = load_encoder(ModelSpec(str(tiny_models["guide"]), max_seq_length=32), frozen=True)
    for column, seed in (("anchor", 5), ("positive", 6)):
        want = torch.nn.functional.normalize(guide.encode(make_sentences(40, seed)), dim=-1)
        torch.testing.assert_close(cache.embeddings(column, range(40)), want, rtol=0, atol=2e-3)

    before = _objects(folder)
    LAST_JOB.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        assert cache_guide(cfg) == [folder]
    assert "loaded in" in caplog.text and "embedding" not in caplog.text
    assert LAST_JOB == {} and _objects(folder) == before  # no job ran, nothing rewritten

    next_second()
    storage.remove(guide_cache.shard_path(folder, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        cache_guide(cfg)
    assert "shard 1 is missing; rebuilding that shard" in caplog.text
    assert LAST_JOB["texts"] == guide_cache.shard_size(guide_cache.read_manifest(folder), 1)
    after = _objects(folder)
    assert {f for f in after if after[f] != before.get(f)} == {"emb-00001.npy"}
    torch.testing.assert_close(
        guide_cache.GuideCache(folder, 40).embeddings("anchor", range(40)),
        cache.embeddings("anchor", range(40)), rtol=0, atol=0,
    )  # fmt: skip
    assert local_s3_folders(node) == []
    # Ray Data frees the job's actors asynchronously: wait, so the next test's job on this
    # shared 2-CPU instance gets every CPU (its layout assertions count the actors ready).
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    print("CPUs free after the jobs:", ray_cluster.available_resources().get("CPU", 0))


def test_mine_reads_and_seeds_the_guide_cache_on_s3(s3_server, tiny_models, node):
    """`gist-ray mine` with the guide cache on s3://: it builds the data's cache there, reads it
    back, and uploads the mined file's own cache, so training on the mined file embeds nothing."""
    from gist_ray.commands import mine as command

    data = _pairs(node / "pairs.jsonl", 32, 7)
    bucket = s3_server.bucket()
    where = f"data.guide_cache_dir={bucket}/caches"
    [summary] = command.mine(
        _cfg(
            tiny_models,
            data,
            node / "mine",
            where,
            "mine.k=2",
            "mine.backend=torch",
            "mine.shortfall=fill",
        )  # fmt: skip
    )
    assert summary.written == 32
    names = {k.split("/")[1].rsplit("-", 1)[0] for k in s3_server.keys(f"{bucket}/caches")}
    assert {"pairs", "pairs-mined"} <= names
    mined = _cfg(tiny_models, node / "mine" / "pairs-mined.jsonl", node / "train", where)
    (folder,), runner = _ensure(mined)
    assert folder.startswith(f"{bucket}/caches/pairs-mined-") and runner.shards == []
    sets = load_training_sets(mined)
    cache = guide_cache.GuideCache(folder, sets[0].rows)
    first = guide_cache.GuideCache(_ensure(_cfg(tiny_models, data, node / "t", where))[0][0], 32)
    torch.testing.assert_close(  # the mined rows' anchors are the data's anchors
        cache.embeddings("anchor", range(32)), first.embeddings("anchor", range(32)), rtol=0, atol=0
    )
    assert local_s3_folders(node) == []
