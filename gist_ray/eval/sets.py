"""Retrieval eval sets: queries, a corpus and relevance judgements (qrels), from the built-in
InsuranceQA test/valid splits or a BEIR-style folder (queries.jsonl, corpus.jsonl,
qrels/<split>.tsv or qrels.tsv). Bad files are one-line DataErrors naming the file and line.
:func:`held_out_set` and :func:`write_beir` make such a folder from held-out training rows."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gist_ray.core import fileio
from gist_ray.core.errors import DataError
from gist_ray.core.fileio import jsonl_records
from gist_ray.core.storage import is_remote
from gist_ray.data.heldout import anchor_key
from gist_ray.data.training import check_limit, insuranceqa, named_as, stage_source

if TYPE_CHECKING:
    from gist_ray.config import Config

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """A retrieval eval set: queries and corpus by id, qrels query id -> {doc id: relevance}."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. dropped qrels, for logs and MLflow


def load_eval(
    source: str = insuranceqa.NAME,
    split: str = "test",
    max_queries: int | None = 200,
    max_corpus: int | None = 2000,
    seed: int = 0,
) -> EvalSet:
    """Load a retrieval eval set: built-in insuranceqa (test or valid) or a BEIR-style folder.

    `max_queries` queries are sampled with `seed` among those with a relevant doc; the corpus is
    cut to `max_corpus` docs, always keeping every judged doc of the sampled queries (for
    insuranceqa the rest comes from those queries' candidate pools), so encoding stays cheap.
    """
    source = str(source)
    check_limit("max_queries", max_queries)
    check_limit("max_corpus", max_corpus)
    if source.strip().lower() == insuranceqa.NAME and not Path(source).exists():
        queries, corpus, qrels, pool = insuranceqa.eval_split(split)
        notes: list[str] = []
        label = f"{insuranceqa.NAME} (split {split})"
    else:
        queries, corpus, qrels, notes, qrels_path = _beir_at(source, split)
        pool = None
        # the folder and the split apart: "<folder>/<split>" would name a folder that is not there
        label = f"{source} (split {split})" if qrels_path.parent.name == "qrels" else source
    rng = random.Random(seed)
    qids = sorted((q for q, rel in qrels.items() if any(v > 0 for v in rel.values())), key=_idkey)
    if not qids:
        raise DataError(f"{label}: eval set is empty (no query has a relevant document)")
    rng.shuffle(qids)
    qids = sorted(qids[:max_queries] if max_queries else qids, key=_idkey)
    judged = {d for q in qids for d in qrels[q]}
    others = sorted((pool(qids) if pool else set(corpus)) - judged, key=_idkey)
    rng.shuffle(others)
    room = max(0, max_corpus - len(judged)) if max_corpus else len(others)
    keep = judged | set(others[:room])
    return EvalSet(
        queries={q: queries[q] for q in qids},
        corpus={d: corpus[d] for d in sorted(keep, key=_idkey)},
        qrels={q: dict(qrels[q]) for q in qids},
        name=label,
        notes=notes,
    )


def _idkey(s: str) -> tuple:
    return (0, int(s), "") if s.isdigit() else (1, 0, s)  # numeric ids in numeric order


def _read_jsonl(path: Path) -> dict[str, str]:
    """BEIR queries/corpus: ``_id`` -> "title text"."""
    out = {}
    for lineno, rec in jsonl_records(path):
        _id, text, title = rec.get("_id"), rec.get("text"), rec.get("title") or ""
        if _id is None or text is None:
            raise DataError(f"{path} line {lineno}: need a JSON object with _id and text")
        if not isinstance(text, str) or not isinstance(title, str):
            raise DataError(f"{path} line {lineno}: title and text must be strings")
        out[str(_id)] = " ".join(f"{title} {text}".split())
    return out


def _beir_at(source: str, split: str):
    """:func:`_beir` of a local folder, or of a URI's folder staged once per node (errors and
    notes name the URI)."""
    if not is_remote(source):
        return _beir(Path(source).expanduser(), source, split)
    hint = f"need a BEIR folder or '{insuranceqa.NAME}'"
    folder = stage_source(source.rstrip("/"), hint)
    with named_as(folder, source):
        queries, corpus, qrels, notes, qrels_path = _beir(folder, source, split)
    notes = [n.replace(str(folder), source.rstrip("/")) for n in notes]
    return queries, corpus, qrels, notes, qrels_path


def _beir(folder: Path, source: str, split: str):
    if not folder.is_dir():
        raise DataError(
            f"eval source {source} does not exist (need a BEIR folder or '{insuranceqa.NAME}')"
        )
    qrels_path = next(
        (p for p in (folder / "qrels" / f"{split}.tsv", folder / "qrels.tsv") if p.is_file()), None
    )
    missing = [n for n in ("queries.jsonl", "corpus.jsonl") if not (folder / n).is_file()]
    if missing or qrels_path is None:
        missing += [] if qrels_path else [f"qrels/{split}.tsv or qrels.tsv"]
        raise DataError(f"{source}: BEIR eval folder lacks {', '.join(missing)}")
    queries, corpus = _read_jsonl(folder / "queries.jsonl"), _read_jsonl(folder / "corpus.jsonl")
    qrels: dict[str, dict[str, int]] = {}
    unknown, first = 0, ""
    with open(qrels_path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (lineno == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # blank line or the header (query-id, corpus-id, score)
            try:
                qid, did, score = row[0], row[1], int(row[2])
            except (IndexError, ValueError) as e:
                raise DataError(
                    f"{qrels_path} line {lineno}: need query-id, corpus-id, integer score"
                ) from e
            if qid not in queries or did not in corpus:
                unknown += 1
                first = first or (
                    f"line {lineno}: query {qid!r} is not in queries.jsonl"
                    if qid not in queries
                    else f"line {lineno}: document {did!r} is not in corpus.jsonl"
                )
                continue
            qrels.setdefault(qid, {})[did] = score
    notes = []
    if unknown:
        notes.append(
            f"{qrels_path}: ignored {unknown} qrels naming unknown queries or documents "
            f"(first: {first})"
        )
        log.warning(notes[-1])
    return queries, corpus, qrels, notes, qrels_path


def load_eval_for(cfg: Config) -> EvalSet | None:
    """The eval set the ``eval`` section names (sampled with ``train.seed``), or None."""
    from gist_ray.core.storage import check_location

    ev = cfg.eval
    if not ev.source:
        return None
    check_location(ev.source, "eval.source")  # a URI: its bucket and credentials, in one line
    return load_eval(
        ev.source, ev.split, ev.max_queries or None, ev.max_corpus or None, seed=cfg.train.seed
    )


# ----------------------------------------------------------------------------- writing


def held_out_set(
    anchors: Sequence[str],
    positives: Sequence[str],
    others: Sequence[Sequence[str]],
    eval_rows: Sequence[int],
) -> EvalSet:
    """A retrieval set from training rows: the anchors of ``eval_rows`` are the queries, each
    judged relevant (score 1) to its rows' positives; the corpus is every distinct positive and
    negative text of all rows (``others``: the negative columns), so the held-out positives are
    found among the whole data's documents. Ids: ``q1..``, ``d1..`` in order of appearance."""
    corpus: dict[str, str] = {}  # text key -> id
    texts: dict[str, str] = {}  # id -> text

    def doc(text: str) -> str:
        key = anchor_key(text)
        if key not in corpus:
            corpus[key] = f"d{len(corpus) + 1}"
            texts[corpus[key]] = text
        return corpus[key]

    for row, positive in enumerate(positives):
        doc(positive)
        for column in others:
            if isinstance(column[row], str) and column[row].strip():
                doc(column[row])
    queries: dict[str, str] = {}  # anchor key -> id
    query_texts: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for row in eval_rows:
        key = anchor_key(anchors[row])
        if key not in queries:
            queries[key] = f"q{len(queries) + 1}"
            query_texts[queries[key]] = anchors[row]
        qrels.setdefault(queries[key], {})[doc(positives[row])] = 1
    return EvalSet(query_texts, texts, qrels)


def write_beir(folder: str | Path, evalset: EvalSet, split: str = "test") -> Path:
    """Write ``evalset`` as a BEIR folder, atomically: ``corpus.jsonl`` and ``queries.jsonl``
    (one ``{"_id", "text"}`` object a line) and ``qrels/<split>.tsv`` (a ``query-id``,
    ``corpus-id``, ``score`` header, then one judgement a line)."""
    folder = Path(folder)
    with fileio.atomic_dir(folder) as tmp:
        for name, records in (("corpus.jsonl", evalset.corpus), ("queries.jsonl", evalset.queries)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for _id, text in records.items():
                    f.write(json.dumps({"_id": _id, "text": text}, ensure_ascii=False) + "\n")
        (tmp / "qrels").mkdir()
        with open(tmp / "qrels" / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(["query-id", "corpus-id", "score"])
            for qid, rel in evalset.qrels.items():
                w.writerows([qid, did, score] for did, score in rel.items())
    return folder
