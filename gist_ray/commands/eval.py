"""``gist-ray eval``: retrieval and STS metrics of one model, or two side by side.

Retrieval runs on a BEIR-style folder (queries.jsonl, corpus.jsonl, qrels/<split>.tsv or
qrels.tsv) or the built-in ``insuranceqa``; STS on a file of scored pairs (see gist_ray.eval.sts).
Results print as a table and, with ``output``, are written as JSON (atomically).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gist_ray.core import fileio
from gist_ray.core.errors import GistRayError
from gist_ray.core.log import fmt_change
from gist_ray.eval.metrics import REPORTED
from gist_ray.models.loading import quiet_hf

log = logging.getLogger(__name__)

SHOWN = REPORTED
STS_SHOWN = ("spearman", "pearson")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GistRayError(f"--device {name}: no CUDA device is available; use --device cpu")
    return torch.device(name)


def _load(name: str, key: str, pooling: str | None, max_len: int | None, device):
    """Load a model as a user would (its own pooling, max length and prompts); ``pooling`` and
    ``max_len`` override them when given."""
    from gist_ray.core.assets import resolve_model_path
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.loading import pooling_of
    from gist_ray.models.spec import ModelSpec

    spec = ModelSpec(
        name,
        key,
        pooling=pooling or "",
        max_seq_length=max_len or 0,
        export_max_seq_length=max_len or 0,
    )
    enc = load_encoder(spec, device, frozen=True)
    info = {
        "model": name,
        "path": resolve_model_path(name),
        "pooling": pooling_of(enc.model),
        "max_seq_length": enc.model.max_seq_length,
    }
    return enc, info


@quiet_hf()
def evaluate(
    model: str,
    *,
    compare: str | None = None,
    data: str | None = None,
    split: str = "test",
    sts: str | None = None,
    max_queries: int = 200,
    max_corpus: int = 2000,
    pooling: str | None = None,
    max_seq_length: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    seed: int = 0,
    output: str | None = None,
    progress: bool | None = None,
    dims: Sequence[int] = (),
) -> dict[str, Any]:
    """Evaluate ``model`` (and ``compare``); print the table; return (and write) the results.

    Without ``data`` and ``sts``, retrieval runs on the built-in insuranceqa. 0 in
    ``max_queries`` / ``max_corpus`` means all. ``dims``: Matryoshka widths, retrieval also on
    the embeddings truncated to each (re-normalised)."""
    from gist_ray.eval.metrics import retrieval_metrics
    from gist_ray.eval.sets import load_eval
    from gist_ray.eval.sts import load_sts, sts_metrics

    if data is None and sts is None:
        data = "insuranceqa"
    progress = sys.stderr.isatty() if progress is None else progress
    # Data first: a bad file should fail before minutes of model loading.
    evalset = (
        load_eval(data, split, max_queries or None, max_corpus or None, seed=seed) if data else None
    )
    sts_set = load_sts(sts) if sts else None
    dev = _device(device)
    models = [model] + ([compare] if compare else [])
    # Load both before encoding anything, so a bad --compare fails in seconds, not minutes.
    loaded = [
        _load(n, k, pooling, max_seq_length, dev) for n, k in zip(models, ("MODEL", "--compare"))
    ]
    rows = []
    for name, (enc, info) in zip(models, loaded):
        t0 = time.perf_counter()

        def encode(texts, enc=enc):
            return enc.encode(texts, batch_size=batch_size)

        encode_query, encode_document = enc.retrieval_encoders(batch_size)

        if evalset is not None:
            log.info(
                "%s: encoding %d documents and %d queries on %s",
                name,
                len(evalset.corpus),
                len(evalset.queries),
                dev,
            )
            m = retrieval_metrics(
                encode_document,
                evalset,
                batch_size=batch_size,
                show_progress=progress,
                encode_query_fn=encode_query,
                dims=dims,
            )
            info["retrieval"] = {k: m[k] for k in (*SHOWN, "num_queries", "skipped_queries")}
            for w in dims:
                info[f"retrieval_dim_{w}"] = {k: m[f"dim_{w}/{k}"] for k in SHOWN}
        if sts_set is not None:
            log.info("%s: encoding %d STS pairs on %s", name, len(sts_set.scores), dev)
            info["sts"] = sts_metrics(encode, sts_set, batch_size, show_progress=progress)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(info)
    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": str(dev),
        "eval": {},
        "models": rows,
    }
    if evalset is not None:
        result["eval"]["retrieval"] = {
            "source": data,
            "split": split,
            "name": evalset.name,
            "queries": len(evalset.queries),
            "documents": len(evalset.corpus),
            "notes": list(evalset.notes),
        }
        for w in dims:
            result["eval"][f"retrieval_dim_{w}"] = {"dims": w}
    if sts_set is not None:
        result["eval"]["sts"] = {"file": str(sts), "pairs": len(sts_set.scores)}
    if compare:
        a, b = rows
        result["diff"] = {
            section: {k: a[section][k] - b[section][k] for k in keys}
            for section, keys, _ in _sections(result["eval"])
        }
    print(format_table(result))
    if output:
        write_results(output, result)
        print(f"\nresults: {Path(output).resolve()}")
    else:
        log.info("results: the table above only; --output FILE also writes them as JSON")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The terminal table: one column per model, plus ``diff`` (A - B) when comparing."""
    rows, ev = result["models"], result["eval"]
    names = "AB"[: len(rows)]
    head = f"{'metric':<12}" + "".join(f"{n:>10}" for n in names)
    head += f"{'diff':>10}" if len(rows) == 2 else ""
    lines = []
    for section, keys, title in _sections(ev):
        lines += ["" if lines else None, title.format(**ev[section]), head]
        for k in keys:
            vals = [r[section][k] for r in rows]
            line = f"{k:<12}" + "".join(f"{v:>10.4f}" for v in vals)
            lines.append(line + (fmt_change(vals[0] - vals[1]) if len(vals) == 2 else ""))
    lines.append("")
    lines += [
        f"{n} = {r['model']} ({r['pooling']} pooling, {r['seconds']:.1f} s)"
        for n, r in zip(names, rows)
    ]
    if len(rows) == 2:
        lines.append("diff = A - B")
    return "\n".join(x for x in lines if x is not None)


def _sections(ev: dict[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    """(result key, metrics, title) of every section evaluated, in table order."""
    out = [("retrieval", SHOWN, "Retrieval on {name}: {queries} queries, {documents} documents")]
    out += [
        (key, SHOWN, "Retrieval at {dims} dims (truncated, re-normalised)")
        for key in ev
        if key.startswith("retrieval_dim_")
    ]
    out.append(("sts", STS_SHOWN, "STS on {file}: {pairs} pairs"))
    return [x for x in out if x[0] in ev]


def write_results(path: str | Path, obj: Any) -> None:
    """Write the results as JSON, atomically; NaN becomes null."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise GistRayError(f"--output {path}: folder {path.parent} does not exist")
    fileio.write_json(path, _finite(obj), allow_nan=False)


def _finite(obj: Any) -> Any:
    """NaN (e.g. a metric with no judged query) becomes null: JSON has no NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
