"""The documented cluster path: `ray job submit ... -- gist-ray train --config FILE` against a
real Ray head (started here on 127.0.0.1 in a subprocess, own ports and temp dir), with the
job's driver connecting to it through RAY_ADDRESS.

The head is stopped by killing its own process group, never with `ray stop`: that kills every
Ray process on the machine by name (the session's Ray instance included)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict[str, str]:
    """No token auth for this throwaway head (Ray 2.60 would otherwise generate a token), and
    none of the session's Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's unix sockets live under it and paths are limited to ~107 bytes.
    tmp = tempfile.mkdtemp(prefix="grh-")
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - closed in the finally below
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        "--num-cpus=2",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(tmp) / 'head.log').read_text()}")
            try:
                urllib.request.urlopen(f"{address}/api/jobs/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "tmp": tmp}
    finally:
        # The head, its raylet, workers and the job supervisor share this process group; a
        # job driver (own session) is killed by Ray's watcher when its supervisor dies.
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        with_kill = time.monotonic() + 5
        while time.monotonic() < with_kill:  # the group may outlive its leader briefly
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _job_config(tiny_models, tiny_pairs_file, tmp_path) -> dict:
    return {
        "model": {
            "student": str(tiny_models["student"]),
            "guide": str(tiny_models["guide"]),
            "max_seq_length": 32,
        },
        "data": {"train": str(tiny_pairs_file), "max_examples": 0},
        "eval": {"source": ""},
        "train": {"batch_size": 8, "max_steps": 2, "checkpoint_every": 1, "max_failures": 1},
        "ray": {"num_workers": 1},  # one worker keeps the job cheap; 2 workers: the fault test
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "experiment": "jobs",
            "run_name": "job",
        },
        "output_dir": str(tmp_path / "out"),
    }


def _submit(ray_head, config: dict, job_dir: Path, checkout: Path | None = None) -> tuple[str, str]:
    """``ray job submit --working-dir job_dir -- gist-ray train --config job.yaml``, or with
    ``checkout``: ``--working-dir .`` run in that folder, the config given by its absolute path;
    returns the job's final status and its logs."""
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(yaml.safe_dump(config))
    working_dir, config_arg = (job_dir, "job.yaml")
    if checkout is not None:
        working_dir, config_arg = ".", job_dir / "job.yaml"
    job_id = f"gist-ray-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    submit = [
        RAY,
        "job",
        "submit",
        "--address",
        ray_head["address"],
        "--submission-id",
        job_id,
        "--working-dir",
        str(working_dir),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "gist-ray",
        "train",
        "--config",
        str(config_arg),
    ]
    try:
        proc = subprocess.run(
            submit, capture_output=True, text=True, timeout=420, env=_env(), cwd=checkout
        )
    except subprocess.TimeoutExpired:
        subprocess.run(
            [RAY, "job", "stop", "--address", ray_head["address"], job_id],
            env=_env(),
            timeout=60,
        )
        raise
    status = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)",
            ray_head["address"],
            job_id,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    logs = proc.stdout[-6000:] + proc.stderr[-3000:] + status.stderr[-2000:]
    return (status.stdout.strip().splitlines() or ["(no status)"])[-1], logs


def test_ray_job_submit_trains_on_an_existing_cluster(
    ray_head, tiny_models, tiny_pairs_file, tmp_path
):
    import mlflow

    config = _job_config(tiny_models, tiny_pairs_file, tmp_path)
    status, logs = _submit(ray_head, config, tmp_path / "job")
    assert status == "SUCCEEDED", logs
    # The job's driver joined this cluster through RAY_ADDRESS instead of starting its own
    # (Ray reports the GCS under the machine's IP even with --node-ip-address=127.0.0.1).
    gcs_port = ray_head["gcs"].rsplit(":", 1)[1]
    assert re.search(rf"\[gist-ray\] joined the Ray cluster at \S+:{gcs_port}\b", logs)
    # Ray's own lines are in the run's log file, not in the job's output
    assert "Connecting to existing Ray cluster" not in logs
    log_file = tmp_path / "out" / "gist-ray.log"
    assert "Connecting to existing Ray cluster" in log_file.read_text()

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("jobs")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'job'")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.tags.get("gist_ray.model_uri"), "the trained model is logged to the run"
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_ray_job_submit_with_the_checkout_as_working_dir_trains(
    ray_head, tiny_models, tiny_pairs_file, tmp_path
):
    """``ray job submit --working-dir . -- gist-ray train ...`` from the repository root: the
    job's copy of the checkout is first on its driver's and workers' path, so its ``kernels/``
    folder must not shadow Hugging Face's ``kernels`` (transformers imports it to load models),
    and its ``gist_ray`` must find its own kernels."""
    config = _job_config(tiny_models, tiny_pairs_file, tmp_path)
    config["data"]["guide_cache"] = True  # the cache job's Ray Data actors load the guide too
    status, logs = _submit(ray_head, config, tmp_path / "job", checkout=ROOT)
    assert status == "SUCCEEDED", logs
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert "CUDAProperties" not in (tmp_path / "out" / "gist-ray.log").read_text()


def test_a_relative_output_dir_in_a_job_is_refused_in_one_line(
    ray_head, tiny_models, tiny_pairs_file, tmp_path
):
    """Ray deletes the job's copy of --working-dir when the job ends: a relative output_dir
    would put the model there. The job fails at once, saying what to set."""
    config = {**_job_config(tiny_models, tiny_pairs_file, tmp_path), "output_dir": "out"}
    status, logs = _submit(ray_head, config, tmp_path / "job")
    assert status == "FAILED", logs
    # `ray job submit` shows the job's log, and again in its failure summary.
    (line,) = {x for x in logs.splitlines() if x.startswith("gist-ray: error:")}
    assert "output_dir = 'out' lies in this Ray job's temporary copy of --working-dir" in line
    assert "set output_dir to an absolute path" in line
    assert "Traceback" not in logs
    assert not (tmp_path / "mlflow.db").exists(), "nothing started before the check"


def test_ray_job_stop_marks_the_run_killed_and_says_where_to_resume(
    ray_head, tiny_models, tiny_pairs_file, tmp_path
):
    """``ray job stop`` sends the job's driver SIGTERM (and SIGKILL 3 s later): the run ends
    KILLED and the job's log ends with the interrupt's line."""
    import mlflow

    config = _job_config(tiny_models, tiny_pairs_file, tmp_path)
    config["train"] = {"batch_size": 8, "max_steps": 300, "checkpoint_every": 5}
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.yaml").write_text(yaml.safe_dump(config))
    job_id = f"gist-ray-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    job = [RAY, "job"]
    where = ["--address", ray_head["address"]]
    subprocess.run(
        [*job, "submit", *where, "--submission-id", job_id, "--no-wait", "--working-dir"]
        + [str(job_dir), "--runtime-env-json", json.dumps(runtime_env), "--"]
        + ["gist-ray", "train", "--config", "job.yaml"],
        check=True,
        capture_output=True,
        timeout=120,
        env=_env(),
    )
    checkpoints = tmp_path / "out" / "ray" / "job"
    deadline = time.monotonic() + 300
    # Two checkpoint folders: the first is committed (a worker writes the next only then).
    while len(list(checkpoints.glob("checkpoint-*"))) < 2:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    subprocess.run([*job, "stop", *where, job_id], capture_output=True, timeout=120, env=_env())
    logs = subprocess.run(
        [*job, "logs", *where, job_id], capture_output=True, text=True, timeout=60, env=_env()
    ).stdout
    stopped = re.search(
        r"gist-ray: interrupted at step \d+; last checkpoint at step (\d+); "
        r"rerun the same command to resume",
        logs,
    )
    assert stopped, logs[-3000:]
    assert (checkpoints / f"checkpoint-{int(stopped.group(1)):07d}").is_dir()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("jobs")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'job'")
    assert run.info.status == "KILLED"
