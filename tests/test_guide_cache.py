"""The guide cache: one fp16 embedding per unique text, fingerprinted, built shard by shard
(atomically), loaded instead of rebuilt, memory-mapped by the workers, and exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from gist_ray.config import load_config
from gist_ray.core.errors import ConfigError, DataError
from gist_ray.guide import build
from gist_ray.guide import cache as guide_cache
from gist_ray.guide.embed import run_local
from gist_ray.models.prompts import guide_prompts
from gist_ray.train.checkpoint import LocalReporter
from tests.conftest import build_short_guide, make_sentences, run_worker


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


def _write(path, anchors, positives):
    path.write_text(
        "".join(json.dumps({"anchor": a, "positive": p}) + "\n" for a, p in zip(anchors, positives))
    )
    return path


class _Counting:
    """run_local, counting the shards it embeds."""

    def __init__(self):
        self.shards: list[int] = []

    def __call__(self, cfg, folder, shards):
        self.shards += shards
        return run_local(cfg, folder, shards)


def _ensure(cfg, runner=None):
    from gist_ray.data.training import load_training_sets

    sets = load_training_sets(cfg)
    runner = runner or _Counting()
    return build.ensure(cfg, sets, guide_prompts(cfg, sets), runner), sets, runner


def test_training_with_cache_equals_live_guide(tiny_models, tiny_pairs_file, cache_env):
    live = run_worker(
        _cfg(tiny_models, tiny_pairs_file, cache_env / "live", "data.guide_cache=false"),
        LocalReporter(cache_env / "live"),
    )
    cached = run_worker(  # float32: the live guide's precision, so the same masks
        _cfg(tiny_models, tiny_pairs_file, cache_env / "cached", "data.guide_cache_dtype=float32"),
        LocalReporter(cache_env / "cached"),
    )
    assert len(live["losses"]) == len(cached["losses"]) == 3
    torch.testing.assert_close(
        torch.tensor(cached["losses"]), torch.tensor(live["losses"]), rtol=1e-5, atol=1e-6
    )
    half = run_worker(  # float16 (the default): a near-tie mask may flip, the loss stays close
        _cfg(tiny_models, tiny_pairs_file, cache_env / "half"), LocalReporter(cache_env / "half")
    )
    torch.testing.assert_close(
        torch.tensor(half["losses"]), torch.tensor(live["losses"]), rtol=1e-3, atol=1e-4
    )
    root = tiny_pairs_file.parent / ".gist-ray-guide-cache"  # beside the dataset
    folder = Path(json.loads((root / "pairs.latest.json").read_text())["folder"])
    assert folder.parent == root and (folder / guide_cache.MANIFEST).is_file()
    assert not list(folder.glob(".*tmp*")), "temporary file left behind"


def test_one_fp16_row_per_unique_text_equal_to_the_guide(tiny_models, tmp_path, cache_env):
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec

    anchors, positives = make_sentences(30, 5), make_sentences(30, 6)
    anchors[3] = anchors[0]  # a repeated anchor
    positives[7] = anchors[1]  # an anchor's text as a positive: the same prompt, the same row
    data = _write(tmp_path / "pairs.jsonl", anchors, positives)
    cfg = _cfg(tiny_models, data, tmp_path / "out", "train.batch_size=4")
    (folder,), sets, runner = _ensure(cfg)
    cache = guide_cache.GuideCache(folder, 30)
    assert cache.manifest["unique_texts"] == 58 and len(runner.shards) == cache.manifest["shards"]
    assert cache.index["anchor"][3] == cache.index["anchor"][0]
    assert cache.index["positive"][7] == cache.index["anchor"][1]
    assert all(s.dtype == np.float16 for s in cache.shards)

    guide = load_encoder(ModelSpec(str(tiny_models["guide"]), max_seq_length=32), frozen=True)
    rows = [29, 0, 3, 17]
    want = torch.nn.functional.normalize(guide.encode([positives[r] for r in rows]), dim=-1)
    torch.testing.assert_close(cache.embeddings("positive", rows), want, rtol=0, atol=2e-3)

    # Another prompt for the anchors: their texts are other unique pairs.
    cfg_p = _cfg(tiny_models, data, tmp_path / "out", "train.batch_size=4",
                 "model.guide_prompts={anchor: 'query: '}")  # fmt: skip
    (folder_p,), _, _ = _ensure(cfg_p)
    assert folder_p != folder
    cache_p = guide_cache.GuideCache(folder_p, 30)
    assert cache_p.manifest["unique_texts"] == 29 + 30
    assert cache_p.index["positive"][7] != cache_p.index["anchor"][1]


def test_second_run_loads_and_a_missing_or_truncated_shard_is_rebuilt_alone(
    tiny_models, tmp_path, cache_env, caplog, monkeypatch
):
    monkeypatch.setattr(guide_cache, "MIN_SHARD_TEXTS", 8)  # several shards from little data
    data = _write(tmp_path / "pairs.jsonl", make_sentences(40, 1), make_sentences(40, 2))
    cfg = _cfg(tiny_models, data, tmp_path / "out", "train.batch_size=4")
    (folder,), _, first = _ensure(cfg)
    folder = Path(folder)
    shards = guide_cache.read_manifest(folder)["shards"]
    assert shards > 2 and first.shards == list(range(shards))
    before = guide_cache.GuideCache(folder).embeddings("anchor", range(40))

    (again,), _, second = _ensure(cfg)
    assert Path(again) == folder and second.shards == [], "a second run loads the cache"

    guide_cache.shard_path(folder, 1).unlink()
    two = guide_cache.shard_path(folder, 2)
    two.write_bytes(two.read_bytes()[:100])
    with pytest.raises(Exception, match="guide cache .* is incomplete \\(shard 1: missing\\)"):
        guide_cache.GuideCache(folder)  # a worker never reads a half-built cache
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        _, _, third = _ensure(cfg)
    assert third.shards == [1, 2]
    assert "shard 1 is missing; rebuilding that shard" in caplog.text
    assert "shard 2 is truncated or damaged; rebuilding that shard" in caplog.text
    after = guide_cache.GuideCache(folder).embeddings("anchor", range(40))
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_a_changed_dataset_is_rebuilt_and_said_so(tiny_models, tmp_path, cache_env, caplog):
    data = _write(tmp_path / "pairs.jsonl", make_sentences(20, 1), make_sentences(20, 2))
    cfg = _cfg(tiny_models, data, tmp_path / "out", "train.batch_size=4")
    (old,), _, _ = _ensure(cfg)
    changed = make_sentences(20, 2)
    changed[5] = "a brand new answer"
    _write(data, make_sentences(20, 1), changed)
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        (new,), _, runner = _ensure(cfg)
    assert new != old and runner.shards
    assert "the dataset changed since the cache at" in caplog.text
    assert "building a new one" in caplog.text
    assert (
        guide_cache.GuideCache(new, 20).manifest["fingerprint"]["texts"]
        != (guide_cache.GuideCache(old, 20).manifest["fingerprint"]["texts"])
    )


def test_a_text_the_guide_fails_on_is_named_by_column_and_row(tmp_path, cache_env):
    """A guide whose position table is shorter than its max length fails on a long text: the
    error names that text's column and row."""
    guide = build_short_guide(tmp_path / "short-guide")
    anchors, positives = make_sentences(10, 1), [s.split()[0] for s in make_sentences(10, 2)]
    positives[6] = " ".join(make_sentences(8, 4))  # far beyond 12 tokens
    data = _write(tmp_path / "pairs.jsonl", anchors, positives)
    cfg = load_config(overrides=[f"model.guide={guide}", "model.guide_max_seq_length=64",
                                 f"data.train={data}", "data.max_examples=0",
                                 "train.batch_size=2"])  # fmt: skip
    with pytest.raises(DataError) as e:
        _ensure(cfg)
    msg = str(e.value)
    assert "the guide fails on column 'positive' row 7 (index 6)" in msg and "\n" not in msg
    (folder,) = (tmp_path / ".gist-ray-guide-cache").glob("pairs-*")
    assert not list(folder.glob("emb-*.npy")), "no shard of the failed job looks complete"


def test_fingerprint_tracks_the_guide_files_settings_prompts_and_texts(tiny_models, tmp_path):
    import shutil

    settings = {"revision": "", "model_kwargs": {}, "pooling": "own", "max_seq_length": 32}
    guide = guide_cache.model_identity(str(tiny_models["guide"]))
    a = guide_cache.fingerprint(guide, settings, "t", {})
    b = guide_cache.fingerprint(guide_cache.model_identity(str(tiny_models["student"])),
                                settings, "t", {})  # fmt: skip
    c = guide_cache.fingerprint(guide, {**settings, "pooling": "cls"}, "t", {})
    d = guide_cache.fingerprint(guide, settings, "t", {"anchor": "q: "})
    e = guide_cache.fingerprint(guide, settings, "other texts", {})
    assert len({json.dumps(x, sort_keys=True) for x in (a, b, c, d, e)}) == 5
    # The module stack counts: a changed module folder (e.g. 2_Normalize) is another guide.
    copy = shutil.copytree(tiny_models["guide"], tmp_path / "guide")
    (copy / "2_Normalize").mkdir()
    (copy / "2_Normalize" / "config.json").write_text("{}")
    assert guide_cache.model_identity(str(copy)) != guide
    # A hub model in the Hugging Face cache is its snapshot's commit.
    snap = tmp_path / "models--org--guide" / "snapshots" / ("ab12" * 10)
    shutil.copytree(tiny_models["guide"], snap)
    assert guide_cache.model_identity(str(snap)) == "commit:" + "ab12" * 10


def test_an_unwritable_or_node_local_cache_folder_is_a_one_line_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not __import__("os").access(locked, __import__("os").W_OK):  # not as root
            with pytest.raises(ConfigError, match="data.guide_cache_dir = .* is not writable"):
                guide_cache.check_root(locked / "c", "data.guide_cache_dir", 1, False)
    finally:
        locked.chmod(0o700)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is not writable \\(FileExistsError|NotADirectory"):
        guide_cache.check_root(blocker / "c", "data.guide_cache_dir", 1, False)
    with pytest.raises(ConfigError) as e:
        guide_cache.check_root(tmp_path / "c", "ray.storage_path", 2, False)
    assert "node-local but the cluster has 2 nodes" in str(e.value)
    assert "data.guide_cache_dir" in str(e.value) and "\n" not in str(e.value)
    guide_cache.check_root(tmp_path / "c", "ray.storage_path", 2, True)  # shared: fine


def test_cache_guide_builds_with_ray_data_then_a_second_job_loads(
    ray_cluster, tiny_models, tmp_path, caplog
):
    """`gist-ray cache-guide` embeds the unique texts with a Ray Data job (2 actors); a second
    job on the same cluster loads the cache instead of building it."""
    from gist_ray.commands.train import cache_guide
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec

    data = _write(tmp_path / "pairs.jsonl", make_sentences(40, 5), make_sentences(40, 6))
    cfg = load_config(
        overrides=[
            f"model.guide={tiny_models['guide']}",
            "model.max_seq_length=32",
            f"data.train={data}",
            "data.max_examples=0",
            f"data.guide_cache_dir={tmp_path / 'shared-cache'}",
            "train.batch_size=4",
            "ray.num_workers=2",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        (folder,) = cache_guide(cfg)
    assert "unique texts (100%)" in caplog.text and "ETA" in caplog.text
    assert "built in" in caplog.text
    from gist_ray.launch.guide_job import LAST_JOB

    # 2 CPUs, 80 texts: two one-thread actors, each with a guide loaded, 5 shards of 16
    assert (LAST_JOB["actors"], LAST_JOB["threads"], len(LAST_JOB["ready"])) == (2, 1, 2)
    assert guide_cache.read_manifest(Path(folder))["shards"] == 5
    assert folder.startswith(str(tmp_path / "shared-cache"))
    cache = guide_cache.GuideCache(folder, 40)
    guide = load_encoder(ModelSpec(str(tiny_models["guide"]), max_seq_length=32), frozen=True)
    for column, seed in (("anchor", 5), ("positive", 6)):
        want = torch.nn.functional.normalize(guide.encode(make_sentences(40, seed)), dim=-1)
        torch.testing.assert_close(cache.embeddings(column, range(40)), want, rtol=0, atol=2e-3)
    mtimes = {p: p.stat().st_mtime_ns for p in Path(folder).glob("emb-*.npy")}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        assert cache_guide(cfg) == [folder]
    assert "loaded in" in caplog.text and "embedding" not in caplog.text
    assert {p: p.stat().st_mtime_ns for p in Path(folder).glob("emb-*.npy")} == mtimes


def test_a_text_the_guide_fails_on_in_the_ray_data_job(ray_cluster, tmp_path, cache_env, capfd):
    """The job's failure on one text reaches the user as one line naming the row."""
    from gist_ray.cli import EXIT_USER_ERROR, main

    guide = build_short_guide(tmp_path / "short-guide")
    positives = [s.split()[0] for s in make_sentences(10, 2)]
    positives[4] = " ".join(make_sentences(8, 4))
    data = _write(tmp_path / "pairs.jsonl", make_sentences(10, 1), positives)
    args = [f"model.guide={guide}", "model.guide_max_seq_length=64", f"data.train={data}",
            "data.max_examples=0", "train.batch_size=2", "ray.num_workers=2",
            f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    assert main(["cache-guide", *sum((["--set", a] for a in args), [])]) == EXIT_USER_ERROR
    err = [x for x in capfd.readouterr().err.splitlines() if x.startswith("gist-ray: error")]
    assert len(err) == 1 and "the guide fails on column 'positive' row 5 (index 4)" in err[0]


def test_shards_are_sized_so_every_worker_gets_work():
    size = guide_cache.shard_size_for
    assert size(384, 2) == 48  # SHARDS_PER_WORKER shards per worker
    assert size(3000, 2) == 375
    assert size(40, 2) == 16  # MIN_SHARD_TEXTS ...
    assert size(20, 2) == 10  # ... but never fewer shards than workers
    assert size(1, 4) == 1 and size(0, 3) == 1
    assert size(10**9, 2) == guide_cache.MAX_SHARD_TEXTS
    for total in range(1, 400, 7):
        for workers in (1, 2, 3, 8, 64):
            n = size(total, workers)
            shards = -(-total // n)
            assert shards >= min(total, workers), (total, workers)
            assert shards <= max(guide_cache.SHARDS_PER_WORKER * workers, 1) or n == 1


def test_job_layout_keeps_every_core_busy_without_competing_threads():
    from gist_ray.launch.guide_job import JobLayout, job_layout

    assert job_layout([2], [0], 384, False) == JobLayout(actors=2, threads=1, gpus=0)
    assert job_layout([2], [0], 3000, False) == JobLayout(2, 1, 0)
    assert job_layout([2], [0], 20, False) == JobLayout(1, 2, 0)  # one actor gets both cores
    assert job_layout([2, 4], [0, 0], 10**6, False) == JobLayout(6, 1, 0)
    assert job_layout([64], [0], 10**6, False) == JobLayout(16, 4, 0)  # actors capped per node
    assert job_layout([16, 16], [4, 4], 10**6, True) == JobLayout(8, 1, 1)
    assert job_layout([16, 16], [4, 4], 40, True) == JobLayout(2, 1, 1)
    for cpus in ([1], [2], [3], [8], [2, 2], [5, 3]):
        for texts in (1, 40, 100, 10**5):
            lay = job_layout(cpus, [0] * len(cpus), texts, False)
            fits = sum(c // lay.threads for c in cpus)
            assert 1 <= lay.actors <= fits, (cpus, texts, lay)
            assert lay.actors * lay.threads <= sum(cpus)


def test_progress_moves_per_batch_within_a_shard(tiny_models, tmp_path, cache_env, monkeypatch,
                                                 caplog):  # fmt: skip
    """A shard of several batches reports each batch: run_local yields per batch, and the
    driver's progress line moves before the shard is done."""
    from gist_ray.guide import embed
    from gist_ray.models.batching import InferenceBatching
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.spec import ModelSpec

    monkeypatch.setattr(embed, "batching_for", lambda _d: InferenceBatching(8, None, None))
    data = _write(tmp_path / "pairs.jsonl", make_sentences(40, 11), make_sentences(40, 12))
    cfg = _cfg(tiny_models, data, tmp_path / "out", "train.batch_size=4")
    counts: list[int] = []

    def runner(cfg, folder, shards):
        for n in run_local(cfg, folder, shards):
            counts.append(n)
            yield n

    ticks = iter(range(0, 10**6, 2))  # every progress check sees 2 s pass: every batch logs
    clock = __import__("types").SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    monkeypatch.setattr(build, "time", clock)
    with caplog.at_level(logging.INFO, logger="gist_ray"):
        (folder,), _, _ = _ensure(cfg, runner)
    manifest = guide_cache.read_manifest(Path(folder))
    assert manifest["shards"] == 4 and manifest["shard_texts"] == 20
    assert counts == [8, 8, 4] * 4, counts  # batches of 8 within each shard of 20
    lines = [r.message for r in caplog.records if "unique texts (" in r.message]
    done = [line.split(" unique")[0].split(": ")[-1] for line in lines]
    assert done == [f"{n}/80" for n in (8, 16, 20, 28, 36, 40, 48, 56, 60, 68, 76, 80)]
    cache = guide_cache.GuideCache(folder, 40)  # and the rows are still the guide's
    guide = load_encoder(ModelSpec(str(tiny_models["guide"]), max_seq_length=32), frozen=True)
    want = torch.nn.functional.normalize(guide.encode(make_sentences(40, 12)), dim=-1)
    torch.testing.assert_close(cache.embeddings("positive", range(40)), want, rtol=0, atol=2e-3)
