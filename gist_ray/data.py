"""Training pairs and retrieval eval sets, loaded with Hugging Face `datasets`.

Training data has canonical columns `anchor`, `positive` and optionally `negative_1..negative_k`.
Sources: a local .json/.jsonl/.csv/.parquet file, a `save_to_disk` folder, a hub dataset name
(where the network allows) or the built-in `insuranceqa` (package insuranceqa-data==1.0).
Every bad input raises a one-line DataError naming the source, column and row.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from gist_ray.errors import DataError

log = logging.getLogger(__name__)

BUILTIN = "insuranceqa"
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_NEG = re.compile(r"negative_([1-9][0-9]*)")
_ROLES_HINT = "allowed: anchor, positive, negative, negative_1, negative_2, ..."
_KINDS_HINT = "give a .json, .jsonl, .csv or .parquet file, a save_to_disk folder, a hub dataset"


def load_pairs(
    source: str,
    columns: dict[str, str] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    split: str = "train",
) -> datasets.Dataset:
    """Load training pairs with columns anchor, positive[, negative_1..negative_k], validated.

    `columns` maps a canonical role to the source's column, e.g. {"anchor": "question",
    "positive": "answer"}; unmapped roles use the canonical name; other columns are dropped.
    Without negative roles in `columns`, source columns `negative` / `negative_k` are picked up.
    `max_examples` keeps the FIRST N rows of a user's data (so row numbers in errors are the
    file's own); the built-in insuranceqa set is shuffled with `seed` first so subsets are diverse
    (`columns` does not apply to it). `split` picks a split of a saved DatasetDict or hub dataset.
    """
    source = str(source)
    _check_limit("max_examples", max_examples)
    if source.strip().lower() == BUILTIN and not Path(source).exists():
        ds, label = _insuranceqa_pairs(seed, split, max_examples), BUILTIN
        roles = {c: c for c in ds.column_names}
    else:
        ds, label = _load_source(source, split)
        ds, roles = _select_roles(ds, columns, label)
        if max_examples is not None and len(ds) > max_examples:
            ds = ds.select(range(max_examples))
    if len(ds) == 0:
        raise DataError(f"{label} is empty (0 rows); training needs at least one row")
    table = ds.with_format("arrow")[:]
    for col in ds.column_names:
        _check_texts(table.column(col), col, roles[col], label, ds)
    return ds


# ----------------------------------------------------------------------------- sources


def _load_source(source: str, split: str) -> tuple[datasets.Dataset, str]:
    path = Path(source).expanduser()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; {_KINDS_HINT}")
        if path.stat().st_size == 0:
            raise DataError(f"{source} is empty (0 bytes); training needs at least one row")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train"), source
        except Exception as e:  # the builders raise many types; the user needs one line
            if "corresponds to no data" in str(e):
                raise DataError(
                    f"{source} is empty (0 rows); training needs at least one row"
                ) from e
            raise DataError(f"{source}: cannot be read as {builder}: {_cause(e)}") from e
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                raise DataError(f"{source}: saved dataset is empty or damaged ({_cause(e)})") from e
            raise DataError(
                f"{source}: folder is not a dataset saved with save_to_disk ({_cause(e)}); "
                f"{_KINDS_HINT}"
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source}: no split {split!r}; splits are: {', '.join(ds)}")
            ds = ds[split]
        return ds, source
    if _looks_like_path(source):
        raise DataError(f"{source} does not exist; {_KINDS_HINT} or '{BUILTIN}'")
    try:
        return datasets.load_dataset(source, split=split), source
    except Exception as e:
        raise DataError(
            f"{source!r} does not exist locally and cannot be fetched from the hub "
            f"(offline or unknown: {_cause(e)}); {_KINDS_HINT} or '{BUILTIN}'"
        ) from e


def _looks_like_path(s: str) -> bool:
    # Hub dataset ids are `name` or `org/name` without a file extension.
    p = Path(s)
    return (
        s.startswith((".", "/", "~"))
        or "\\" in s
        or p.suffix.lower() in _BUILDERS
        or s.count("/") > 1
        or ("/" in s and Path(s.split("/", 1)[0]).exists())
    )


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"{name} must be a positive integer or None, got {value!r}")


def _cause(e: BaseException) -> str:
    # datasets wraps the useful error (e.g. ArrowInvalid: JSON parse error in row 3) as __cause__
    while e.__cause__ is not None and str(e.__cause__):
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- columns


def _select_roles(
    ds: datasets.Dataset, columns: dict[str, str] | None, label: str
) -> tuple[datasets.Dataset, dict[str, str]]:
    """Pick the role columns, check them, and rename them to anchor/positive/negative_k."""
    columns = dict(columns or {})
    unknown = [
        k for k in columns if k not in ("anchor", "positive", "negative") and not _NEG.fullmatch(k)
    ]
    if unknown:
        raise DataError(f"unknown column role(s) {', '.join(map(repr, unknown))}; {_ROLES_HINT}")
    for role, src in columns.items():
        if not isinstance(src, str) or not src:
            raise DataError(f"column mapping for {role!r} must be a column name, got {src!r}")
    present = ds.column_names
    if any(k == "negative" or _NEG.fullmatch(k) for k in columns):
        negs = {k: v for k, v in columns.items() if k.startswith("negative")}
    else:  # pick up the source's own negative columns
        used = {columns.get("anchor", "anchor"), columns.get("positive", "positive")}
        negs = {c: c for c in present if (c == "negative" or _NEG.fullmatch(c)) and c not in used}
    if "negative" in negs and "negative_1" in negs:
        raise DataError(f"{label}: both 'negative' and 'negative_1' given; use one of them")
    numbered = sorted((1 if k == "negative" else int(k.split("_")[1]), v) for k, v in negs.items())
    if [n for n, _ in numbered] != list(range(1, len(numbered) + 1)):
        got = ", ".join(f"negative_{n}" for n, _ in numbered)
        raise DataError(
            f"{label}: negative columns must be negative_1..negative_k without gaps; got {got}"
        )
    roles = {
        "anchor": columns.get("anchor", "anchor"),
        "positive": columns.get("positive", "positive"),
    }
    roles.update({f"negative_{n}": src for n, src in numbered})

    for role, src in roles.items():
        if src not in present:
            mapped = f" (mapped to {role!r})" if src != role else ""
            hint = (
                ""
                if mapped
                else "; map yours with columns, e.g. {'anchor': 'question', 'positive': 'answer'}"
            )
            raise DataError(
                f"{label}: no column {src!r}{mapped}; columns are: {', '.join(present)}{hint}"
            )
    srcs = list(roles.values())
    dup = sorted({s for s in srcs if srcs.count(s) > 1})
    if dup:
        raise DataError(f"{label}: column {dup[0]!r} is mapped to more than one role")
    ds = ds.select_columns(srcs)
    # two renames via temporary names, so swaps such as anchor<->positive cannot collide
    ds = ds.rename_columns({src: f"__gist_{i}" for i, src in enumerate(srcs)})
    return ds.rename_columns({f"__gist_{i}": role for i, role in enumerate(roles)}), roles


def _check_texts(
    arr: pa.ChunkedArray, col: str, src: str, label: str, ds: datasets.Dataset
) -> None:
    """Every text must be a non-empty, non-whitespace string; report the first bad row."""
    where = f"{label}: column {col!r}" + (f" (source column {src!r})" if src != col else "")
    rule = "texts must be non-empty strings"
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):  # vectorised
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0)
        bad = pc.or_kleene(pc.is_null(arr), pc.fill_null(blank, False))
        n_bad = pc.sum(bad).as_py() or 0
        if n_bad:
            row = pc.index(bad, True).as_py()
            what = "null" if arr[row].as_py() is None else "empty or whitespace"
            raise DataError(f"{where} row {row} (0-based) is {what}; {rule} ({n_bad} bad in all)")
        return
    # Not a string column (numbers, lists, or mixed values stored as JSON): find the first row
    # that is not a non-empty string in python; this path only runs for invalid data.
    for row, value in enumerate(ds[col]):
        if not isinstance(value, str) or not value.strip():
            what = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
            if isinstance(value, str):
                what = "empty or whitespace"
            raise DataError(f"{where} row {row} (0-based) is {what}; {rule}")


# ----------------------------------------------------------------------------- insuranceqa


def _norm(s: str) -> str:
    return " ".join(s.split())  # the package's texts have doubled and non-breaking spaces


def _insuranceqa():
    try:
        import insuranceqa_data
    except ImportError as e:
        raise DataError(
            f"built-in source '{BUILTIN}' needs the package insuranceqa-data==1.0 "
            "(pip install insuranceqa-data==1.0)"
        ) from e
    return insuranceqa_data


@functools.cache
def _iqa_split(split: str) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """Question id -> (question, positive answer ids, candidate ids); cached, English only."""
    iqa = _insuranceqa()
    data = {"train": iqa.load_train, "test": iqa.load_test, "valid": iqa.load_valid}[split]()
    return {
        q: (_norm(v["en"]), tuple(v["answers"]), tuple(v["negatives"])) for q, v in data.items()
    }


@functools.cache
def _iqa_answers() -> dict[str, str]:
    return {a: _norm(v["en"]) for a, v in _insuranceqa().load_answers().items()}


def _insuranceqa_pairs(seed: int, split: str, max_examples: int | None) -> datasets.Dataset:
    """One row per (question, positive answer); negative_1 = one of its 200 candidate answers."""
    if split != "train":
        raise DataError(
            f"built-in '{BUILTIN}' training split must be 'train' (got {split!r}); "
            "valid and test are held out for load_eval"
        )
    questions, answers = _iqa_split("train"), _iqa_answers()
    rng = random.Random(seed)
    rows = []
    for qid in sorted(questions, key=int):
        text, positives, candidates = questions[qid]
        pool = [a for a in candidates if a not in positives]
        rows.extend((text, answers[a], answers[rng.choice(pool)]) for a in positives)
    # shuffle after sampling negatives, so a row's content does not depend on max_examples
    rng.shuffle(rows)
    anchor, positive, negative = (list(c) for c in zip(*rows[:max_examples]))
    return datasets.Dataset.from_dict(
        {"anchor": anchor, "positive": positive, "negative_1": negative}
    )


# ----------------------------------------------------------------------------- eval sets


@dataclass
class EvalSet:
    """A retrieval eval set: queries and corpus by id, qrels query id -> {doc id: relevance}."""

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
    name: str = ""
    notes: list[str] = field(default_factory=list)  # e.g. dropped qrels, for logs and MLflow


def load_eval(
    source: str = BUILTIN,
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
    _check_limit("max_queries", max_queries)
    _check_limit("max_corpus", max_corpus)
    if source.strip().lower() == BUILTIN and not Path(source).exists():
        queries, corpus, qrels, pool = _insuranceqa_eval(split)
        notes: list[str] = []
        label = f"{BUILTIN}/{split}"
    else:
        queries, corpus, qrels, notes = _beir(Path(source).expanduser(), source, split)
        pool = None
        label = f"{source}/{split}"
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


def _insuranceqa_eval(split: str):
    split = "valid" if split == "validation" else split
    if split not in ("test", "valid"):
        raise DataError(f"built-in '{BUILTIN}' eval split {split!r} is not one of: test, valid")
    data = _iqa_split(split)
    queries = {q: v[0] for q, v in data.items()}
    qrels = {q: dict.fromkeys(v[1], 1) for q, v in data.items()}

    def pool(qids: list[str]) -> set[str]:
        return {a for q in qids for a in data[q][2]}

    return queries, dict(_iqa_answers()), qrels, pool


def jsonl_records(path: Path, what: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line; a line that is not a JSON object is a
    DataError naming ``what`` (e.g. "STS file"), the file and the line."""
    where = f"{what} {path}".strip()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where} line {lineno}: not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise DataError(f"{where} line {lineno}: expected a JSON object")
            yield lineno, rec


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


def _beir(folder: Path, source: str, split: str):
    if not folder.is_dir():
        raise DataError(f"eval source {source} does not exist (need a BEIR folder or '{BUILTIN}')")
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
    return queries, corpus, qrels, notes
