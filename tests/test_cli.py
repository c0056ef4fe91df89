"""The command line's small things: --version, exit codes, and `gist-ray init`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from gist_ray import cli
from gist_ray.commands.init import write_starter
from gist_ray.config import load_config
from gist_ray.data.training import load_pairs


def test_version_names_gist_ray_and_what_it_runs_on(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gist-ray {version('gist-ray')} (Python ")
    for dep in ("ray", "torch", "transformers", "sentence-transformers", "mlflow"):
        assert f"{dep} {version(dep)}" in out


def test_version_does_not_wait_for_torch():
    code = "import sys; from gist_ray import cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_pooling_help_lists_the_implemented_poolings():
    from gist_ray.config import POOLINGS

    ev = cli.build_parser()._subparsers._group_actions[0].choices["eval"]
    (pooling,) = [a for a in ev._actions if a.dest == "pooling"]
    assert tuple(pooling.choices) == tuple(POOLINGS)
    assert pooling.help.startswith(", ".join(POOLINGS[:-1]) + " or " + POOLINGS[-1])


def test_every_subcommand_describes_itself():
    sub = cli.build_parser()._subparsers._group_actions[0]
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices) >= {
        "init", "train", "cache-guide", "mine", "config", "eval",
    }  # fmt: skip
    for name, parser in sub.choices.items():
        assert helps[name] and parser.description, name
        assert len(parser.description) > len(helps[name]), name  # says more than the list


def test_train_help_says_no_config_means_the_demo_and_how_long(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Fine-tune the student embedding model with the GISTEmbed loss" in text
    assert "Without --config it runs the offline demo" in text and "about 13 minutes" in text
    assert "gist-ray init DATA" in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "no --config: the offline demo, ~13 min on CPU" in " ".join(
        capsys.readouterr().out.split()
    )
    with pytest.raises(SystemExit):
        cli.main(["init", "--help"])
    assert "--eval-fraction F" in capsys.readouterr().out


# ----------------------------------------------------------------------------- exit codes


def _fail_with(monkeypatch, exc: BaseException, *flags: str):
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "_cmd_config", boom)
    return cli.main(["config", *flags])


def test_user_error_exits_2_with_one_line(capsys):
    assert cli.main(["config", "--set", "train.nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gist-ray: error: unknown config key 'train.nope'")


def test_an_output_dir_that_cannot_hold_the_log_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    assert cli.main(["train", "--set", f"output_dir={blocker}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"gist-ray: error: output_dir = '{blocker}': cannot write gist-ray.log")


def test_bad_command_line_exits_2():
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--no-such-flag"])
    assert done.value.code == 2


def test_unexpected_error_exits_1_with_one_line(monkeypatch, capsys):
    assert _fail_with(monkeypatch, RuntimeError("disk on fire\nsecond line")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gist-ray: error: RuntimeError: disk on fire (rerun with --debug for the traceback)"
    ]


def test_debug_shows_the_traceback(monkeypatch):
    with pytest.raises(RuntimeError, match="disk on fire"):
        _fail_with(monkeypatch, RuntimeError("disk on fire"), "--debug")


def test_interrupt_exits_130(monkeypatch, capsys):
    assert _fail_with(monkeypatch, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err.strip() == "gist-ray: interrupted"


def test_a_termination_signal_exits_143_with_where_the_run_stopped(monkeypatch, capsys):
    from gist_ray.core.errors import Interrupted

    stopped = "interrupted at step 7; last checkpoint at step 5; rerun the same command to resume"
    assert _fail_with(monkeypatch, Interrupted(stopped, signum=15)) == 143
    assert capsys.readouterr().err.strip() == f"gist-ray: {stopped}"


def test_closed_pipe_exits_141_quietly(monkeypatch, tmp_path, capsys):
    assert _fail_with(monkeypatch, BrokenPipeError()) == 141
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- init


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


QUESTIONS = [f"how do I change setting {i}" for i in range(30)]
ANSWERS = [
    f"Open the settings page, find option {i} and change it; it applies at once." for i in range(30)
]


def test_init_maps_columns_by_name_explains_and_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = _write_csv(
        tmp_path / "faq.csv",
        ["id", "question", "answer", "wrong_answer", "label"],
        [
            (i, q, a, ANSWERS[(i + 1) % 30], i % 2)
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
        ],
    )
    assert cli.main(["init", str(data), "--eval-fraction", "0"]) == 0
    text = (tmp_path / "gist-ray.yaml").read_text()
    cfg = load_config(tmp_path / "gist-ray.yaml")
    assert cfg.data.train == str(data)
    assert cfg.data.columns == {
        "anchor": "question",
        "positive": "answer",
        "negative": "wrong_answer",
    }
    assert cfg.data.max_examples == 0 and cfg.eval.source == "" and cfg.mlflow.experiment == "faq"
    ds = load_pairs(cfg.data.train, cfg.data.columns)  # what training will load
    assert ds.column_names == ["anchor", "positive", "negative_1"] and len(ds) == 30
    # every choice is explained, and the columns left out are named with the reason
    assert "anchor:   question  # name matches 'question'" in text
    assert "#   label: numbers" in text and "every row is trained on as a matching pair" in text
    assert "#   id: numbers" in text
    out = capsys.readouterr().out
    assert "anchor   <- question" in out and "not used: id, label" in out
    assert "gist-ray train --config gist-ray.yaml" in out
    assert "no held-out set: --eval-fraction 0; eval is off" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faq.csv", "gist-ray.yaml"]


def test_init_leaves_out_labels_but_keeps_repeated_queries(tmp_path):
    rows = [(QUESTIONS[i // 3], ANSWERS[i], ["yes", "no"][i % 2]) for i in range(30)]
    data = _write_csv(tmp_path / "d.csv", ["query", "document", "relevant_to"], rows)
    done = write_starter(str(data), tmp_path / "c.yaml")
    assert done.mapping.roles == {"anchor": "query", "positive": "document"}
    assert done.mapping.unused == {"relevant_to": "labels (2 distinct values)"}


def test_init_falls_back_to_contents_and_numbered_negatives(tmp_path):
    rows = [
        {"a": q, "b": a, "neg_1": ANSWERS[(i + 3) % 30], "neg_2": ANSWERS[(i + 5) % 30]}
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "my.yaml"
    assert cli.main(["init", str(data), "-o", str(out)]) == 0
    cfg = load_config(out)
    # the query side is the shorter text
    assert cfg.data.columns == {
        "anchor": "a",
        "positive": "b",
        "negative_1": "neg_1",
        "negative_2": "neg_2",
    }
    assert "anchor:     a  # shorter texts than 'b'" in out.read_text()
    assert load_pairs(cfg.data.train, cfg.data.columns).column_names[-1] == "negative_2"


def test_init_never_overwrites_without_force(tmp_path, capsys):
    data = _write_csv(tmp_path / "d.csv", ["query", "document"], zip(QUESTIONS, ANSWERS))
    out = tmp_path / "cfg.yaml"
    out.write_text("mine\n")
    assert cli.main(["init", str(data), "-o", str(out)]) == 2
    assert out.read_text() == "mine\n"
    assert "--force" in capsys.readouterr().err
    assert cli.main(["init", str(data), "-o", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["data"]["columns"] == {
        "anchor": "query",
        "positive": "document",
    }
    written = ["cfg.yaml", "d-eval", "d-train.csv", "d.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == written  # no temp file
    # the held-out files are not overwritten without --force either, under another config name
    assert cli.main(["init", str(data), "-o", str(tmp_path / "other.yaml")]) == 2
    assert "d-train.csv" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == written


def _faq_rows(n: int = 40) -> list[dict]:
    """n distinct questions; every fifth has a second answer (two rows, one anchor)."""
    rows = []
    for i in range(n):
        rows.append({"question": f"how do I change setting {i}", "answer": ANSWERS[i % 30]})
        rows[-1]["answer"] += f" (setting {i})"
        if i % 5 == 0:
            rows.append({"question": f"how do I change setting {i}", "answer": f"Ask us: {i}."})
    rows[3]["answer"] = "first line\nsecond line, with a comma"  # a quoted multi-line cell
    return rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_init_holds_out_anchors_as_a_beir_folder(tmp_path, monkeypatch, capsys, suffix):
    import pandas as pd

    from gist_ray.eval.sets import load_eval

    monkeypatch.chdir(tmp_path)
    rows = _faq_rows()
    data = tmp_path / f"faq{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".csv":
        frame.to_csv(data, index=False)
    elif suffix == ".jsonl":
        frame.to_json(data, orient="records", lines=True)
    else:
        frame.to_parquet(data)
    args = ["init", str(data), "--eval-fraction", "0.25", "--seed", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    cfg = load_config(tmp_path / "gist-ray.yaml")
    ext = ".parquet" if suffix == ".parquet" else suffix
    assert cfg.data.train == str(tmp_path / f"faq-train{ext}")
    assert (cfg.eval.source, cfg.eval.split) == (str(tmp_path / "faq-eval"), "test")
    assert "held out: 10 of 40 distinct anchors" in out and f"faq-train{ext}" in out
    # the BEIR folder: files, fields and header as BEIR has them
    folder = tmp_path / "faq-eval"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "corpus.jsonl", "qrels", "qrels/test.tsv", "queries.jsonl",
    ]  # fmt: skip
    assert json.loads((folder / "queries.jsonl").read_text().splitlines()[0]).keys() == {
        "_id", "text",
    }  # fmt: skip
    qrels = (folder / "qrels" / "test.tsv").read_text().splitlines()
    assert qrels[0] == "query-id\tcorpus-id\tscore"
    ev = load_eval(cfg.eval.source, cfg.eval.split, None, None)
    train = load_pairs(cfg.data.train, cfg.data.columns)
    held = set(ev.queries.values())
    assert len(held) == 10 and not held & set(train["anchor"])  # no anchor in both halves
    # every row is in one half: the held-out rows' positives are the relevant documents
    answers_of = {}  # as the BEIR reader gives texts: whitespace collapsed
    for r in rows:
        answers_of.setdefault(r["question"], []).append(" ".join(r["answer"].split()))
    for qid, q in ev.queries.items():
        assert sorted(ev.corpus[d] for d in ev.qrels[qid]) == sorted(answers_of[q])
    assert len(train) + sum(len(answers_of[q]) for q in held) == len(rows)
    everything = {a for answers in answers_of.values() for a in answers}
    assert set(ev.corpus.values()) == everything  # the whole data's documents
    # the training rows are the source's, in order
    kept = [r for r in rows if r["question"] not in held]
    assert list(zip(train["anchor"], train["positive"])) == [
        (r["question"], r["answer"]) for r in kept
    ]
    # the same data and seed give the same files; another seed another split
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert cli.main([*args, "--force"]) == 0
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert cli.main(["init", str(data), "--force", "--eval-fraction", "0.25", "--seed", "2"]) == 0
    assert set(load_eval(cfg.eval.source, "test", None, None).queries.values()) != held
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_init_bad_eval_fraction_is_one_line(tmp_path, capsys):
    data = _write_csv(tmp_path / "d.csv", ["query", "document"], zip(QUESTIONS, ANSWERS))
    assert cli.main(["init", str(data), "--eval-fraction", "0.8"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--eval-fraction 0.8 is not allowed" in line
    assert not (tmp_path / "gist-ray.yaml").exists()


def test_init_warns_when_training_would_refuse_the_data(tmp_path, capsys):
    rows = list(zip(QUESTIONS, ANSWERS))
    rows[4] = (QUESTIONS[4], "   ")
    data = _write_csv(tmp_path / "d.csv", ["question", "answer"], rows)
    assert cli.main(["init", str(data), "-o", str(tmp_path / "c.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning: training would refuse the data as it is" in err
    assert "line 6 of " in err  # data row 4 (0-based) after the header line


def test_init_needs_two_text_columns(tmp_path, capsys):
    data = _write_csv(tmp_path / "d.csv", ["id", "text"], enumerate(QUESTIONS))
    assert cli.main(["init", str(data), "-o", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "two text columns" in err and "id (numbers)" in err
    assert not (tmp_path / "c.yaml").exists()


# ----------------------------------------------------------------------------- a worker's error


@pytest.mark.slow  # starts a local Ray cluster through the console script
def test_a_workers_error_is_one_line_with_the_log(tiny_models, tmp_path):
    """The guide (run live, no cache) fails on a long text inside a worker: the terminal gets
    that error and where it happened, not Ray's wrapper, and the log's path; the log has the
    tracebacks."""
    import json
    import os
    import shutil

    from tests.conftest import build_short_guide, make_sentences

    data = tmp_path / "pairs.jsonl"
    rows = [{"anchor": a, "positive": p} for a, p in zip(make_sentences(16, 1), "abcdefghijklmnop")]
    rows[3]["positive"] = " ".join(make_sentences(8, 4))  # beyond the guide's 12 positions
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [
        f"model.student={tiny_models['student']}",
        f"model.guide={build_short_guide(tmp_path / 'short-guide')}",
        "model.max_seq_length=32",
        "model.guide_max_seq_length=64",
        "data.guide_cache=false",
        f"data.train={data}",
        "eval.source=",
        "train.batch_size=8",
        "train.max_steps=2",
        f"output_dir={tmp_path / 'out'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    exe = shutil.which("gist-ray") or f"{sys.executable} -m gist_ray.cli"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [*exe.split(), "train", *sum((["--set", s] for s in sets), [])],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    log = tmp_path / "out" / "gist-ray.log"
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("gist-ray: error: ") and " on Ray worker rank " in line
    assert line.endswith(f"(full log: {log})")
    assert "Training failed" not in proc.stdout + proc.stderr
    text = log.read_text()
    assert "WorkerGroupError" in text and "gist_ray/train/loop.py" in text


@pytest.mark.slow  # starts a local Ray cluster through the console script
def test_train_runs_in_the_repository_root(tiny_models, tiny_pairs_file, tmp_path):
    """The README's first command is run in a checkout: the root is then the driver's working
    directory and on every Ray worker's path, where the checkout's ``kernels/`` folder must not
    shadow Hugging Face's ``kernels`` (transformers imports it to load any model)."""
    import os
    import shutil
    import tempfile

    root = Path(__file__).resolve().parents[1]
    sets = [
        f"model.student={tiny_models['student']}",
        f"model.guide={tiny_models['guide']}",
        "model.max_seq_length=32",
        f"data.train={tiny_pairs_file}",
        "data.max_examples=0",
        "eval.source=",
        "train.batch_size=8",
        "train.max_steps=1",
        "ray.num_workers=1",
        f"output_dir={tmp_path / 'out'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    before = set(root.iterdir())
    exe = shutil.which("gist-ray") or f"{sys.executable} -m gist_ray.cli"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    temp = Path(tempfile.mkdtemp(prefix="grt-"))  # short: Ray's socket paths live under it
    env["TMPDIR"] = str(temp)
    try:
        proc = subprocess.run(
            [*exe.split(), "train", *sum((["--set", s] for s in sets), [])],
            capture_output=True, text=True, timeout=600, env=env, cwd=root,
        )  # fmt: skip
        left = sorted(p.name for p in temp.iterdir())
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert set(root.iterdir()) - before == set(), "the run wrote into the checkout"
    assert not [n for n in left if n.startswith("gist-ray-ray-")], f"Ray's temp folder: {left}"


@pytest.mark.slow  # starts a local Ray cluster through the console script
def test_init_holds_out_queries_and_training_reports_before_and_after_on_them(
    tiny_models, tmp_path
):
    """The user's path: `gist-ray init DATA --eval-fraction` on a CSV, then `gist-ray train
    --config`: the run evaluates before and after on the held-out queries, which are not in the
    training data."""
    import os
    import shutil
    import tempfile

    from tests.conftest import make_sentences

    questions, answers = make_sentences(40, 11), make_sentences(50, 12)
    rows = [(q, a) for q, a in zip(questions, answers)]
    rows += [(questions[i], answers[40 + i]) for i in range(10)]  # 10 anchors on two rows
    data = _write_csv(tmp_path / "qa.csv", ["question", "answer"], rows)
    config = tmp_path / "qa.yaml"
    exe = (shutil.which("gist-ray") or f"{sys.executable} -m gist_ray.cli").split()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    temp = Path(tempfile.mkdtemp(prefix="grt-"))  # short: Ray's socket paths live under it
    env["TMPDIR"] = str(temp)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*exe, *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
        )

    init = run("init", str(data), "-o", str(config), "--eval-fraction", "0.25", "--seed", "5")
    assert init.returncode == 0, init.stderr[-3000:]
    assert "held out: 10 of 40 distinct anchors" in init.stdout
    sets = [
        f"model.student={tiny_models['student']}",
        f"model.guide={tiny_models['guide']}",
        "model.max_seq_length=32",
        "train.batch_size=8",
        "train.max_steps=2",
        "ray.num_workers=1",
        f"output_dir={tmp_path / 'out'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    try:
        train = run("train", "--config", str(config), *sum((["--set", s] for s in sets), []))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert train.returncode == 0, train.stderr[-3000:]
    cfg = load_config(config)
    assert cfg.eval.source == str(tmp_path / "qa-eval")
    out = train.stdout.splitlines()
    (head,) = [i for i, line in enumerate(out) if line.startswith("Retrieval on ")]
    assert out[head].startswith(f"Retrieval on {tmp_path / 'qa-eval'} (split test): 10 held-out")
    assert out[head + 1].split() == ["metric", "before", "after", "change"]
    table = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out[head + 2 :][:3]}
    assert set(table) == {"ndcg@10", "recall@10", "mrr@10"}
    for before, after, change in table.values():
        assert (
            0 <= before <= 1 and 0 <= after <= 1 and change == pytest.approx(after - before, 1e-3)
        )
    # no anchor in both halves: the held-out queries are not in what training read
    trained = set(load_pairs(cfg.data.train, cfg.data.columns)["anchor"])
    queries = (tmp_path / "qa-eval" / "queries.jsonl").read_text().splitlines()
    held = {json.loads(q)["text"] for q in queries}
    assert len(held) == 10 and not held & trained
    assert len(trained) == 30 and held | trained == set(questions)
