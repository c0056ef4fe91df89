"""Semantic textual similarity (STS) eval: scored sentence pairs, cosine vs gold score.

A file (.csv, .tsv, .jsonl or .json lines) holds columns ``sentence1``, ``sentence2`` and
``score``; any numeric scale works (STS-B uses 0-5) because only correlations are reported:
Spearman (rank, the usual STS number) and Pearson, both of cosine similarity against the score.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gist_ray.core.errors import DataError
from gist_ray.core.fileio import jsonl_records
from gist_ray.core.storage import is_remote

COLUMNS = ("sentence1", "sentence2", "score")


@dataclass
class StsSet:
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]
    name: str = ""


def load_sts(path: str | Path) -> StsSet:
    """Read scored pairs from a file or a URI (staged once per node); a bad file, column or
    row is a one-line DataError naming it."""
    if is_remote(str(path)):
        from gist_ray.data.training import named_as, stage_source  # datasets: only for a URI

        uri = str(path)
        local = stage_source(uri, "give a .csv, .tsv or .jsonl file of scored pairs")
        with named_as(local, uri):
            sts = _load_sts(local)
        sts.name = uri
        return sts
    return _load_sts(Path(path).expanduser())


def _load_sts(path: Path) -> StsSet:
    if not path.is_file():
        raise DataError(f"STS file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, columns = _read_jsonl(path)
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            # (file line, row); the header is line 1 (multi-line quoted cells shift this)
            rows = [(i + 2, row) for i, row in enumerate(reader)]
            columns = list(reader.fieldnames or [])
    else:
        raise DataError(f"STS file {path}: unsupported type {suffix!r}; use .csv, .tsv or .jsonl")
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"STS file {path}: no column {missing[0]!r}; columns are: "
            f"{', '.join(columns) or '(none)'}; need {', '.join(COLUMNS)}"
        )
    if not rows:
        raise DataError(f"STS file {path} is empty (0 pairs)")
    out = StsSet([], [], [], name=str(path))
    for lineno, row in rows:
        where = f"STS file {path} line {lineno}"
        for col in COLUMNS:
            if row.get(col) is None:
                raise DataError(f"{where}: no {col}")
        for col in ("sentence1", "sentence2"):
            text = row[col]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: {col} is empty or not a string ({text!r:.40})")
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            score = math.nan
        if isinstance(row["score"], bool) or not math.isfinite(score):
            raise DataError(f"{where}: score {row['score']!r:.40} is not a number")
        out.sentence1.append(row["sentence1"])
        out.sentence2.append(row["sentence2"])
        out.scores.append(score)
    return out


def _read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    rows = list(jsonl_records(path, "STS file"))
    columns: list[str] = []
    for _, rec in rows:
        columns += [c for c in rec if c not in columns]
    return rows, columns


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks; tied values share their average rank (as scipy.stats.rankdata)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; NaN when either side is constant (undefined, never a silent 0)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return float((x @ y) / denom) if denom > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x.double()), _ranks(y.double()))


def sts_metrics(
    encode_fn: Callable[[list[str]], torch.Tensor],
    sts: StsSet,
    batch_size: int = 64,
    show_progress: bool = False,
) -> dict[str, float]:
    """Spearman and Pearson of cosine(sentence1, sentence2) against the gold scores."""
    from gist_ray.eval.metrics import encode_all

    if len(sts.scores) < 2:
        raise DataError(f"STS set {sts.name}: need at least 2 pairs, got {len(sts.scores)}")
    a = encode_all(encode_fn, sts.sentence1, batch_size, "sentence1", show_progress)
    b = encode_all(encode_fn, sts.sentence2, batch_size, "sentence2", show_progress)
    cos = (a * b).sum(-1)
    gold = torch.tensor(sts.scores, dtype=torch.float64)
    return {"spearman": spearman(cos, gold), "pearson": pearson(cos, gold), "pairs": len(gold)}
