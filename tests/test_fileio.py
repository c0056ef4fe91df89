"""Atomic writes (gist_ray.core.fileio): what is renamed into place gets the mode a plain open()
or mkdir() would give it under the process's umask, not tempfile's private 0600 / 0700; a model
folder a serving process running as another user must read included."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gist_ray.core import fileio


@pytest.fixture(params=[0o022, 0o077, 0o002])
def mask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_umask_is_read_without_changing_it(mask):
    assert fileio.umask() == mask
    assert fileio.umask() == mask


def test_atomic_file_and_folder_follow_the_umask(mask, tmp_path):
    fileio.write_json(tmp_path / "a.json", {"x": 1})
    with fileio.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner.txt").write_text("plain open()")
        (tmp / "sub").mkdir()
    fileio.copy_dir(tmp_path / "folder", tmp_path / "copy")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    for root in (tmp_path / "folder", tmp_path / "copy"):
        for name, mode in _modes(root).items():
            plain = 0o777 if (tmp_path / name).is_dir() else 0o666
            assert mode == plain & ~mask, f"{name}: {oct(mode)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "copy", "folder"]


def test_a_saved_model_is_readable_by_others(tmp_path, tiny_models):
    from gist_ray.models.encoder import load_encoder

    old = os.umask(0o022)
    try:
        load_encoder(str(tiny_models["student"])).save(tmp_path / "model")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "model")
    assert len(modes) > 3
    bad = {n: oct(m) for n, m in modes.items() if m & 0o044 != 0o044}
    assert not bad, f"not readable by group and others: {bad}"
