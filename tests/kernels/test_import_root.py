"""The checkout's ``kernels/`` folder is ``gist_ray.kernels`` and never the top-level module
``kernels``: that name is Hugging Face's kernel hub client, which transformers (>= 5.25) imports
whenever it loads a model. Whenever the repository root is on ``sys.path`` (pytest, ``python -m``
from the root, ``gist-ray`` run in the root, a Ray job's working dir) the folder must not shadow
it. Each test runs a fresh interpreter, because this one has imported both already."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *flags: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_import_kernels_from_the_root_is_hugging_faces_package():
    proc = _python(
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, '')\n"
        "import kernels\n"
        "print(kernels.__file__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = Path(proc.stdout.strip()).resolve()
    assert not where.is_relative_to(ROOT), f"`import kernels` resolved into the checkout: {where}"


def test_transformers_kernel_integration_imports_with_the_root_first_on_sys_path():
    proc = _python(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import transformers.integrations.hub_kernels as hk\n"
        "import kernels\n"
        "assert hasattr(kernels, 'CUDAProperties'), kernels.__file__\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_without_hugging_faces_package_the_name_is_absent_not_ours():
    """``-S``: no site-packages, so only the checkout could answer ``import kernels``."""
    proc = _python(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as e:\n"
        "    assert e.name == 'kernels', e.name\n"
        "    assert 'kernels' not in sys.modules\n"
        "    print('absent')\n",
        "-S",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "absent"


def test_a_copy_of_the_checkout_uses_its_own_kernels(tmp_path):
    """A Ray job's working dir is a copy of the checkout, first on the workers' path: its
    ``gist_ray`` takes its ``kernels/`` from beside it, not from wherever gist-ray is installed."""
    for name in ("gist_ray", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = _python(
        "import gist_ray.kernels.gist_function as f, gist_ray.kernels as k, sys\n"
        "print(k.__file__); print(f.__file__)\n"
        "import kernels\n"
        "print(kernels.__file__)\n",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    package, module, hub = (Path(line).resolve() for line in proc.stdout.split())
    assert package == tmp_path / "kernels" / "__init__.py"
    assert module == tmp_path / "kernels" / "gist_function.py"
    assert not hub.is_relative_to(tmp_path)
