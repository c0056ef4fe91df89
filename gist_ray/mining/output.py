"""Where mined negatives go: resumable parts, then one output file written atomically.

While mining, each part of ``part_rows`` rows is written as ``part-NNNNN.parquet`` in the hidden
folder ``.<output name>.parts`` beside the output, and recorded in its ``manifest.json`` (both
atomically), so an interrupted run continues from the last complete part. When every part is
there the output is written under a temporary name and renamed, then the sidecar
``<output>.mine.json`` records what it was mined from (a fingerprint of the data, the guide's
embeddings and the settings) and the output's sha256: a rerun with the same inputs finds it
finished, a rerun with other inputs mines again, and a file gist-ray did not write is never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from gist_ray.core import fileio
from gist_ray.core.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "gist-ray-mine-v1"
WRITERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".mine.json")


def parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def check_output(out: Path, key: str) -> None:
    """A supported suffix, a writable folder, and no file there that gist-ray did not mine."""
    if out.suffix.lower() not in WRITERS:
        raise ConfigError(
            f"{key} = {str(out)!r}: unsupported file type {out.suffix!r}; use {', '.join(WRITERS)}"
        )
    if out.is_dir():
        raise ConfigError(f"{key} = {str(out)!r} is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        raise ConfigError(f"{key} = {str(out)!r}: cannot write there ({e.strerror or e})") from e
    if out.exists() and not sidecar(out).is_file():
        raise ConfigError(
            f"{key} = {str(out)!r} exists and was not written by gist-ray mine; "
            "remove it or choose another path"
        )


def finished(out: Path, fingerprint: dict[str, str], key: str) -> dict[str, Any] | None:
    """The summary of a finished output mined from the same inputs, else None (with the
    reason logged). An output changed since it was mined is refused, not overwritten."""
    if not out.is_file() or not sidecar(out).is_file():
        return None
    meta = json.loads(sidecar(out).read_text())
    if meta.get("sha256") != sha256_file(out):
        if parts_dir(out).is_dir():  # parts are removed last: the last run died while writing
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
    """The resumable parts of one output."""

    def __init__(self, out: Path, fingerprint: dict[str, str], part_rows: int) -> None:
        self.dir = parts_dir(out)
        self.manifest = {"format": FORMAT, "fingerprint": fingerprint, "part_rows": part_rows}
        self.done: dict[int, str] = {}
        path = self.dir / "manifest.json"
        if path.is_file():
            old = json.loads(path.read_text())
            saved = {k: old.get(k) for k in self.manifest}
            if saved == self.manifest:
                self.done = {
                    int(i): f for i, f in old.get("parts", {}).items() if (self.dir / f).is_file()
                }
                if self.done:
                    log.info("resuming: %d part(s) already mined in %s", len(self.done), self.dir)
            else:
                log.info("parts in %s are from other inputs or settings; starting over", self.dir)
                shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, index: int, table: pa.Table) -> None:
        name = f"part-{index:05d}.parquet"
        with fileio.atomic_file(self.dir / name) as tmp:
            pq.write_table(table, tmp)
        self.done[index] = name
        parts = {str(i): f for i, f in sorted(self.done.items())}
        fileio.write_json(self.dir / "manifest.json", {**self.manifest, "parts": parts})

    def read(self) -> pa.Table:
        return pa.concat_tables(pq.read_table(self.dir / f) for _, f in sorted(self.done.items()))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def write_output(
    out: Path, ds: datasets.Dataset, fingerprint: dict[str, str], summary: dict[str, Any]
) -> None:
    """The dataset in the output's format, atomically, then its sidecar."""
    with fileio.atomic_file(out) as tmp:
        kind = WRITERS[out.suffix.lower()]
        if kind == "parquet":
            ds.to_parquet(str(tmp))
        elif kind == "json":
            ds.to_json(str(tmp), lines=True, force_ascii=False)
        else:
            ds.to_csv(str(tmp), index=False)
        # The sidecar first, naming the new file's hash: a crash before the rename leaves the
        # old file with a sidecar that does not match it, and the parts (see finished()).
        meta = {"format": FORMAT, "fingerprint": fingerprint, "sha256": sha256_file(tmp)}
        fileio.write_json(sidecar(out), {**meta, "summary": summary})
