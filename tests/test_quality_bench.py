"""The quality benchmark's statistics and bookkeeping (benchmarks/quality.py), without training:
the paired two-level bootstrap on synthetic scores whose answer is known, and a rerun that finds
every run finished and only summarises."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    # benchmarks/ is not a package: load the script from its path.
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


q = _load()


def test_constant_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(1)
    b = rng.uniform(0, 1, size=(5, 40))
    r = q.paired_interval((b + 0.03).tolist(), b.tolist(), reps=500)
    assert r["diff"] == pytest.approx(0.03)
    assert r["lo"] == pytest.approx(0.03) and r["hi"] == pytest.approx(0.03)
    assert (r["seeds"], r["questions"]) == (5, 40)


def test_swapping_the_sides_negates_the_interval():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(size=(3, 30)), rng.uniform(size=(3, 30))
    ab, ba = q.paired_interval(a, b, reps=500), q.paired_interval(b, a, reps=500)
    assert ab["diff"] == pytest.approx(-ba["diff"])
    assert ab["lo"] == pytest.approx(-ba["hi"]) and ab["hi"] == pytest.approx(-ba["lo"])


def test_the_interval_widens_with_seed_to_seed_variation():
    """Differences that vary only from seed to seed (every question alike within a seed): a
    bootstrap over questions alone would give a zero-width interval; this one must not."""
    offsets = np.array([-0.04, -0.01, 0.0, 0.02, 0.03]) + 0.01  # mean 0.01
    b = np.full((5, 50), 0.5)
    r = q.paired_interval((b + offsets[:, None]).tolist(), b.tolist(), reps=2000)
    assert r["diff"] == pytest.approx(0.01)
    assert r["lo"] < 0.0 < 0.02 < r["hi"]  # spans most of the seeds' spread
    assert r["lo"] >= offsets.min() - 1e-12 and r["hi"] <= offsets.max() + 1e-12


def test_the_interval_covers_the_true_difference_in_most_samples():
    """Scores drawn from a model with a known mean difference (0.05) plus seed and question
    noise: the 95 % interval covers 0.05 in most of 40 independent samples, and excludes 0 in
    most of them (the noise is small next to the difference)."""
    rng = np.random.default_rng(3)
    covered = excludes_zero = 0
    for _ in range(40):
        base = rng.uniform(0.3, 0.9, size=200)  # question difficulty, shared by both methods
        a = base + 0.05 + rng.normal(0, 0.01, size=(5, 1)) + rng.normal(0, 0.15, size=(5, 200))
        b = base + rng.normal(0, 0.01, size=(5, 1)) + rng.normal(0, 0.15, size=(5, 200))
        r = q.paired_interval(a, b, reps=400, seed=int(rng.integers(1 << 30)))
        covered += r["lo"] <= 0.05 <= r["hi"]
        excludes_zero += r["lo"] > 0
    assert covered >= 32
    assert excludes_zero >= 32


def test_an_untrained_model_pairs_with_every_seed():
    a = [[0.6, 0.8], [0.7, 0.9]]
    r = q.paired_interval(a, [[0.5, 0.5]], reps=200)
    assert r["diff"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unpaired"):
        q.paired_interval(a, [[0.5, 0.5, 0.5]] * 2)


def test_spread_is_over_the_per_seed_means():
    s = q.spread([[0.4, 0.6], [0.6, 0.8]])  # per-seed means 0.5 and 0.7
    assert s["mean"] == pytest.approx(0.6)
    assert s["std"] == pytest.approx(0.02**0.5)
    assert (s["min"], s["max"], s["seeds"]) == (pytest.approx(0.5), pytest.approx(0.7), 2)
    assert q.spread([[0.3, 0.5]])["std"] == 0.0


def test_plan_runs_base_once_then_seed_by_seed():
    plan = q.planned(["base", "st-gist", "gr-1w"], [42, 43])
    assert plan == [("base", None), ("st-gist", 42), ("gr-1w", 42), ("st-gist", 43), ("gr-1w", 43)]


def test_pending_skips_only_runs_finished_under_the_same_settings():
    plan = q.planned(["base", "gr-1w"], [42])
    done = {
        "base": {"eval_key": "E", "train_key": q.digest(q.train_settings("base", None, "R"))},
        "gr-1w/s42": {"eval_key": "E", "train_key": q.digest(q.train_settings("gr-1w", 42, "R"))},
    }
    assert q.pending(plan, done, "E", "R") == []
    assert q.pending(plan, done, "other eval", "R") == plan  # another eval set: redo every eval
    assert q.pending(plan, done, "E", "other rows") == plan  # other rows: retrain
    assert q.pending(q.planned(["gr-1w"], [42, 43]), done, "E", "R") == [("gr-1w", 43)]


def test_load_done_tolerates_a_missing_or_broken_file(tmp_path):
    assert q.load_done(tmp_path / "none.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert q.load_done(tmp_path / "bad.json") == {}


def test_a_rerun_with_every_run_finished_only_summarises(tmp_path, capsys):
    """Finished runs (here: synthetic scores) are read back from the JSON and not run again;
    the summary pairs seed k with seed k and writes the JSON atomically in place."""
    work, out = tmp_path / "work", tmp_path / "quality.json"
    work.mkdir()
    _, rows_key = q.write_rows(work)
    eval_key = q.digest(q.build_evalset(5, 3, 10))
    runs = {}
    scores = {
        ("base", None): [0.5] * 5,
        ("st-gist", 42): [0.6] * 5,
        ("st-gist", 43): [0.7] * 5,
        ("gr-1w", 42): [0.65] * 5,
        ("gr-1w", 43): [0.75] * 5,
    }
    for (m, s), sc in scores.items():
        runs[q.run_key(m, s)] = {
            "method": m,
            "seed": s,
            "eval_key": eval_key,
            "train_key": q.digest(q.train_settings(m, s, rows_key)),
            "pools": sc,
            "distractors": [x - 0.1 for x in sc],
        }
    out.write_text(json.dumps({"runs": runs}))
    argv = ["--methods", "base,st-gist,gr-1w", "--seeds", "2", "--questions", "5", "--pool", "3"]
    argv += ["--distractors", "10", "--work", str(work), "--json", str(out)]
    assert q.main(argv) == 0
    assert "5 runs, 5 already done" in capsys.readouterr().out
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == []  # nothing trained
    res = json.loads(out.read_text())
    assert res["runs"] == runs
    m = res["summary"]["methods"]
    assert m["gr-1w"]["pools"]["mean"] == pytest.approx(0.70)
    assert m["gr-1w"]["pools"]["std"] == pytest.approx(0.005**0.5)  # of 0.65, 0.75
    comp = {(c["a"], c["b"]): c for c in res["summary"]["comparisons"]}
    gap = comp[("gr-1w", "st-gist")]["pools"]
    assert gap["diff"] == pytest.approx(0.05) and gap["lo"] == pytest.approx(0.05)
    assert comp[("gr-1w", "base")]["distractors"]["diff"] == pytest.approx(0.2)
    assert not list(tmp_path.glob(".quality.*"))  # no temp file left beside the JSON
