"""Training pairs, loaded with Hugging Face `datasets`.

Training data has canonical columns `anchor`, `positive` and optionally `negative_1..negative_k`.
Sources: a local .json/.jsonl/.csv/.parquet file, a `save_to_disk` folder, a hub dataset name
(where the network allows) or the built-in `insuranceqa` (package insuranceqa-data==1.0).
Every bad input raises a one-line DataError naming the source, column and position: a line of a
.csv/.jsonl file as an editor numbers it (1-based, a CSV's header line counted), a row (1-based,
with its 0-based index) of parquet, a JSON array, a saved folder or hub data.

Training data stays on disk: a loaded dataset is Arrow memory-mapped (files and hub data through
the `datasets` cache, saved folders as they are; the built-in set and other in-memory data are
written once to an Arrow folder under the gist-ray cache and reopened), and training reads the
rows of a step with :meth:`TrainingSet.texts_at`, so a worker's memory does not grow with the
dataset.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import pyarrow.compute as pc

from gist_ray.core.errors import DataError
from gist_ray.core.storage import StorageError, check_location, is_remote, kind, stage
from gist_ray.data import insuranceqa

if TYPE_CHECKING:
    from gist_ray.config import Config, DatasetSpec

BUILTIN = insuranceqa.NAME
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
NEGATIVE_COLUMN = re.compile(r"negative_([1-9][0-9]*)")
_ROLES_HINT = "allowed: anchor, positive, negative, negative_1, negative_2, ..."
_KINDS_HINT = (
    "give a .json, .jsonl, .csv or .parquet file (a path or a URI such as s3://bucket/key), "
    "a folder of them, a save_to_disk folder, a hub dataset"
)
REMOTE_HINT = "give a .parquet, .jsonl, .json or .csv file or a folder (prefix) of such files"


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
    check_limit("max_examples", max_examples)
    if source.strip().lower() == BUILTIN and not Path(source).exists():
        if split != "train":
            raise DataError(
                f"built-in '{BUILTIN}' training split must be 'train' (got {split!r}); "
                "valid and test are held out for eval"
            )
        ds = _builtin(seed, max_examples)
        label = BUILTIN
        roles = {c: c for c in ds.column_names}
    else:
        ds, label = load_source(source, split)
        ds, roles = _select_roles(ds, columns, label)
        if max_examples is not None and len(ds) > max_examples:
            ds = ds.select(range(max_examples))
    if len(ds) == 0:
        raise DataError(f"{label} is empty (0 rows); training needs at least one row")
    for col in ds.column_names:
        _check_column(ds, col, roles[col], label)
    return ds


def _builtin(seed: int, max_examples: int | None) -> datasets.Dataset:
    """The built-in rows, written once to an Arrow folder under the gist-ray cache (per seed and
    size: the rows are a pure function of both) and memory-mapped from there."""
    from gist_ray.core.assets import cache_root
    from gist_ray.core.fileio import atomic_dir

    folder = cache_root() / "datasets" / f"{BUILTIN}-v1-seed{seed}-{max_examples or 'all'}"
    if not (folder / "state.json").is_file():
        bars = datasets.utils
        rows = datasets.Dataset.from_dict(insuranceqa.train_rows(seed, max_examples))
        quiet = bars.are_progress_bars_disabled()
        bars.disable_progress_bars()  # a worker's bar is noise in the driver's log
        try:
            with atomic_dir(folder) as tmp:
                rows.save_to_disk(str(tmp))
        finally:
            if not quiet:
                bars.enable_progress_bars()
    return datasets.load_from_disk(str(folder))


# ----------------------------------------------------------------------------- sources


def load_source(source: str, split: str) -> tuple[datasets.Dataset, str]:
    """The rows of ``source`` as they are (every column) and the label errors name it by. A URI
    (``s3://``, ``gs://``, ...) is staged once per node and content version into the gist-ray
    cache and read from there exactly as a local file or folder."""
    if is_remote(source):
        return _load_path(stage_source(source), source, split), source
    path = Path(source).expanduser()
    if path.exists():
        return _load_path(path, source, split), source
    if _is_local_source(source):
        raise DataError(f"{source} does not exist; {_KINDS_HINT} or '{BUILTIN}'")
    try:
        return datasets.load_dataset(source, split=split), source
    except Exception as e:
        raise DataError(
            f"{source!r} does not exist locally and cannot be fetched from the hub "
            f"(offline or unknown: {_cause(e)}); {_KINDS_HINT} or '{BUILTIN}'"
        ) from e


# Remote source -> its node-local copy, so that position() and the readers of a source's
# own file (mine, init) find the staged file without staging again.
_STAGED: dict[str, Path] = {}


def stage_source(source: str, hint: str = REMOTE_HINT) -> Path:
    """The node-local copy of the remote ``source`` (file or folder), downloaded once per node
    and content version (names, sizes, ETags or mtimes) under ``<gist-ray cache>/staged``;
    a missing object or prefix (``hint``: what to give instead), bucket or credential problem
    is one DataError naming the URI."""
    from gist_ray.core.assets import cache_root

    try:
        if kind(source) == "missing":
            raise DataError(f"{source} does not exist; {hint}")
        path = stage(source, cache_root() / "staged")
    except StorageError as e:
        raise DataError(str(e)) from e
    _STAGED[source] = path
    return path


def check_remote_source(source: str, key: str) -> None:
    """For a URI: its bucket and credentials work and something is stored there, else one line
    naming ``key`` (a ConfigError or DataError). Lists the store, reads no data."""
    if not is_remote(source):
        return
    check_location(source, key)
    try:
        missing = kind(source) == "missing"
    except StorageError as e:
        raise DataError(f"{key} = {source!r}: {e}") from e
    if missing:
        raise DataError(f"{key} = {source!r} does not exist; {REMOTE_HINT}")


@contextmanager
def named_as(local: Path, source: str) -> Iterator[None]:
    """DataErrors raised inside that name ``local``, the staged copy of ``source``, name
    ``source`` instead: the user knows the URI, not the cache folder."""
    try:
        yield
    except DataError as e:
        if str(local) not in str(e):
            raise
        raise DataError(str(e).replace(str(local), source.rstrip("/"))) from e


def source_file(source: str) -> Path | None:
    """The local file holding ``source``'s rows when it is one file (the staged copy of a URI,
    staged by loading it), else None (a folder, hub or built-in data)."""
    if is_remote(source):
        path = _STAGED.get(source) or stage_source(source)
    else:
        path = Path(source).expanduser()
    return path if path.is_file() else None


def _load_path(path: Path, source: str, split: str) -> datasets.Dataset:
    """Read the local file or folder ``path``; errors name ``source`` (a URI it was staged from,
    or the path as the user gave it)."""
    if path.is_file():
        return _load_files(source, [path], path.suffix.lower(), path)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{source}: saved dataset is empty or damaged ({_cause(e)})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source}: no split {split!r}; splits are: {', '.join(ds)}")
            ds = ds[split]
        return ds
    files = _data_files(path)
    suffixes = sorted({f.suffix.lower() for f in files})
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) != 1:
        what = (
            f"mixes {', '.join(suffixes)} files"
            if files
            else "is not a dataset saved with save_to_disk and holds no .parquet, .jsonl, .json "
            "or .csv file"
        )
        raise DataError(
            f"{source}: folder {what}; give a save_to_disk folder or a folder of data files of "
            "one format (read in name order as one dataset)"
        )
    return _load_files(source, files, suffixes[0], None)


def _data_files(folder: Path) -> list[Path]:
    """The data files under ``folder`` (recursive, in name order), less hidden ones and those
    starting with ``_`` (``_SUCCESS`` and such, which Spark and Hadoop write beside parts)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _BUILDERS
        and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    )


def _load_files(source: str, files: list[Path], suffix: str, one: Path | None) -> datasets.Dataset:
    """Read data files of one format as one dataset; ``one``: the single file ``source`` is."""
    builder = _BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"{source}: unsupported file type {suffix!r}; {_KINDS_HINT}")
    if one is not None and one.stat().st_size == 0:
        raise DataError(f"{source} is empty (0 bytes); training needs at least one row")
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # the builders raise many types; the user needs one line
        if "corresponds to no data" in str(e):
            raise DataError(f"{source} is empty (0 rows); training needs at least one row") from e
        if builder == "json":
            for f in files:
                bad = _bad_json_line(f)
                if bad:  # pyarrow names a 0-based row of a block; an editor needs the line
                    where = source if one is not None else f"{source} ({f.name})"
                    raise DataError(f"line {bad[0]} of {where}: not valid JSON ({bad[1]})") from e
        raise DataError(f"{source}: cannot be read as {builder}: {_cause(e)}") from e


def _bad_json_line(path: Path) -> tuple[int, str] | None:
    """The first line of a JSON Lines file that is not a JSON object, and why. None when the
    file does not look like JSON Lines (its first record does not parse on its own line: a JSON
    array or a pretty-printed document, whose records are not lines) or every line parses."""
    import json

    first = True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return None if first else (lineno, f"{e.msg} at column {e.colno}")
                if not isinstance(record, dict):
                    what = f"expected an object, got {type(record).__name__}"
                    return None if first else (lineno, what)
                first = False
    except OSError:
        return None
    return None


def _is_local_source(s: str) -> bool:
    # Hub dataset ids are `name` or `org/name` without a file extension.
    p = Path(s)
    return (
        s.startswith((".", "/", "~"))
        or "\\" in s
        or p.suffix.lower() in _BUILDERS
        or s.count("/") > 1
        or ("/" in s and Path(s.split("/", 1)[0]).exists())
    )


def check_limit(name: str, value: int | None) -> None:
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
        k
        for k in columns
        if k not in ("anchor", "positive", "negative") and not NEGATIVE_COLUMN.fullmatch(k)
    ]
    if unknown:
        raise DataError(f"unknown column role(s) {', '.join(map(repr, unknown))}; {_ROLES_HINT}")
    for role, src in columns.items():
        if not isinstance(src, str) or not src:
            raise DataError(f"column mapping for {role!r} must be a column name, got {src!r}")
    present = ds.column_names
    if any(k == "negative" or NEGATIVE_COLUMN.fullmatch(k) for k in columns):
        negs = {k: v for k, v in columns.items() if k.startswith("negative")}
    else:  # pick up the source's own negative columns
        used = {columns.get("anchor", "anchor"), columns.get("positive", "positive")}
        negs = {
            c: c
            for c in present
            if (c == "negative" or NEGATIVE_COLUMN.fullmatch(c)) and c not in used
        }
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


CHECK_CHUNK_ROWS = 65_536  # validation reads the data in slices of this many rows


def _check_column(ds: datasets.Dataset, col: str, src: str, label: str) -> None:
    """Every text must be a non-empty, non-whitespace string; report the first bad row. Reads
    the column in slices, so checking a large dataset needs no copy of it in memory."""
    where = f"column {col!r}" + (f" (source column {src!r})" if src != col else "")
    rule = "texts must be non-empty strings"
    kind = ds.features[col]
    if getattr(kind, "dtype", None) not in ("string", "large_string"):
        _first_bad_value(ds, col, where, rule, label)  # numbers, lists, mixed: invalid data only
        return
    arrow = ds.select_columns([col]).with_format("arrow")
    first, n_bad = None, 0
    for start in range(0, len(ds), CHECK_CHUNK_ROWS):
        arr = arrow[start : start + CHECK_CHUNK_ROWS].column(0)
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0)
        bad = pc.or_kleene(pc.is_null(arr), pc.fill_null(blank, False))
        count = pc.sum(bad).as_py() or 0
        if count and first is None:
            row = pc.index(bad, True).as_py()
            first = (start + row, "null" if arr[row].as_py() is None else "empty or whitespace")
        n_bad += count
    if first is not None:
        row, what = first
        raise DataError(
            f"{position(label, row)} of {label}, {where}: {what}; {rule} ({n_bad} bad in all)"
        )


def _first_bad_value(ds: datasets.Dataset, col: str, where: str, rule: str, label: str) -> None:
    for start in range(0, len(ds), CHECK_CHUNK_ROWS):
        for row, value in enumerate(ds[start : start + CHECK_CHUNK_ROWS][col], start):
            if not isinstance(value, str) or not value.strip():
                what = "null" if value is None else f"{type(value).__name__} {value!r:.40}"
                if isinstance(value, str):
                    what = "empty or whitespace"
                raise DataError(f"{position(label, row)} of {label}, {where}: {what}; {rule}")


def position(source: str, row: int) -> str:
    """Where row ``row`` (0-based, as the dataset counts) of ``source`` is, as a person finds it:
    ``line N`` of a .csv or JSON Lines file as an editor numbers its lines (1-based; a CSV's
    header, blank lines and the extra lines of a quoted multi-line cell counted), else ``row N``
    (1-based) with the 0-based index a dataframe or ``ds[i]`` takes."""
    path = _STAGED.get(source) if is_remote(source) else Path(source).expanduser()
    try:
        line = _line_of(path, row) if path is not None and path.is_file() else None
    except (OSError, UnicodeDecodeError, csv.Error):
        line = None
    return f"line {line}" if line else f"row {row + 1} (index {row})"


def _line_of(path: Path, row: int) -> int | None:
    """The 1-based line on which data row ``row`` of a .csv / JSON Lines file starts; None for
    other files (parquet, a JSON array) or when the file has fewer rows."""
    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if suffix == ".csv":
            # As the csv builder (pandas) reads it: blank lines skipped, the first record is the
            # header. A record's first line is one after where the previous one ended.
            reader, records, end = csv.reader(f), -1, 0
            for record in reader:
                if record:
                    if records == row:
                        return end + 1
                    records += 1
                end = reader.line_num
            return None
        if suffix not in (".jsonl", ".json"):
            return None
        n = 0
        for lineno, text in enumerate(f, 1):
            stripped = text.strip()
            if not stripped:
                continue  # the json builder skips blank lines
            if n == 0 and stripped.startswith("["):
                return None  # one JSON array: its rows are not lines
            if n == row:
                return lineno
            n += 1
    return None


@dataclass
class TrainingSet:
    """One training dataset of ``data.train``: its spec and its rows, memory-mapped (Arrow), with
    columns anchor, positive, negative_1..k in loss order."""

    spec: DatasetSpec
    data: datasets.Dataset

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def rows(self) -> int:
        return len(self.data)

    @property
    def columns(self) -> list[str]:
        return loss_columns(self.data)

    def column_texts(self) -> dict[str, list[str]]:
        """Every row's text, per column, read whole: for mining, which searches the whole corpus
        (training reads only its batch rows, :meth:`texts_at`)."""
        return {c: self.data[c] for c in self.columns}

    def texts_at(self, rows: Sequence[int]) -> list[list[str]]:
        """The texts of ``rows`` (in that order), one list per column: read on demand from the
        memory-mapped data."""
        if len(rows) == 0:
            return [[] for _ in self.columns]
        picked = self.data[list(map(int, rows))]
        return [picked[c] for c in self.columns]


def load_training_sets(cfg: Config) -> list[TrainingSet]:
    """The datasets ``data.train`` names, loaded and validated (the built-in set is sampled with
    ``train.seed``). With a list or mapping, errors name the dataset's config key."""
    from gist_ray.config import train_datasets

    specs = train_datasets(cfg.data)
    several = not isinstance(cfg.data.train, str)
    out = []
    for spec in specs:
        check_remote_source(spec.source, spec.key)
        try:
            ds = load_pairs(
                spec.source, spec.columns or None, spec.max_examples or None, seed=cfg.train.seed
            )
        except DataError as e:
            if several:
                raise DataError(f"{spec.key} (dataset {spec.name!r}): {e}") from e
            raise
        out.append(TrainingSet(spec, ds.select_columns(loss_columns(ds))))
    return out


def loss_columns(ds: datasets.Dataset) -> list[str]:
    """The text columns in loss order: anchor, positive, negative_1..k."""
    negatives = sorted(
        (c for c in ds.column_names if NEGATIVE_COLUMN.fullmatch(c)), key=lambda c: int(c[9:])
    )
    return ["anchor", "positive", *negatives]
