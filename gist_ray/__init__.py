"""gist-ray: GISTEmbed fine-tuning at large batch sizes (docs/architecture.md)."""

import importlib.util
import os
import sys


def _bind_checkout_kernels() -> None:
    """Bind ``gist_ray.kernels`` to the checkout's top-level ``kernels/`` folder when this
    package is imported from a checkout or a copy of one (a Ray job's working dir). An install
    has ``gist_ray/kernels/`` inside the package (pyproject's package-dir), and an editable
    install's finder points at the original checkout, not at the copy beside this file."""
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.isdir(os.path.join(here, "kernels")) or not os.path.isfile(
        os.path.join(folder, "gist_kernels.py")
    ):
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.kernels", init, submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # a docstring and the name guard: imports nothing
    sys.modules[__name__].kernels = module


_bind_checkout_kernels()
