"""Files the way gist-ray writes and reads them.

Writes are atomic: everything is built under a temporary name beside its target and renamed into
place when complete, so a crash never leaves a half-written file or folder that looks valid
(a model, a checkpoint, a cache, a results file). A reader sees the old version or the new one.
What is renamed into place has the mode a plain ``open()`` or ``mkdir()`` would give it under
the process's umask, not the temporary file's private 0600 / 0700 (a serving process running as
another user must be able to read the model).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gist_ray.core.errors import DataError


def umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux >= 4.7);
    elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Add to ``path`` (and, for a folder, everything in it) the permission bits a plain
    ``open()`` / ``mkdir()`` would have given under the umask: files made by ``tempfile`` or by
    libraries that write through it (safetensors' 0600 weights) become readable as the umask
    allows. Bits already set stay; nothing is made more private."""
    allowed = ~umask()
    paths = [Path(path)]
    if paths[0].is_dir():
        paths += list(paths[0].rglob("*"))
    for p in paths:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o7777
        wanted = mode | ((0o777 if p.is_dir() else 0o666) & allowed)
        if wanted != mode:
            os.chmod(p, wanted)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that infer the format
    from it work); on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    honour_umask(name)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, **dump_kwargs: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, **dump_kwargs) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` (an
    existing folder is moved aside first and deleted after), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        honour_umask(tmp)
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst`` on one file system; an existing ``dst`` is moved aside
    first and deleted after, so ``dst`` is always either the old folder or the new one."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def move_dir(src: str | Path, dst: str | Path) -> Path:
    """Move a complete folder ``src`` to ``dst`` (replacing it): a rename on one file system,
    else an atomic copy and the source removed."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        _replace_dir(src, dst)
    except OSError:  # another file system
        copy_dir(src, dst)
        shutil.rmtree(src, ignore_errors=True)
    return dst


def copy_dir(src: str | Path, dst: str | Path) -> Path:
    """Copy folder ``src`` to ``dst`` atomically (replacing ``dst``)."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)


def jsonl_records(path: str | Path, what: str = "") -> Iterator[tuple[int, dict]]:
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
