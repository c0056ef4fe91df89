"""Where gist-ray reads and writes: a local path or a URI that ``pyarrow.fs`` understands
(``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``).

This is the one module that turns a location into a file system (as Ray Train does for its
checkpoints). Code above it keeps locations as strings and never passes a URI to ``Path()``
(which collapses ``s3://b/k`` to ``s3:/b/k`` and writes a local folder named ``s3:``).

Credentials and endpoints come from the environment the way pyarrow, boto3 and Ray take them
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, instance
roles, ...). An object store has no rename, but an object becomes visible only when its upload
completed, so each remote file is written once, whole (a local temporary file is uploaded); a
reader never sees half of one. Remote data is used from a node-local copy (:func:`stage`), made
once per node and content version, written under a temporary name and renamed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gist_ray.core import fileio
from gist_ray.core.errors import ConfigError, GistRayError

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(GistRayError):
    """A remote location cannot be reached, read or written; the message is one line."""


def scheme(location: str) -> str:
    """The URI scheme of ``location`` (``"s3"``), or ``""`` for a plain path."""
    m = _SCHEME.match(str(location))
    return m.group(1).lower() if m else ""


_HALF_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def mistyped_uri(location: str | None) -> str | None:
    """The URI a value such as ``s3:/bucket/key`` (one slash: what ``Path("s3://b/k")`` prints)
    was meant to be, or None. As a path it would make a local folder named ``s3:``."""
    m = _HALF_URI.match(str(location or ""))
    return f"{m.group(1)}://{str(location)[m.end() :]}" if m else None


def is_remote(location: str | os.PathLike | None) -> bool:
    """True for a URI on another file system (``s3://``, ``gs://``, ...); False for a plain path
    and for ``file://``."""
    return location is not None and scheme(str(location)) not in ("", "file")


def local_path(location: str | os.PathLike) -> Path:
    """The local path of a plain path or ``file://`` URI; a remote URI is an error (a bug)."""
    text = str(location)
    if is_remote(text):
        raise ValueError(f"{text} is not a local path")
    if scheme(text) == "file":
        text = text[len("file://") :]
    return Path(text).expanduser()


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base / parts`` for a path or a URI (a URI keeps its scheme and ``//``)."""
    text = str(base)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *parts) if parts else text
    return str(local_path(text).joinpath(*parts))


def name(location: str | os.PathLike) -> str:
    """The last component of a path or URI (``s3://b/data/train.csv`` -> ``train.csv``)."""
    return posixpath.basename(str(location).rstrip("/"))


def parent(location: str | os.PathLike) -> str:
    text = str(location).rstrip("/")
    if is_remote(text):
        head = posixpath.dirname(text)
        return head if scheme(head) else text  # the bucket itself has no parent
    return str(local_path(text).parent)


def absolute(location: str) -> str:
    """A plain path made absolute (``~`` expanded); a URI unchanged."""
    return location if is_remote(location) else str(local_path(location).resolve())


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow file system, path within it) for ``location``."""
    import pyarrow.fs as pafs

    text = str(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(local_path(text).absolute())
    try:
        return pafs.FileSystem.from_uri(text)
    except Exception as e:  # ArrowInvalid / ArrowNotImplementedError: an unknown or bad URI
        raise StorageError(f"{text}: not a storage URI pyarrow can open ({_first_line(e)})") from e


@dataclass(frozen=True, order=True)
class Entry:
    """One file under a location: its path relative to it, size, modification time (ns) and,
    where asked for and the store gives one, its ETag (a checksum of its content)."""

    relpath: str
    size: int
    mtime_ns: int
    etag: str = ""

    @property
    def stamp(self) -> str:
        """What tells this content from another at the same name and size: the ETag where
        known, else the modification time (to the second on S3)."""
        return self.etag or str(self.mtime_ns)


def kind(location: str | os.PathLike) -> str:
    """``"file"``, ``"dir"`` or ``"missing"``. A bucket's missing prefix is "missing"."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = _call(location, "read", lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.File:
        return "file"
    if info.type == pafs.FileType.Directory:
        return "dir"
    return "missing"


def exists(location: str | os.PathLike) -> bool:
    return kind(location) != "missing"


def listing(location: str | os.PathLike, etags: bool = False) -> list[Entry]:
    """Every file under a folder (recursive, sorted), or the one file ``location`` names. With
    ``etags``, each entry of an ``s3://`` location carries its ETag where boto3 can list them."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = _call(location, "read", lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.File:
        entries = [Entry("", info.size, _mtime(info))]
    elif info.type == pafs.FileType.Directory:
        infos = _call(
            location, "list", lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True))
        )
        root = path.rstrip("/") + "/"
        entries = sorted(
            Entry(i.path[len(root) :], i.size, _mtime(i))
            for i in infos
            if i.type == pafs.FileType.File
        )
    else:
        return []
    tags = _s3_etags(str(location)) if etags and entries else None
    if tags is None:
        return entries
    return [replace(e, etag=tags.get(e.relpath, "")) for e in entries]


def version(location: str | os.PathLike) -> str:
    """A digest of what is stored at ``location``, from the store's listing (no byte is read):
    the files' names, sizes and ETags (checksums of their content) on S3 where boto3 is
    installed, else their modification times, which S3 lists only to the second."""
    return digest(location, listing(location, etags=True))[:16]


def digest(location: str | os.PathLike, entries: list[Entry]) -> str:
    """The content version of ``entries`` listed under ``location``: their names, sizes and
    stamps (ETags, else modification times), hashed with the location."""
    h = hashlib.sha256(str(location).encode())
    for e in entries:
        h.update(f"\0{e.relpath}\0{e.size}\0{e.stamp}".encode())
    return h.hexdigest()


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    return _call(location, "read", lambda: _read_all(fs, path))


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_text(location))


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: atomically (temporary name, rename) on a local disk; as one upload
    of a complete local file to a URI."""
    if not is_remote(location):
        with fileio.atomic_file(local_path(location)) as tmp:
            tmp.write_bytes(data)
        return
    with tempfile.TemporaryDirectory(prefix="gist-ray-upload-") as tmp:
        src = Path(tmp) / "part"
        src.write_bytes(data)
        upload(src, location)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str | os.PathLike, obj: Any) -> None:
    write_text(location, json.dumps(obj, indent=2) + "\n")


def upload(src: str | Path, dest: str | os.PathLike) -> None:
    """Copy a local file or folder to ``dest`` (a URI or a path), file by file, each whole.
    A local ``dest`` is replaced atomically."""
    import pyarrow.fs as pafs

    src = Path(src)
    if not is_remote(dest):
        if src.is_dir():
            fileio.copy_dir(src, local_path(dest))
        else:
            with fileio.atomic_file(local_path(dest)) as tmp:
                shutil.copyfile(src, tmp)
        return
    fs, path = filesystem(dest)
    _call(dest, "write", lambda: pafs.copy_files(str(src), path, destination_filesystem=fs))


def download(location: str | os.PathLike, dest: str | Path) -> Path:
    """Copy the file or folder at ``location`` to the local ``dest``, atomically."""
    import pyarrow.fs as pafs

    dest = Path(dest)
    fs, path = filesystem(location)
    what = kind(location)
    if what == "missing":
        raise StorageError(f"{location} does not exist")
    if what == "file":
        with fileio.atomic_file(dest) as tmp:
            _call(location, "read", lambda: _copy_from(fs, path, tmp))
        return dest
    with fileio.atomic_dir(dest) as tmp:
        _call(
            location,
            "read",
            lambda: pafs.copy_files(path, str(tmp), source_filesystem=fs),
        )
    return dest


def remove(location: str | os.PathLike) -> None:
    """Delete the file or folder at ``location`` (nothing if it is missing)."""
    if not is_remote(location):
        p = local_path(location)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    what = kind(location)
    if what == "file":
        _call(location, "write", lambda: fs.delete_file(path))
    elif what == "dir":
        _call(location, "write", lambda: fs.delete_dir(path))


def stage(location: str | os.PathLike, root: str | Path) -> Path:
    """A node-local copy of the remote file or folder ``location`` under ``root``, made once per
    content version (:func:`version`) and reused after; a local ``location`` is returned as it
    is. Processes of one node that stage the same version at once download it once (a lock
    file beside the copy); the copy is written under a temporary name and renamed."""
    if not is_remote(location):
        return local_path(location)
    if kind(location) == "missing":
        raise StorageError(f"{location} does not exist")
    root = Path(root)
    target = root / f"{version(location)}-{name(location) or 'root'}"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{target.name}.lock"):
        if not target.exists():
            download(location, target)
    return target


def check_location(location: str, key: str, write: bool = False) -> None:
    """Fail in one line naming ``key`` unless ``location`` can be reached (its bucket exists,
    the credentials are accepted) and, with ``write``, written: a probe object is written and
    removed. Local paths are not checked here."""
    if not is_remote(location):
        return
    try:
        fs, path = filesystem(location)
        bucket = path.split("/", 1)[0]
        import pyarrow.fs as pafs

        info = fs.get_file_info(bucket) if bucket else None
        if info is not None and info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} does not exist")
        fs.get_file_info(path)
        if write:
            probe = join(location, f".gist-ray-write-check-{os.getpid()}")
            write_bytes(probe, b"")
            remove(probe)
    except GistRayError as e:
        raise ConfigError(f"{key} = {location!r}: {_strip_location(str(e), location)}") from e
    except Exception as e:
        raise ConfigError(f"{key} = {location!r}: {_reason(e)}") from e


# ----------------------------------------------------------------------------- internals


def _read_all(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _copy_from(fs: Any, path: str, dest: Path) -> None:
    with fs.open_input_stream(path) as src, open(dest, "wb") as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)


def _s3_etags(location: str) -> dict[str, str] | None:
    """The ETag of every object at an ``s3://`` location, by path relative to it, listed with
    boto3 (the ``[cloud]`` extra; pyarrow's listing has no ETags). None where boto3 is missing,
    the URI carries pyarrow-only options (``?endpoint_override=``) or the listing fails: the
    caller then falls back to modification times."""
    if scheme(location) != "s3" or "?" in location:
        return None
    try:
        import boto3
    except ImportError:
        return None
    bucket, _, key = location[len("s3://") :].partition("/")
    key = key.strip("/")
    try:
        # A session of its own: boto3's default session is not safe to share between threads.
        pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2")
        out = {}
        for page in pages.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if k == key:
                    out[""] = obj["ETag"]
                elif not key or k.startswith(key + "/"):
                    out[k[len(key) + 1 if key else 0 :]] = obj["ETag"]
        return out
    except Exception as e:  # any SDK or network error: modification times still work
        log.debug("no ETags for %s (%s); versions use modification times", location, e)
        return None


def _mtime(info: Any) -> int:
    return int(info.mtime_ns or 0) if info.mtime_ns is not None else 0


def _call(location: Any, verb: str, fn: Any) -> Any:
    """Run ``fn``; a store's error becomes a one-line StorageError naming the location."""
    try:
        return fn()
    except GistRayError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{location} does not exist") from e
    except OSError as e:
        raise StorageError(f"cannot {verb} {location}: {_reason(e)}") from e


_REASONS = (
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("NoSuchBucket", "the bucket does not exist"),
    ("INVALID_ACCESS_KEY_ID", "the access key is not accepted (check the credentials)"),
    ("InvalidAccessKeyId", "the access key is not accepted (check the credentials)"),
    ("SIGNATURE_DOES_NOT_MATCH", "the secret key is not accepted (check the credentials)"),
    ("SignatureDoesNotMatch", "the secret key is not accepted (check the credentials)"),
    ("ACCESS_DENIED", "access denied (check the credentials and the bucket's permissions)"),
    ("AccessDenied", "access denied (check the credentials and the bucket's permissions)"),
    ("NETWORK_CONNECTION", "cannot connect to the store (check the endpoint, AWS_ENDPOINT_URL)"),
    ("Could not resolve host", "cannot connect to the store (check the endpoint)"),
    ("credentials", "no credentials found (set them as the store's SDK expects)"),
)


def _reason(e: BaseException) -> str:
    text = str(e)
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _strip_location(message: str, location: str) -> str:
    for prefix in (f"cannot read {location}: ", f"cannot write {location}: ", f"{location}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
