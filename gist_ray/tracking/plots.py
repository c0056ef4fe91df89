"""PNG plots of a run, drawn from its MLflow metric history after training.

Uses matplotlib's object API (``Figure`` renders with Agg, no display, no pyplot state), so it
works on headless nodes and inside threads.
"""

from __future__ import annotations

from pathlib import Path

from gist_ray.core.fileio import atomic_file
from gist_ray.eval.metrics import REPORTED
from gist_ray.tracking.runs import metric_name

# (file, title, metric keys or a prefix ending in "/"); eval keys are MLflow names (no "@").
PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss.png", "training loss", ("loss",)),
    ("lr.png", "learning rate", ("lr",)),
    ("mask_frac.png", "share of candidates masked by the guide, per segment", ("mask_frac/",)),
    (
        "gist_diagnostics.png",
        "GIST diagnostics",
        ("threshold_mean", "positive_rank_mean", "no_negative_frac"),
    ),
    ("eval.png", "retrieval on the eval set", tuple(f"eval/{metric_name(m)}" for m in REPORTED)),
)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; a step logged twice (a replay) keeps its latest value."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(s, v) for s, (_, v) in sorted(by_step.items())]


def plot_run(tracking_uri: str, run_id: str, out_dir: str | Path) -> list[Path]:
    """Write the plots that have data to ``out_dir``; return their paths."""
    import mlflow
    from matplotlib.figure import Figure

    client = mlflow.MlflowClient(tracking_uri)
    logged = sorted(client.get_run(run_id).data.metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, title, wanted in PLOTS:
        keys = [
            k for w in wanted for k in logged if (k.startswith(w) if w.endswith("/") else k == w)
        ]
        series = {k: history(client, run_id, k) for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        # Diagnostics have different scales: one panel each; the rest share one axis.
        panels = len(series) if filename == "gist_diagnostics.png" else 1
        fig = Figure(figsize=(7, 2.6 * panels if panels > 1 else 4), dpi=100)
        axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
        for i, (key, points) in enumerate(series.items()):
            ax = axes[i if panels > 1 else 0]
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=key)
            if panels > 1:
                ax.set_ylabel(key, fontsize=8)
        if panels == 1 and len(series) > 1:
            axes[0].legend(fontsize=8)
        axes[0].set_title(title)
        axes[-1].set_xlabel("step")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / filename
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
        written.append(path)
    return written
