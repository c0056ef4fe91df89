"""``gist-ray mine``: k hard negatives per row of every training dataset, mined with the guide.

For each dataset of ``data.train``: the guide's embeddings of its anchors and positives come
from the guide cache (built when missing, exactly as training builds it, so training reuses it);
the corpus is the dataset's unique positives; every row gets the ``mine.k`` best candidates
that pass the positive-aware rule (:mod:`gist_ray.mining.select`); the data is written again
with ``negative_1..negative_k`` in place of its own negatives (:mod:`gist_ray.mining.output`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import torch
import torch.nn.functional as F

from gist_ray.config import Config, load_config_dict
from gist_ray.core import storage
from gist_ray.core.errors import ConfigError, GistRayError
from gist_ray.core.log import fmt_eta
from gist_ray.data.training import TrainingSet, insuranceqa, load_training_sets, source_file
from gist_ray.launch.paths import check_command
from gist_ray.mining import output
from gist_ray.mining.guide import guide_embeddings_for, known_embeddings, seed_guide_cache
from gist_ray.mining.search import Searcher, resolve_backend
from gist_ray.mining.select import Rule, mine_negatives

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What ``gist-ray mine`` did for one dataset (printed, and kept in the sidecar)."""

    dataset: str
    output: str
    rows: int  # rows of the input
    written: int  # rows in the output
    dropped: int  # rows with fewer than k negatives, dropped
    filled: int  # negatives filled in (mine.shortfall: fill)
    corpus: int  # unique positives searched
    positive_score: float  # mean guide score of the positives
    negative_score: float  # mean guide score of the negatives written
    seconds: float  # the search (not the guide cache)
    backend: str
    reused: bool = False  # already mined from the same inputs: nothing redone


def rule_of(cfg: Config) -> Rule:
    m = cfg.mine
    return Rule(m.k, m.threshold, m.perc, m.margin, m.range_min, m.shortfall == "fill")


def output_path(cfg: Config, s: TrainingSet, several: bool) -> tuple[str, str]:
    """(the output file, a path or a URI; the config key that names it)."""
    if cfg.mine.output:
        if several:
            raise ConfigError(
                "mine.output names one file but data.train has several datasets; leave it "
                "empty to write <output_dir>/<dataset>-mined.<format> for each"
            )
        out = cfg.mine.output
        return (out if storage.is_remote(out) else str(storage.local_path(out))), "mine.output"
    src = s.spec.source
    suffix = output.suffix(src)
    if suffix not in output.WRITERS or storage.kind(src) != "file":
        suffix = ""
    path = storage.join(storage.absolute(cfg.output_dir), f"{s.name}-mined{suffix or '.parquet'}")
    return path, "output_dir"


def mine(cfg: Config) -> list[Summary]:
    """Mine every dataset of ``data.train``; returns one summary per dataset."""
    check_command(cfg, "mine")  # every storage location, before anything starts
    sets = load_training_sets(cfg)
    rule, backend = rule_of(cfg), resolve_backend(cfg.mine.backend)
    outs = [output_path(cfg, s, len(sets) > 1) for s in sets]
    corpora = [Corpus(s) for s in sets]
    for s, c, (out, key) in zip(sets, corpora, outs):
        c.check(rule, s.name)
        output.check_output(out, key)
    embeddings = guide_embeddings_for(cfg, sets)
    summaries = [
        mine_set(cfg, s, c, e, out, key, rule, backend)
        for s, c, e, (out, key) in zip(sets, corpora, embeddings, outs)
    ]
    known = known_embeddings(cfg, sets, embeddings)
    for s, summary in zip(sets, summaries):
        try:  # a shortcut for training, never a reason to fail a finished mining run
            paths = seed_guide_cache(training_config(cfg, summary.output, s), known)
        except GistRayError as e:
            log.warning("no guide cache for %s (training will build it): %s", summary.output, e)
            continue
        for path in paths:
            log.info("guide cache of %s: %s (training on it runs no guide)", summary.output, path)
    return summaries


def _without_negatives(columns: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in columns.items() if not k.startswith("negative")}


def training_config(cfg: Config, mined: str, s: TrainingSet | None = None) -> Config:
    """``cfg`` training on the mined file alone: the printed next step for a single source;
    for dataset ``s`` of a list or mapping, that dataset under its name with its settings."""
    data = cfg.to_dict()
    data["data"]["columns"] = _without_negatives(cfg.data.columns)
    if isinstance(cfg.data.train, str) or s is None:
        data["data"]["train"] = mined
    else:
        spec = {"source": mined, "columns": _without_negatives(s.spec.columns)}
        spec.update(max_examples=s.spec.max_examples, prompts=s.spec.prompts)
        data["data"]["train"] = {s.name: {k: v for k, v in spec.items() if v is not None}}
    return load_config_dict(data)


class Corpus:
    """A dataset's unique positives and, per row, what it may never get as a negative."""

    def __init__(self, s: TrainingSet) -> None:
        anchors, positives = s.column_texts()["anchor"], s.column_texts()["positive"]
        self.ids: dict[str, int] = {}
        self.first_row: list[int] = []  # the row whose positive embedding stands for the text
        for row, text in enumerate(positives):
            if text not in self.ids:
                self.ids[text] = len(self.first_row)
                self.first_row.append(row)
        self.positive_id = [self.ids[t] for t in positives]
        own: dict[str, list[int]] = {}  # anchor text -> its positives, over all its rows
        for a, p in zip(anchors, self.positive_id):
            if p not in own.setdefault(a, []):
                own[a].append(p)
        self.own = own
        self.excluded = [own[a] + ([self.ids[a]] if a in self.ids else []) for a in anchors]

    def __len__(self) -> int:
        return len(self.first_row)

    def check(self, rule: Rule, name: str) -> None:
        most = len(self) - max(len(set(e)) for e in self.excluded)
        if rule.k + rule.range_min > most:
            skip = f" after mine.range_min = {rule.range_min}" if rule.range_min else ""
            raise ConfigError(
                f"mine.k = {rule.k}{skip} is larger than the corpus of dataset {name!r}: "
                f"{len(self)} unique positives, at most {most} besides an anchor's own"
            )


def positive_scores(c: Corpus, anchors: list[str], a: torch.Tensor, corpus: torch.Tensor):
    """Per row, the guide score of the anchor's positive: the lowest of its positives when the
    anchor text has several rows (as sentence-transformers' mine_hard_negatives)."""
    return torch.stack([(corpus[c.own[t]] @ a[r]).min() for r, t in enumerate(anchors)])


def output_fingerprint(cfg: Config, s: TrainingSet, emb: dict[str, torch.Tensor], out: str):
    """What fixes the output: the data (texts and the file itself), the guide's embeddings
    (its files, settings and prompts), the rule, the output's format."""
    h = hashlib.sha256()
    for col in ("anchor", "positive"):
        for text in s.column_texts()[col]:
            h.update(text.encode() + b"\0")
        h.update(emb[col].float().numpy().tobytes())
    src = source_file(s.spec.source)  # a URI's staged copy: never Path() on a URI
    m = cfg.mine
    value = {"perc_pos": f"perc={m.perc}", "margin": f"margin={m.margin}", "none": ""}
    return {
        "format": output.FORMAT,
        "data": h.hexdigest(),
        "file": output.sha256_file(src) if src is not None else s.spec.source,
        "rows": str(len(s.column_texts()["anchor"])),
        "rule": f"k={m.k} {m.threshold} {value[m.threshold]} range_min={m.range_min} "
        f"shortfall={m.shortfall}",
        "output_format": output.suffix(out),
    }


def mine_set(
    cfg: Config,
    s: TrainingSet,
    c: Corpus,
    emb: dict[str, torch.Tensor],
    out: str,
    key: str,
    rule: Rule,
    backend: str,
) -> Summary:
    fp = output_fingerprint(cfg, s, emb, out)
    done = output.finished(out, fp, key)
    if done is not None:
        log.info("%s is already mined from the same data, guide and settings", out)
        return Summary(**{**done, "reused": True})
    t0 = time.perf_counter()
    a = F.normalize(emb["anchor"].float(), dim=-1)
    corpus = F.normalize(emb["positive"][c.first_row].float(), dim=-1)
    pos = positive_scores(c, s.column_texts()["anchor"], a, corpus)
    searcher = Searcher(corpus, backend, cfg.mine.corpus_chunk)
    parts = output.Parts(out, fp, cfg.mine.part_rows)
    rows, step = len(a), cfg.mine.part_rows
    n_parts = -(-rows // step)
    todo = [i for i in range(n_parts) if i not in parts.done]
    log.info(
        "mining %d negatives for %d rows of %r over %d unique positives (%s, %s)",
        rule.k,
        rows,
        s.name,
        len(c),
        backend,
        _describe(rule),
    )
    t_search = time.perf_counter()
    for n, i in enumerate(todo, 1):
        lo, hi = i * step, min(rows, (i + 1) * step)
        parts.write(i, mine_part(a, pos, c, searcher, rule, lo, hi, cfg.mine.batch_size))
        elapsed = time.perf_counter() - t_search
        log.info(
            "mined rows %d-%d (part %d/%d), ETA %s",
            lo,
            hi - 1,
            i + 1,
            n_parts,
            fmt_eta(elapsed / n * (len(todo) - n)),
        )
    table = parts.read()
    summary = finish_output(s, c, table, out, fp, rule, time.perf_counter() - t0, backend)
    parts.remove()
    return summary


def _describe(rule: Rule) -> str:
    what = {
        "perc_pos": f"keep below {rule.perc:g} x the positive's score",
        "margin": f"keep below the positive's score - {rule.margin:g}",
        "none": "no threshold",
    }[rule.threshold]
    return what + (f", skip the best {rule.range_min}" if rule.range_min else "")


def mine_part(
    a: torch.Tensor,
    pos: torch.Tensor,
    c: Corpus,
    searcher: Searcher,
    rule: Rule,
    lo: int,
    hi: int,
    batch: int,
) -> pa.Table:
    """Rows lo..hi-1: their negatives' corpus ids and scores, how many passed, filled."""
    cols: dict[str, list] = {"row": [], "positive_score": [], "found": [], "filled": []}
    ids, scores = [], []
    for b in range(lo, hi, batch):
        e = min(hi, b + batch)
        got = mine_negatives(a[b:e], searcher, c.excluded[b:e], pos[b:e], rule)
        cols["row"] += range(b, e)
        cols["positive_score"] += pos[b:e].tolist()
        cols["found"] += got.found.tolist()
        cols["filled"] += got.filled.tolist()
        ids.append(got.ids)
        scores.append(got.scores)
    ids_t, scores_t = torch.cat(ids), torch.cat(scores)
    for j in range(rule.k):
        cols[f"id_{j + 1}"] = ids_t[:, j].tolist()
        cols[f"score_{j + 1}"] = scores_t[:, j].tolist()
    return pa.table(cols)


def finish_output(
    s: TrainingSet,
    c: Corpus,
    table: pa.Table,
    out: str,
    fp: dict[str, str],
    rule: Rule,
    seconds: float,
    backend: str,
) -> Summary:
    """The input rows that got k negatives, with negative_1..k, written atomically."""
    t = table.to_pydict()
    texts = list(c.ids)
    keep = [i for i, (f, g) in enumerate(zip(t["found"], t["filled"])) if f + g == rule.k]
    ds = source_rows(s).select([t["row"][i] for i in keep])
    for j in range(1, rule.k + 1):
        ds = ds.add_column(f"negative_{j}", [texts[t[f"id_{j}"][i]] for i in keep])
    neg = [t[f"score_{j}"][i] for i in keep for j in range(1, rule.k + 1)]
    summary = Summary(
        dataset=s.name,
        output=str(out),
        rows=len(t["row"]),
        written=len(keep),
        dropped=len(t["row"]) - len(keep),
        filled=sum(t["filled"][i] for i in keep),
        corpus=len(c),
        positive_score=sum(t["positive_score"]) / max(len(t["row"]), 1),
        negative_score=sum(neg) / max(len(neg), 1),
        seconds=round(seconds, 2),
        backend=backend,
    )
    if summary.dropped:
        log.info(
            "%d of %d rows of %r have fewer than %d negatives that pass the threshold: dropped "
            "(mine.shortfall=fill keeps them)",
            summary.dropped,
            summary.rows,
            s.name,
            rule.k,
        )
    if not keep:
        raise ConfigError(
            f"no row of {s.name!r} has {rule.k} negatives that pass mine.threshold; "
            "lower mine.k, relax mine.perc / mine.margin or set mine.shortfall=fill"
        )
    output.write_output(out, ds, fp, asdict(summary))
    return summary


def source_rows(s: TrainingSet) -> datasets.Dataset:
    """The dataset's rows as its source has them (every column, the user's column names), less
    its own negatives, which the mined ones replace; the built-in data as anchor, positive."""
    from gist_ray.data.training import (  # the reader and names training uses
        NEGATIVE_COLUMN,
        load_source,
    )

    n = len(s.column_texts()["anchor"])
    src = s.spec.source
    if src.strip().lower() == insuranceqa.NAME and not Path(src).exists():
        return datasets.Dataset.from_dict({k: s.column_texts()[k] for k in ("anchor", "positive")})
    ds, _ = load_source(src, "train")
    ds = ds.select(range(n))  # training reads the first max_examples rows
    columns = s.spec.columns or {}
    negatives = [v for k, v in columns.items() if k.startswith("negative")]
    if not negatives:
        used = {columns.get("anchor", "anchor"), columns.get("positive", "positive")}
        negatives = [
            col
            for col in ds.column_names
            if col not in used and (col == "negative" or NEGATIVE_COLUMN.fullmatch(col))
        ]
    return ds.remove_columns(negatives)


def print_summaries(summaries: list[Summary], cfg: Config, config: str | None) -> None:
    """The result on stdout: per dataset what was written, then how to train on it."""
    for s in summaries:
        what = "already mined" if s.reused else f"mined in {s.seconds:.1f}s ({s.backend})"
        print(f"{s.dataset}: {what} -> {s.output}")
        print(
            f"  rows {s.rows:,}  written {s.written:,}  dropped {s.dropped:,}  "
            f"filled negatives {s.filled:,}  corpus {s.corpus:,} unique positives"
        )
        print(
            f"  mean guide score: positive {s.positive_score:.4f}  negative {s.negative_score:.4f}"
        )
    how = f"gist-ray train{f' --config {config}' if config else ''}"
    roles = training_config(cfg, summaries[0].output).data.columns
    if roles != cfg.data.columns:  # the mined negatives replace the mapped ones
        how += f" --set 'data.columns={json.dumps(roles)}'"
    if len(summaries) == 1:
        print(f"next: {how} --set data.train={summaries[0].output}")
    else:
        print(f"next: point each source in data.train at its output, then {how}")
