"""Where mined negatives go: resumable parts, then one output file written atomically.

While mining, each part of ``part_rows`` rows is written as ``part-NNNNN.parquet`` in the hidden
folder ``.<output name>.parts`` beside the output, and recorded in its ``manifest.json`` (both
atomically), so an interrupted run continues from the last complete part. When every part is
there the output is written under a temporary name and renamed, then the sidecar
``<output>.mine.json`` records what it was mined from (a fingerprint of the data, the guide's
embeddings and the settings) and the output's sha256: a rerun with the same inputs finds it
finished, a rerun with other inputs mines again, and a file gist-ray did not write is never
overwritten.

The output may be a URI (``s3://…``): the parts and the manifest are then objects beside it,
each written locally and uploaded whole (an object store has no rename, but an object appears
only once its upload completed), and the output is uploaded once complete, after its sidecar.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from gist_ray.core import fileio, storage
from gist_ray.core.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "gist-ray-mine-v1"
WRITERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file, a path or a URI (read as a stream: no local copy of a remote
    object)."""
    h = hashlib.sha256()
    fs, where = storage.filesystem(str(path))
    with fs.open_input_stream(where) as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def suffix(out: str | Path) -> str:
    """The output's file type: ``.parquet``, ``.jsonl``, ... (lower case)."""
    return posixpath.splitext(storage.name(str(out)))[1].lower()


def sidecar(out: str | Path) -> str:
    return f"{out}.mine.json"


def parts_dir(out: str | Path) -> str:
    return storage.join(storage.parent(str(out)), f".{storage.name(str(out))}.parts")


def check_output(out: str, key: str) -> None:
    """A supported suffix, a writable folder, and no file there that gist-ray did not mine.
    ``out`` is a path or a URI (its bucket was checked before anything started)."""
    if suffix(out) not in WRITERS:
        raise ConfigError(
            f"{key} = {out!r}: unsupported file type {suffix(out)!r}; use {', '.join(WRITERS)}"
        )
    what = storage.kind(out)
    if what == "dir":
        raise ConfigError(f"{key} = {out!r} is a folder; give a file name")
    if not storage.is_remote(out):
        folder = storage.local_path(out).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise ConfigError(f"{key} = {out!r}: cannot write there ({e.strerror or e})") from e
    if what == "file" and storage.kind(sidecar(out)) != "file":
        raise ConfigError(
            f"{key} = {out!r} exists and was not written by gist-ray mine; "
            "remove it or choose another path"
        )


def finished(out: str, fingerprint: dict[str, str], key: str) -> dict[str, Any] | None:
    """The summary of a finished output mined from the same inputs, else None (with the
    reason logged). An output changed since it was mined is refused, not overwritten."""
    if storage.kind(out) != "file" or storage.kind(sidecar(out)) != "file":
        return None
    meta = storage.read_json(sidecar(out))
    if meta.get("sha256") != sha256_file(out):
        # parts are removed last: the last run died while writing
        if storage.kind(parts_dir(out)) == "dir":
            log.info("%s was being written when the last run stopped; writing it again", out)
            return None
        raise ConfigError(
            f"{key} = {str(out)!r} was changed after gist-ray mined it; "
            "remove it (and its .mine.json) or choose another path"
        )
    old = meta.get("fingerprint", {})
    if old == fingerprint:
        return meta["summary"]
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    log.info("%s was mined with other %s; mining again", out, ", ".join(changed))
    return None


class Parts:
    """The resumable parts of one output, beside it (on the same disk or store): each part and
    then the manifest naming it is written whole, so a rerun continues after the last part
    the manifest names."""

    def __init__(self, out: str, fingerprint: dict[str, str], part_rows: int) -> None:
        self.dir = parts_dir(out)
        self.manifest = {"format": FORMAT, "fingerprint": fingerprint, "part_rows": part_rows}
        self.done: dict[int, str] = {}
        path = storage.join(self.dir, "manifest.json")
        if storage.kind(path) == "file":
            old = storage.read_json(path)
            saved = {k: old.get(k) for k in self.manifest}
            if saved == self.manifest:
                present = {e.relpath for e in storage.listing(self.dir)}
                self.done = {int(i): f for i, f in old.get("parts", {}).items() if f in present}
                if self.done:
                    log.info("resuming: %d part(s) already mined in %s", len(self.done), self.dir)
            else:
                log.info("parts in %s are from other inputs or settings; starting over", self.dir)
                storage.remove(self.dir)

    def write(self, index: int, table: pa.Table) -> None:
        name = f"part-{index:05d}.parquet"
        target = storage.join(self.dir, name)
        if storage.is_remote(target):
            with tempfile.TemporaryDirectory(prefix="gist-ray-mine-") as tmp:
                pq.write_table(table, Path(tmp) / name)
                storage.upload(Path(tmp) / name, target)
        else:
            with fileio.atomic_file(storage.local_path(target)) as tmp:
                pq.write_table(table, tmp)
        self.done[index] = name
        parts = {str(i): f for i, f in sorted(self.done.items())}
        storage.write_json(
            storage.join(self.dir, "manifest.json"), {**self.manifest, "parts": parts}
        )

    def read(self) -> pa.Table:
        tables = []
        for _, f in sorted(self.done.items()):
            fs, path = storage.filesystem(storage.join(self.dir, f))
            tables.append(pq.read_table(path, filesystem=fs))
        return pa.concat_tables(tables)

    def remove(self) -> None:
        storage.remove(self.dir)


def write_output(
    out: str, ds: datasets.Dataset, fingerprint: dict[str, str], summary: dict[str, Any]
) -> None:
    """The dataset in the output's format, atomically (a URI: written locally, one upload),
    then its sidecar."""
    if storage.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="gist-ray-mine-") as tmp:
            local = Path(tmp) / storage.name(out)
            _write(local, ds, out, fingerprint, summary)
            storage.upload(local, out)
        return
    with fileio.atomic_file(storage.local_path(out)) as tmp:
        _write(tmp, ds, out, fingerprint, summary)


def _write(
    tmp: Path, ds: datasets.Dataset, out: str, fingerprint: dict[str, str], summary: dict
) -> None:
    kind = WRITERS[suffix(out)]
    if kind == "parquet":
        ds.to_parquet(str(tmp))
    elif kind == "json":
        ds.to_json(str(tmp), lines=True, force_ascii=False)
    else:
        ds.to_csv(str(tmp), index=False)
    # The sidecar first, naming the new file's hash: a crash before the rename (the upload)
    # leaves the old file with a sidecar that does not match it, and the parts (see finished()).
    meta = {"format": FORMAT, "fingerprint": fingerprint, "sha256": sha256_file(tmp)}
    storage.write_json(sidecar(out), {**meta, "summary": summary})
