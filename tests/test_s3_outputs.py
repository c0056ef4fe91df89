"""Outputs on object storage, against a real S3 server (moto's, on 127.0.0.1): ``output_dir``,
``ray.storage_path`` and ``mlflow.artifact_location`` on ``s3://`` for ``gist-ray train`` (the
CLI in a subprocess, its own local Ray cluster), the best model uploaded at each update,
``mine`` writing and resuming its output on ``s3://``, and every bad location refused in one line
before Ray or an MLflow run starts. No ``s3:`` folder may appear on the local disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gist_ray.config import load_config
from gist_ray.core import storage
from gist_ray.core.errors import ConfigError
from gist_ray.launch.paths import check_command
from gist_ray.models.best import read_best, save_best
from tests.s3 import local_s3_folders

ROOT = Path(__file__).resolve().parents[1]


def _gist_ray(
    args: list[str], cwd: Path, tmpdir: Path, **extra_env: str
) -> subprocess.CompletedProcess:
    """``gist-ray ARGS`` in a subprocess with this session's S3 endpoint and credentials (in
    os.environ, from the s3_server fixture), its own temp folder and working directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), **extra_env}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "gist_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )


def _sets(values: list[str]) -> list[str]:
    return sum((["--set", v] for v in values), [])


def _runs(db: Path) -> dict[str, str]:
    """run id -> status of every run in the store (none when the store was never created)."""
    import mlflow

    if not db.exists():
        return {}
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r.info.status for r in client.search_runs(ids)} if ids else {}


def _leftovers(tmpdir: Path) -> list[str]:
    """What gist-ray or Ray's checkpoint download left in a temp folder."""
    return sorted(
        p.name for p in tmpdir.iterdir() if p.name.startswith(("gist-ray-", "checkpoint_tmp"))
    )


# ----------------------------------------------------------------------------- preflight


def test_preflight_names_the_key_and_the_uri_of_a_missing_bucket(s3_server, tmp_path):
    bucket = s3_server.bucket()
    base = [f"data.train={tmp_path / 'x.jsonl'}", f"output_dir={bucket}/out"]
    check_command(load_config(overrides=base), "train")  # a good bucket passes
    cases = {
        "output_dir": [f"output_dir={bucket}-gone/out"],
        "ray.storage_path": [f"ray.storage_path={bucket}-gone/ray"],
        "mlflow.artifact_location": [f"mlflow.artifact_location={bucket}-gone/mlflow"],
        "data.guide_cache_dir": [f"data.guide_cache_dir={bucket}-gone/cache"],
        "data.train": [f"data.train={bucket}-gone/train.jsonl"],
    }
    for key, overrides in cases.items():
        cfg = load_config(overrides=[*base, *overrides])
        with pytest.raises(ConfigError) as err:
            check_command(cfg, "train")
        message = str(err.value)
        assert message.startswith(f"{key} = '{bucket}-gone/"), message
        assert "does not exist" in message and "\n" not in message
    mined = load_config(overrides=[*base, f"mine.output={bucket}-gone/m.parquet"])
    with pytest.raises(ConfigError, match=r"^mine\.output = .*does not exist"):
        check_command(mined, "mine")
    assert s3_server.keys(bucket) == [], "the write probe was removed"


def test_an_s3_artifact_store_without_boto3_is_refused_with_the_extra(
    s3_server, tmp_path, monkeypatch
):
    bucket = s3_server.bucket()
    cfg = load_config(
        overrides=[f"data.train={tmp_path / 'x.jsonl'}", f"mlflow.artifact_location={bucket}/m"]
    )
    check_command(cfg, "train")
    monkeypatch.setitem(sys.modules, "boto3", None)  # what Python does for a missing module
    with pytest.raises(ConfigError) as err:
        check_command(cfg, "train")
    assert str(err.value).startswith(f"mlflow.artifact_location = '{bucket}/m'")
    assert "pip install 'gist-ray[cloud]'" in str(err.value)


def test_a_missing_bucket_fails_in_one_line_before_ray_or_mlflow(
    s3_server, tiny_models, tiny_pairs_file, tmp_path
):
    """The command line: exit 2, one line naming the key and the URI, no MLflow run (the
    store is not even created), no Ray session, nothing on the local disk."""
    gone = f"{s3_server.bucket()}-gone"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _gist_ray(
        [
            "train",
            *_sets(
                [
                    f"model.student={tiny_models['student']}",
                    f"model.guide={tiny_models['guide']}",
                    f"data.train={tiny_pairs_file}",
                    f"output_dir={gone}/out",
                    f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                ]
            ),
        ],
        tmp_path,
        tmpdir,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"gist-ray: error: output_dir = '{gone}/out': "), line
    assert "does not exist" in line
    assert _runs(tmp_path / "mlflow.db") == {}
    assert not any("ray" in p.name for p in tmpdir.iterdir()), list(tmpdir.iterdir())
    assert local_s3_folders(tmp_path) == []


@pytest.fixture
def strict_s3(tmp_path):
    """A second S3 server that checks credentials (moto's IAM enforcement from the first request:
    no user exists, so every key is unknown)."""
    from tests.s3 import S3Server

    server = S3Server(tmp_path / "strict.log", INITIAL_NO_AUTH_ACTION_COUNT="0")
    yield server
    server.stop()


def test_refused_credentials_fail_in_one_line_before_ray_or_mlflow(
    s3_server, strict_s3, tiny_models, tiny_pairs_file, tmp_path
):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _gist_ray(
        [
            "train",
            *_sets(
                [
                    f"model.student={tiny_models['student']}",
                    f"model.guide={tiny_models['guide']}",
                    f"data.train={tiny_pairs_file}",
                    "output_dir=s3://team-bucket/out",
                    f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                ]
            ),
        ],
        tmp_path,
        tmpdir,
        AWS_ENDPOINT_URL=strict_s3.endpoint,
        AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gist-ray: error: output_dir = 's3://team-bucket/out': "), line
    assert "check the credentials" in line
    assert _runs(tmp_path / "mlflow.db") == {}
    assert not any("ray" in p.name for p in tmpdir.iterdir()), list(tmpdir.iterdir())
    assert local_s3_folders(tmp_path) == []


# ----------------------------------------------------------------------------- best model


def test_the_best_model_is_uploaded_at_each_update(s3_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = f"{s3_server.bucket()}/out"

    def model(files: dict[str, str]):
        def write(folder: Path) -> None:
            for name, text in files.items():
                (folder / name).write_text(text)

        return write

    assert read_best(out, "r") is None
    where = save_best(out, {"step": 2, "value": 0.5, "run_id": "r"}, model({"a": "1", "b": "2"}))
    assert where == f"{out}/best-model"
    assert read_best(out, "r")["step"] == 2 and read_best(out, "other") is None
    save_best(out, {"step": 4, "value": 0.7, "run_id": "r"}, model({"a": "3"}))
    assert read_best(out, "r")["step"] == 4
    keys = s3_server.keys(out)
    assert sorted(k.split("/", 1)[1] for k in keys) == ["best-model.json", "best-model/a"]
    assert storage.read_text(f"{out}/best-model/a") == "3", "no file of the earlier model stays"
    assert local_s3_folders(tmp_path) == []


# ----------------------------------------------------------------------------- resume record


def test_run_record_and_fresh_on_s3(s3_server, tmp_path, monkeypatch):
    """run.json is read and written through the store (a rerun finds it), and --fresh deletes
    the earlier run's checkpoints in the bucket and the record."""
    from gist_ray.launch import resume

    monkeypatch.chdir(tmp_path)
    out = f"{s3_server.bucket()}/out"
    cfg = load_config(overrides=[f"data.train={tmp_path / 'x.jsonl'}", f"output_dir={out}"])
    assert resume.read_record(cfg) is None
    resume.write_record(cfg, resume.RunRecord("gist-ray-1a2b3c4d", "abc"))
    record = resume.read_record(cfg)
    assert record == resume.RunRecord("gist-ray-1a2b3c4d", "abc")
    assert resume.run_dir(cfg, record.ray_name) == f"{out}/ray/gist-ray-1a2b3c4d"
    storage.write_bytes(f"{out}/ray/gist-ray-1a2b3c4d/checkpoint-0000001/state.pt", b"x" * 100)
    storage.write_bytes(f"{out}/ray/other/checkpoint-0000001/state.pt", b"y")
    assert resume.du(f"{out}/ray") == 101
    resume.discard(cfg, record)
    assert sorted(k.split("/", 1)[1] for k in s3_server.keys(out)) == [
        "ray/other/checkpoint-0000001/state.pt"
    ]
    assert resume.read_record(cfg) is None
    assert local_s3_folders(tmp_path) == []


def test_a_refusal_after_the_mlflow_run_opened_closes_it_failed(tmp_path):
    from gist_ray.tracking import runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = runs.start_run(uri, "refused", None, {}, {})
    with pytest.raises(ConfigError), runs.failed_if_raises(uri, run_id):
        raise ConfigError("output_dir = 's3://b/out': cannot write there")
    assert _runs(tmp_path / "mlflow.db") == {run_id: "FAILED"}


# ----------------------------------------------------------------------------- mine --out


@pytest.fixture
def mine_data(tmp_path) -> Path:
    from tests.conftest import make_sentences

    a, p = make_sentences(48, 21), make_sentences(48, 22)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": x, "positive": y}) + "\n" for x, y in zip(a, p)))
    return path


def test_mine_writes_and_resumes_its_output_on_s3(
    s3_server, tiny_models, mine_data, tmp_path, monkeypatch
):
    """``mine --out s3://...``: the parts are objects beside the output, so a rerun after an
    interruption continues at the next part; the output equals a local run's."""
    from gist_ray.commands import mine as command
    from gist_ray.mining import output

    monkeypatch.setenv("GIST_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bucket = s3_server.bucket()
    out = f"{bucket}/mined/pairs.jsonl"

    def cfg(target: str):
        return load_config(
            overrides=[
                f"model.student={tiny_models['student']}",
                f"model.guide={tiny_models['guide']}",
                "model.max_seq_length=32",
                f"data.train={mine_data}",
                "data.max_examples=0",
                f"output_dir={tmp_path / 'out'}",
                f"mine.output={target}",
                "mine.k=2",
                "mine.part_rows=16",
                "mine.threshold=none",
                "mine.backend=torch",
            ]
        )

    local = tmp_path / "local.jsonl"
    command.mine(cfg(str(local)))
    calls, real = [], command.mine_part

    def dies_after_two(*args, **kwargs):
        calls.append(args[5])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as Ctrl-C between parts
        return real(*args, **kwargs)

    monkeypatch.setattr(command, "mine_part", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        command.mine(cfg(out))
    keys = s3_server.keys(bucket)
    assert sorted(keys) == [
        "mined/.pairs.jsonl.parts/manifest.json",
        "mined/.pairs.jsonl.parts/part-00000.parquet",
        "mined/.pairs.jsonl.parts/part-00001.parquet",
    ], "no complete-looking output, the two parts kept"
    calls.clear()
    [summary] = command.mine(cfg(out))
    assert calls == [32], "resumed at the third part"
    assert summary.output == out
    assert storage.read_bytes(out) == local.read_bytes()
    assert sorted(s3_server.keys(bucket)) == ["mined/pairs.jsonl", "mined/pairs.jsonl.mine.json"]
    assert storage.read_json(output.sidecar(out))["sha256"] == output.sha256_file(local)
    calls.clear()
    [again] = command.mine(cfg(out))
    assert again.reused and calls == []
    assert local_s3_folders(tmp_path) == []


# ----------------------------------------------------------------------------- train


@pytest.mark.slow  # two CLI runs, each with its own local Ray cluster
def test_train_with_every_output_on_s3_then_a_rerun(
    s3_server, tiny_models, tiny_pairs_file, tmp_path
):
    """output_dir, ray.storage_path (its default, under output_dir) and MLflow's artifacts on
    s3://: the model, run.json, the log, the checkpoints and the artifacts are objects in the
    bucket; the stored model loads; the worker killed after step 2 resumes from the step-1
    checkpoint downloaded from S3; nothing is left in the temp folder or as ./s3:; a rerun of
    the finished run exports it again from its checkpoint on S3, in the same MLflow run."""
    import mlflow
    from sentence_transformers import SentenceTransformer

    bucket = s3_server.bucket()
    out = f"{bucket}/run"
    db = tmp_path / "mlflow.db"
    tmpdir = Path(tempfile.mkdtemp(prefix="grt-"))  # short: Ray's socket paths live under it
    args = [
        "train",
        *_sets(
            [
                f"model.student={tiny_models['student']}",
                f"model.guide={tiny_models['guide']}",
                "model.max_seq_length=32",
                f"data.train={tiny_pairs_file}",
                "data.max_examples=0",
                "data.guide_cache=false",
                "eval.source=",
                "train.batch_size=8",
                "train.max_steps=3",
                "train.checkpoint_every=1",
                "train.max_failures=1",
                "ray.num_workers=1",
                f"output_dir={out}",
                f"mlflow.tracking_uri=sqlite:///{db}",
                f"mlflow.artifact_location={bucket}/mlflow",
            ]
        ),
    ]
    try:
        # rank 0 kills itself after step 2, before its checkpoint: Ray restarts it from step 1's
        first = _gist_ray(args, tmp_path, tmpdir, GIST_RAY_FAULT_INJECT="0@2")
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
        left = _leftovers(tmpdir)
        keys = s3_server.keys(bucket)
        record = storage.read_json(f"{out}/run.json")
        assert {"run/model/model.safetensors", "run/run.json", "run/gist-ray.log"} <= set(keys)
        checkpoints = {
            k.split("/")[3]
            for k in keys
            if k.startswith(f"run/ray/{record['ray_name']}/checkpoint-")
        }
        assert checkpoints, keys
        assert any(k.startswith("mlflow/") and k.endswith("/config.yaml") for k in keys), keys
        assert any(k.startswith("mlflow/") and "model.safetensors" in k for k in keys), keys
        assert f"model:       {out}/model" in first.stdout
        assert "stored:      " in first.stdout and f"in {out} (model " in first.stdout
        assert f"full log:    {out}/gist-ray.log" in first.stdout
        assert left == [], left
        model = storage.download(f"{out}/model", tmp_path / "downloaded")
        emb = SentenceTransformer(str(model), device="cpu").encode(["a question"])
        assert emb.shape == (1, 32)
        runs = _runs(db)
        assert list(runs.values()) == ["FINISHED"] and record["mlflow_run_id"] in runs
        assert "run/.faults/rank0-step2" in keys, "the fault marker went to the bucket"
        history = mlflow.MlflowClient(f"sqlite:///{db}").get_metric_history(
            record["mlflow_run_id"], "loss"
        )
        assert sorted(m.step for m in history) == [1, 2, 3], "every step once after the restart"
        assert "resumed from" in first.stdout + storage.read_text(f"{out}/gist-ray.log")

        again = _gist_ray(args, tmp_path, tmpdir)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
        assert "already complete (3/3 steps" in again.stdout
        assert _runs(db) == {record["mlflow_run_id"]: "FINISHED"}, "one MLflow run"
        assert storage.read_json(f"{out}/run.json") == record
        log = storage.read_text(f"{out}/gist-ray.log")
        assert log.count("===== ") == 2, "the rerun appended to the stored log"
        assert _leftovers(tmpdir) == [], "the downloaded checkpoint was removed"
        assert local_s3_folders(tmp_path) == []
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
