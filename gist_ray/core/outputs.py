"""An output folder that may be a URI: its files are written locally, then uploaded.

A local ``output_dir`` is used as it is. For a URI (``s3://…``) the files a command writes there
(the model, the plots, mined data) are built in a node-local temporary folder and uploaded, a
folder replacing the one stored before; the temporary folder is removed at the end. Small
records (``run.json``, ``best-model.json``) are written straight through
:mod:`gist_ray.core.storage`. So nothing ever calls ``Path()`` on the URI (which would write a
local folder named ``s3:``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from gist_ray.core import storage


class Output:
    """The output folder ``location`` and where this process writes its files (``local``)."""

    def __init__(self, location: str, prefix: str = "gist-ray-out-") -> None:
        self.remote = storage.is_remote(location)
        self.location = location if self.remote else storage.absolute(location)
        self.local = (
            Path(tempfile.mkdtemp(prefix=prefix))
            if self.remote
            else storage.local_path(self.location)
        )

    def path(self, *parts: str) -> Path:
        """Where this process writes ``parts`` (the final place for a local output folder)."""
        return self.local.joinpath(*parts)

    def uri(self, *parts: str) -> str:
        """Where ``parts`` ends up: a path or a URI."""
        return storage.join(self.location, *parts)

    def publish(self, *parts: str) -> str:
        """Upload the local file or folder ``parts`` to its place in a remote output folder
        (a folder replaces the one stored there: no stale file of an earlier upload stays);
        return that place. Nothing to do for a local output folder."""
        if self.remote:
            src, dest = self.path(*parts), self.uri(*parts)
            if src.is_dir():
                storage.remove(dest)
            storage.upload(src, dest)
        return self.uri(*parts)

    def close(self) -> None:
        """Remove the local temporary folder of a remote output folder."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def __enter__(self) -> Output:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def size(location: str | Path) -> int:
    """Bytes in the files at ``location`` (a path or a URI; 0 if it does not exist)."""
    if not storage.is_remote(str(location)):
        path = storage.local_path(str(location))
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return sum(e.size for e in storage.listing(str(location)))
