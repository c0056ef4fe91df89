"""``gist-ray init DATA``: a commented starter config for the user's own training data.

It reads the data the way training will (``.csv``, ``.json``, ``.jsonl``, ``.parquet``, a
``save_to_disk`` folder), maps its columns to the roles ``anchor``, ``positive`` and
``negative``/``negative_k`` — from the column names where they say it, else from the contents
(the query side is the shorter text) — explains each choice in a comment, and checks that the
data loads with that mapping. The file is written atomically and never over an existing one
unless ``force``.
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gist_ray.config import Config
from gist_ray.core import fileio, storage
from gist_ray.core.errors import ConfigError, DataError
from gist_ray.data.heldout import DEFAULT_FRACTION, MAX_FRACTION, Split, split_by_anchor

DEFAULT_OUTPUT = "gist-ray.yaml"
SAMPLE_ROWS = 2000
# Words in column names that say what a column holds (the name is split at _, -, space, digits).
ANCHOR_WORDS = {
    "anchor", "query", "queries", "question", "questions", "sentence1", "text1", "sent1",
    "premise", "prompt", "instruction", "input", "search", "claim", "title", "s1",
}  # fmt: skip
POSITIVE_WORDS = {
    "positive", "pos", "answer", "answers", "response", "document", "doc", "passage",
    "context", "paragraph", "body", "content", "text", "target", "output", "completion",
    "sentence2", "text2", "sent2", "hypothesis", "entailment", "reply", "evidence", "s2",
    "relevant", "chosen",
}  # fmt: skip
NEGATIVE_WORDS = {
    "negative", "negatives", "neg", "hard", "wrong", "incorrect", "contradiction",
    "distractor", "irrelevant", "rejected", "bad",
}  # fmt: skip
LABEL_WORDS = {
    "label",
    "labels",
    "score",
    "scores",
    "similarity",
    "relevance",
    "duplicate",
    "match",
}
_NUMBERED_NEGATIVE = re.compile(r"negative_([1-9][0-9]*)")
# Token lengths for model.max_seq_length: the smallest of these that fits 90% of the texts.
SEQ_LENGTHS = (64, 128, 256, 512)
CHARS_PER_TOKEN = 4  # English WordPiece, roughly


@dataclass
class Column:
    name: str
    kind: str  # "text", or why not: "numbers", "lists", "labels (3 distinct values)", ...
    mean_chars: float = 0.0
    p90_chars: float = 0.0


@dataclass
class Mapping:
    """Role -> column, each with the reason it was chosen, and the columns left out."""

    roles: dict[str, str] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)  # column -> why it is not used


def _words(name: str) -> set[str]:
    lowered = name.lower()
    return {w for w in re.split(r"[^a-z0-9]+|(?<=[a-z])(?=[0-9])", lowered) if w} | {lowered}


def _negative_number(c: Column) -> int:
    n = _NUMBERED_NEGATIVE.fullmatch(c.name)
    return int(n.group(1)) if n else 0


def describe_columns(ds) -> list[Column]:
    """Each column of a datasets.Dataset, judged on its first rows: text or not, and lengths."""
    sample = ds.select(range(min(len(ds), SAMPLE_ROWS)))
    out = []
    for name in ds.column_names:
        values = sample[name]
        texts = [v for v in values if isinstance(v, str)]
        if len(texts) < len(values) * 0.9:
            kinds = {type(v).__name__ for v in values if v is not None and not isinstance(v, str)}
            if "list" in kinds:
                kind = "lists (one column per negative: negative_1, negative_2, ...)"
            elif kinds <= {"int", "float", "bool"}:
                kind = "numbers"
            else:
                kind = f"not texts ({', '.join(sorted(kinds))})"
            out.append(Column(name, kind))
            continue
        lengths = sorted(len(t) for t in texts) or [0]
        distinct = len(set(texts))
        # Few distinct short values: a label or a category (a query repeated for several
        # positives is longer than a label).
        if len(texts) >= 20 and distinct <= max(10, len(texts) // 20) and lengths[-1] <= 24:
            out.append(Column(name, f"labels ({distinct} distinct values)"))
            continue
        p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
        out.append(Column(name, "text", statistics.fmean(lengths), p90))
    return out


def guess_mapping(columns: list[Column]) -> Mapping:
    """Roles from column names first, then from contents; see the module docstring."""
    m = Mapping()
    texts = [c for c in columns if c.kind == "text"]
    for c in columns:
        if c.kind != "text":
            m.unused[c.name] = c.kind
            if _words(c.name) & LABEL_WORDS:
                m.unused[c.name] += (
                    "; if it is a label: every row is trained on as a matching pair, "
                    "so drop the rows that do not match"
                )
    free = list(texts)

    def take(role: str, col: Column, why: str) -> None:
        m.roles[role], m.why[role] = col.name, why
        free.remove(col)

    # Canonical names, as training would pick them up.
    for role in ("anchor", "positive"):
        for c in free:
            if c.name == role:
                take(role, c, "canonical name")
                break
    # Names that say "negative" win over words shared with positives ("negative_passage").
    neg_cols = [c for c in free if _words(c.name) & NEGATIVE_WORDS or c.name.startswith("neg")]
    neg_cols.sort(key=_negative_number)
    for c in neg_cols:
        free.remove(c)
    for role, words in (("anchor", ANCHOR_WORDS), ("positive", POSITIVE_WORDS)):
        if role in m.roles:
            continue
        for c in free:
            hit = sorted(_words(c.name) & words)
            if hit:
                take(role, c, f"name matches {hit[0]!r}")
                break
    # Contents: the query side is usually the shorter text.
    if "anchor" not in m.roles and "positive" not in m.roles and len(free) >= 2:
        a, p = sorted(free[:2], key=lambda c: c.mean_chars)
        lengths = f"{a.mean_chars:.0f} vs {p.mean_chars:.0f} characters on average"
        take("anchor", a, f"shorter texts than {p.name!r} ({lengths}): the query side")
        take("positive", p, f"longer texts than {a.name!r} ({lengths})")
    for role in ("anchor", "positive"):
        if role not in m.roles and free:
            take(role, free[0], "the first text column left")
    for i, c in enumerate(neg_cols, 1):
        role = f"negative_{i}" if len(neg_cols) > 1 else "negative"
        hit = sorted(_words(c.name) & NEGATIVE_WORDS) or ["neg"]
        m.roles[role], m.why[role] = c.name, f"name matches {hit[0]!r}"
    order = ["anchor", "positive", *sorted(r for r in m.roles if r.startswith("negative"))]
    m.roles = {r: m.roles[r] for r in order if r in m.roles}
    for c in free:
        m.unused[c.name] = "text, role unknown: map it as a negative if it never matches the row"
    return m


def _seq_length(columns: list[Column], mapping: Mapping) -> tuple[int, int]:
    """(model.max_seq_length to suggest, the estimated p90 tokens of the mapped texts)."""
    by_name = {c.name: c for c in columns}
    p90 = max(by_name[name].p90_chars for name in mapping.roles.values())
    tokens = int(p90 / CHARS_PER_TOKEN) + 2  # + [CLS] and [SEP]
    return next((n for n in SEQ_LENGTHS if n >= tokens), SEQ_LENGTHS[-1]), tokens


def _scalar(value: str | float) -> str:
    """A YAML scalar: plain where it reads back as the same value, else quoted."""
    if isinstance(value, float):
        return yaml.safe_dump(value).splitlines()[0]  # 3.0e-05: a float to YAML 1.1 readers
    plain = str(value)
    try:
        if plain and yaml.safe_load(f"k: {plain}") == {"k": plain}:
            return plain
    except yaml.YAMLError:
        pass
    return json.dumps(plain)


@dataclass
class HeldOut:
    """What ``init`` split off: the split, the files written, the eval set's size."""

    split: Split
    seed: int
    fraction: float
    train_path: Path | None = None  # None: nothing held out, training reads the user's data
    eval_path: Path | None = None
    queries: int = 0
    documents: int = 0


def render_config(
    source: str,
    rows: int,
    columns: list[Column],
    mapping: Mapping,
    name: str,
    held: HeldOut | None = None,
) -> str:
    """The starter config's text: only the keys a new user should look at, each explained."""
    d = Config()
    split = held is not None and held.eval_path is not None
    train_rows = len(held.split.train_rows) if split else rows
    seq, tokens = _seq_length(columns, mapping)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", _stem(source)) or "gist-ray"
    width = max(len(k) for k in mapping.roles)
    roles = [
        f"    {role + ':':<{width + 1}} {_scalar(col)}  # {mapping.why[role]}"
        for role, col in mapping.roles.items()
    ]
    unused = [
        f"  #   {line}" if i == 0 else f"  #     {line}"
        for name, why in mapping.unused.items()
        for i, line in enumerate(f"{name}: {why}".split("; "))
    ]
    lines = [
        f"# gist-ray config for {source} ({rows:,} rows), written by `gist-ray init`.",
    ]
    if split:
        s = held.split
        lines += [
            f"# {s.eval_anchors:,} of its {s.anchors:,} distinct anchors ({len(s.eval_rows):,} "
            f"rows) are held out for eval (eval.source),",
            f"# the other {train_rows:,} rows are the training data (data.train). The same data,",
            f"# --eval-fraction {held.fraction:g} and --seed {held.seed} give the same split.",
        ]
    lines += [
        f"# Check the column mapping, then train:  gist-ray train --config {name}",
        f"# Keys left out keep their defaults (`gist-ray config --config {name}` prints",
        "# them all); --set overrides a key for one run, e.g. --set train.lr=2e-5.",
        "",
        "model:",
        f"  student: {d.model.student}  # the model to fine-tune: hub name, local folder, minilm",
        f"  guide: {d.model.guide}  # frozen and stronger; masks likely false negatives",
        f"  max_seq_length: {seq}  # tokens; 90% of your texts fit in about {tokens}",
        "",
        "data:",
        f"  train: {_scalar(str(held.train_path) if split else source)}"
        + (f"  # {storage.name(source)} without the held-out rows" if split else ""),
        "  columns:  # role: your column (anchor = the query side, positive = the text that",
        "            # matches it, negative = one that does not; negatives are optional)",
        *roles,
        f"  max_examples: 0  # rows to train on, from the top; 0 = all {train_rows:,}",
    ]
    if unused:
        lines += ["  # not used:", *unused]
    lines += ["", *_eval_lines(held), "", "train:"]
    lines += [
        f"  batch_size: {d.train.batch_size}  # global, split over the workers; every row's texts"
        " are negatives",
        "                  # for the other rows: larger is better, as far as memory allows",
        f"  epochs: {d.train.epochs}",
        f"  max_steps: {d.train.max_steps}  # > 0: stop after this many steps instead",
        f"  lr: {_scalar(d.train.lr)}",
        f"  checkpoint_every: {d.train.checkpoint_every}  # steps",
        f"  checkpoint_minutes: {_scalar(d.train.checkpoint_minutes)}  # and at least this often"
        " (0: steps only); a rerun resumes from the last one",
        "",
        "ray:",
        f"  num_workers: {d.ray.num_workers}  # training processes (one per GPU with use_gpu)",
        f"  use_gpu: {str(d.ray.use_gpu).lower()}",
        "",
        "mlflow:",
        f"  experiment: {_scalar(stem)}  # runs are grouped under this name",
        "  run_name: null  # a name shown in MLflow; a rerun resumes from output_dir either way",
        "",
        f"output_dir: {d.output_dir}  # the trained model, checkpoints and gist-ray.log",
    ]
    return "\n".join(lines) + "\n"


def _eval_lines(held: HeldOut | None) -> list[str]:
    """The config's eval section: the held-out BEIR folder, or why there is none."""
    if held is None or held.eval_path is None:
        why = f"no held-out set: {held.split.skipped}" if held else "no held-out set"
        return [
            "eval:",
            '  source: ""  # held-out retrieval eval before and after training: a BEIR folder',
            "              # (corpus.jsonl, queries.jsonl, qrels/test.tsv), or insuranceqa (the",
            f'              # built-in demo set); "" = none ({why})',
        ]
    d = Config().eval
    corpus = 0 if held.documents <= d.max_corpus else d.max_corpus
    return [
        "eval:",
        f"  # retrieval before and after training on {held.queries:,} held-out queries, never",
        "  # trained on; a BEIR folder: corpus.jsonl and queries.jsonl (_id, text),",
        "  # qrels/test.tsv (query-id, corpus-id, score)",
        f"  source: {_scalar(str(held.eval_path))}",
        "  split: test",
        f"  max_queries: 0  # 0 = all {held.queries:,}",
        f"  max_corpus: {corpus}  # documents: every relevant one, the rest sampled; 0 = all "
        f"{held.documents:,}",
    ]


def _stem(source: str) -> str:
    """The file name of a path or URI without its extension (``s3://b/faq.csv`` -> ``faq``)."""
    return posixpath.splitext(storage.name(source))[0]


@dataclass
class Starter:
    path: Path
    rows: int
    mapping: Mapping
    problem: str | None  # why training would still refuse the data, if it would
    held: HeldOut | None = None


def write_starter(
    data: str,
    output: str | Path = DEFAULT_OUTPUT,
    force: bool = False,
    eval_fraction: float = DEFAULT_FRACTION,
    seed: int = 0,
) -> Starter:
    """Inspect ``data``, hold out ``eval_fraction`` of its anchors (module docstring), write the
    starter config to ``output`` and return what was chosen."""
    from gist_ray.core.log import quiet_progress_bars

    quiet_progress_bars()  # datasets' "Generating train split" bar
    from gist_ray.data.training import load_pairs, load_source

    out = Path(output)
    if not 0 <= eval_fraction <= MAX_FRACTION:
        raise ConfigError(
            f"--eval-fraction {eval_fraction:g} is not allowed; give a share of the anchors "
            f"from 0 (no held-out set) to {MAX_FRACTION:g}"
        )
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to overwrite it, or -o OTHER.yaml")
    if out.is_dir():
        raise ConfigError(f"-o {out} is a folder; give a file name such as {DEFAULT_OUTPUT}")
    local = None if storage.is_remote(data) else Path(data).expanduser()
    source = str(local.resolve()) if local is not None and local.exists() else data
    ds, _ = load_source(source, "train")
    if len(ds) == 0:
        raise DataError(f"{data} has no rows; training needs at least one")
    columns = describe_columns(ds)
    mapping = guess_mapping(columns)
    if not {"anchor", "positive"} <= mapping.roles.keys():
        found = ", ".join(f"{c.name} ({c.kind})" for c in columns)
        raise DataError(
            f"{data}: training needs two text columns, an anchor and a positive; found: {found}"
        )
    problem = None
    try:
        load_pairs(source, mapping.roles)
    except DataError as e:
        problem = str(e)
    if problem is None:
        split = split_by_anchor(ds[mapping.roles["anchor"]], eval_fraction, seed)
    else:
        split = Split(list(range(len(ds))), skipped="the data needs fixing first (see the warning)")
    held = HeldOut(split, seed, eval_fraction)
    if split.eval_rows:
        held = _write_held_out(ds, source, mapping, held, out, force)
    text = render_config(source, len(ds), columns, mapping, out.name, held)
    fileio.write_text(out, text)  # last: it names the files above
    return Starter(out, len(ds), mapping, problem, held)


def _write_held_out(ds, source: str, mapping: Mapping, held: HeldOut, out: Path, force: bool):
    """Write the held-out rows as a BEIR folder and the others as the training file, next to
    the config; return ``held`` with their paths and the eval set's size."""
    from gist_ray.data.training import source_file
    from gist_ray.eval.sets import held_out_set, write_beir

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", _stem(source)) or "data"
    suffix = posixpath.splitext(storage.name(source))[1].lower()
    local = source_file(source)  # a URI's staged copy (loading staged it)
    ext = {".csv": ".csv", ".jsonl": ".jsonl", ".json": ".jsonl"}.get(suffix, ".parquet")
    folder = out.resolve().parent
    train_path, eval_path = folder / f"{stem}-train{ext}", folder / f"{stem}-eval"
    there = [str(p) for p in (train_path, eval_path) if p.exists()]
    if there and not force:
        raise ConfigError(
            f"{' and '.join(there)} already exist(s); pass --force to overwrite, or "
            "--eval-fraction 0 for no held-out set"
        )
    roles = mapping.roles
    negatives = [ds[c] for r, c in roles.items() if r.startswith("negative")]
    evalset = held_out_set(
        ds[roles["anchor"]], ds[roles["positive"]], negatives, held.split.eval_rows
    )
    write_beir(eval_path, evalset)
    _write_rows(ds, local, held.split.train_rows, train_path)
    held.train_path, held.eval_path = train_path, eval_path
    held.queries, held.documents = len(evalset.queries), len(evalset.corpus)
    return held


def _write_rows(ds, source: Path | None, rows: list[int], path: Path) -> None:
    """Rows ``rows`` of the data, every column, to ``path`` (atomically), in the source's own
    format: a .csv or JSON Lines source's records are copied as they are (where they line up
    with the dataset's rows), anything else is written from the dataset."""
    raw = _raw_records(source, len(ds)) if source is not None else None
    with fileio.atomic_file(path) as tmp:
        if raw is not None and path.suffix == ".csv":
            header, records = raw
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(records[i] for i in rows)
        elif raw is not None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(raw[1][i] for i in rows)
        elif path.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for row in ds.select(rows):
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        else:
            ds.select(rows).to_parquet(str(tmp))


def _raw_records(path: Path, count: int):
    """(header, records) of a .csv, (None, lines) of a JSON Lines file, as the dataset counts
    its rows (blank lines skipped); None for other files or when the counts differ."""
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                records = [r for r in csv.reader(f) if r]
                header, records = (records[0], records[1:]) if records else ([], [])
            elif suffix in (".jsonl", ".json"):
                header = None
                records = [
                    line if line.endswith("\n") else line + "\n" for line in f if line.strip()
                ]
                if records and records[0].lstrip().startswith("["):
                    return None  # a JSON array
            else:
                return None
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return (header, records) if len(records) == count else None
