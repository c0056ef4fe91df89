"""The console and the log file: fd-2 capture (including child processes and C-level writes),
``--verbose``, the live status line, the relay of workers' lines, and the worker's own error
surfacing out of Ray's wrapper."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest

from gist_ray.core import log
from gist_ray.train.progress import Relay, guide_cache_line, step_line

# A process that opens the log file, then writes the way third-party code does.
SCRIPT = textwrap.dedent(
    """
    import logging, os, subprocess, sys
    from gist_ray.core import log
    log.configure()
    path = log.start_log_file(sys.argv[1], verbose=sys.argv[2] == "1", title="test")
    logging.getLogger("gist_ray.demo").info("our progress line")
    logging.getLogger("gist_ray.demo").warning("our warning")
    logging.getLogger("mlflow.demo").addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("mlflow.demo").warning("a library WARNING line")
    os.write(2, b"a C-level write to fd 2\\n")
    subprocess.run(["sh", "-c", "echo a child process on stderr >&2"], check=True)
    sys.stderr.write("Loading weights: 0%\\rLoading weights: 50%\\rLoading weights: 100%\\n")
    sys.stderr.write("\\x1b[36m(RayTrainWorker pid=1)\\x1b[0m coloured\\n")
    log.console.line("gist-ray: error: the one line", "stderr")
    log.stop_log_file()
    os.write(2, b"after the log closed\\n")
    print("log:", path)
    """
)


def _run(out_dir, verbose: bool):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out_dir), "1" if verbose else "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, (out_dir / log.LOG_NAME).read_text()


THIRD_PARTY = (
    "a library WARNING line",
    "a C-level write to fd 2",
    "a child process on stderr",
    "Loading weights: 100%",
)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    """Two quiet runs into one output folder: the second run's output and the log."""
    out = tmp_path_factory.mktemp("quiet")
    _run(out, verbose=False)
    proc, text = _run(out, verbose=False)
    return out, proc, text


def test_log_file_takes_everything_but_our_lines_stay_on_the_terminal(quiet):
    out, proc, text = quiet
    assert proc.stdout.splitlines()[0] == "[gist-ray] our progress line"
    assert proc.stdout.splitlines()[-1] == f"log: {out / log.LOG_NAME}"
    assert proc.stderr.splitlines() == [
        "[gist-ray] warning: our warning",
        "gist-ray: error: the one line",
        "after the log closed",
    ]
    for line in THIRD_PARTY:
        assert line in text
    # our records, with time and level; a progress bar keeps its last state; no colour codes
    assert "INFO gist_ray.demo: our progress line" in text
    assert "WARNING gist_ray.demo: our warning" in text
    assert "Loading weights: 50%" not in text and "\x1b" not in text
    assert "(RayTrainWorker pid=1) coloured" in text
    assert "after the log closed" not in text


def test_a_rerun_appends_to_the_log(quiet):
    _, _, text = quiet
    assert text.count("===== ") == 2 and text.count("a child process on stderr") == 2


def test_verbose_shows_the_captured_output_live_and_still_logs_it(tmp_path):
    proc, text = _run(tmp_path, verbose=True)
    for line in THIRD_PARTY:
        assert line in proc.stderr and line in text
    assert "[gist-ray] our progress line" in proc.stdout


class _Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def _step(step: int, total: int) -> str:
    return step_line(step, total, 2.5, 1.75, 3e-5, 12.0, 0.03125, "0m10s")


def test_relay_draws_one_live_bar_on_a_terminal(monkeypatch):
    # (set here, not in a fixture: pytest's capture resets sys.stdout between the phases)
    monkeypatch.setenv("COLUMNS", "200")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    relay = Relay(log.Console())
    relay.show("training 2 steps, global batch 32")
    relay.show(_step(1, 2))
    relay.show("something else happened")
    relay.show(_step(2, 2))
    relay.show("after training")
    text = terminal.getvalue()
    lines = text.split("\n")
    assert lines[0] == "[gist-ray] training 2 steps, global batch 32"
    # the bar is redrawn in place (\r ... ESC[K), a line in between clears it and redraws it
    # below, and the finished bar stays as a line
    # the bar shows the smoothed loss, labelled; the step's own loss stays in the log's lines
    assert "\r[gist-ray] training " in text and "1/2  smoothed loss 1.7500  12.0 samples/s" in text
    assert "\r\x1b[K[gist-ray] something else happened\n" in text
    bar, after, end = lines[-3:]
    assert bar.endswith("2/2  smoothed loss 1.7500  12.0 samples/s  masked 3.1 %  ETA 0m10s\x1b[K")
    assert bar.rsplit("\r", 1)[-1].count("█") == 30
    assert (after, end) == ("[gist-ray] after training", "")


def test_relay_prints_one_line_per_step_and_the_guide_cache_every_10_percent(capsys):
    relay = Relay(log.Console())
    for done in (5, 9, 13, 20, 35, 99, 100):
        relay.show(guide_cache_line(done, 100, 10.0))
    relay.show(_step(1, 2))
    relay.show(_step(2, 2))
    out = capsys.readouterr().out.splitlines()
    guide = [line for line in out if "guide cache" in line]
    assert [line.split()[3] for line in guide] == ["5%", "13%", "20%", "35%", "99%", "100%"]
    assert out[-2:] == ["[gist-ray] " + _step(1, 2), "[gist-ray] " + _step(2, 2)]
    assert "\r" not in "".join(out)


def test_guide_cache_line_is_what_the_relay_parses():
    line = guide_cache_line(25, 100, 30.0)
    assert line == "guide cache: 25% of this worker's 100 texts, ETA 1m30s"


def test_worker_output_routes_our_lines_to_the_console_and_the_rest_to_stderr(capsys):
    from gist_ray.launch.cluster import WorkerOutput

    printed = []
    route = WorkerOutput(lambda data, out, ignore: printed.append((data["lines"], out)))
    route.relay = Relay(log.Console())
    route(
        {
            "pid": "42",
            "actor_name": "RayTrainWorker",
            "is_err": False,
            "lines": ["[gist-ray] " + _step(1, 4), "Reporting training result 1: ..."],
        }
    )
    route({"pid": "42", "is_err": True, "lines": ["[gist-ray] warning: disk almost full"]})
    route({"pid": "raylet", "is_err": False, "lines": ["A worker died or was killed"]})
    captured = capsys.readouterr()
    assert captured.out == "[gist-ray] " + _step(1, 4) + "\n"
    assert captured.err == "[gist-ray] warning: disk almost full\n"
    assert [lines for lines, _ in printed] == [
        ["Reporting training result 1: ..."],
        ["A worker died or was killed"],
    ]
    assert all(out is sys.stderr for _, out in printed)


def _ray_failure(failures):
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    wrapped = {
        rank: UserExceptionWithTraceback(e, f"Traceback ...\n{type(e).__name__}: {e}")
        for rank, e in failures.items()
    }
    return WorkerGroupError("\n".join(map(str, wrapped.values())), wrapped)


def test_unwrap_surfaces_the_workers_own_error():
    from gist_ray.launch.trainer import unwrap_worker_error

    err = unwrap_worker_error(
        _ray_failure({0: RuntimeError("CUDA error: out of memory\nmore detail")})
    )
    assert type(err) is RuntimeError and err.gist_ray_origin == "Ray worker rank 0"
    from gist_ray.cli import _one_line

    assert _one_line(err) == "RuntimeError on Ray worker rank 0: CUDA error: out of memory"


def test_unwrap_prefers_a_user_error_over_its_fallout_on_other_ranks():
    from gist_ray.core.errors import DataError
    from gist_ray.launch.trainer import unwrap_worker_error

    user = DataError("pairs.csv: column 'anchor' row 3 is empty")
    err = unwrap_worker_error(_ray_failure({0: RuntimeError("Connection closed by peer"), 1: user}))
    assert err is user


def test_unwrap_surfaces_the_train_controllers_error():
    from ray.train import ControllerError

    from gist_ray.launch.trainer import unwrap_worker_error

    err = unwrap_worker_error(ControllerError(TimeoutError("worker group did not start in 60 s")))
    assert type(err) is TimeoutError and err.gist_ray_origin == "the Ray Train controller"


def test_unwrap_leaves_an_error_without_a_worker_error_alone():
    from gist_ray.launch.trainer import unwrap_worker_error

    e = ValueError("not from Ray")
    assert unwrap_worker_error(e) is e


def test_a_change_that_rounds_to_zero_is_never_negative_zero():
    assert log.fmt_change(-1e-7) == "   +0.0000"
    assert log.fmt_change(-0.0) == "   +0.0000"
    assert log.fmt_change(0.04995) == "   +0.0500"
    assert log.fmt_change(-0.0123) == "   -0.0123"
    assert log.fmt_change(float("nan")).strip() == "+nan"
