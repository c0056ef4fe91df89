"""Triton kernels of the GIST loss, installed as ``gist_ray.kernels`` (never as ``kernels``).
docs/kernel.md describes them; docs/loss.md defines the loss.

Layers, kept apart:

* :mod:`.gist_kernels`: the ``@triton.jit`` forward, diagonal (``t_i``, the positive's logit)
  and backward (``w·(P - onehot)`` tile) kernels;
* :mod:`.gist_function`: tile plans and launchers (grids, checks, the backward's GEMMs);
* ``gist_ray.loss.op``: the ``torch.library`` custom op that gives them autograd;
* :mod:`.compile_check`: the compile gate (every variant, sm_90a and sm_80, no GPU needed).

Importing this package imports nothing (not even triton): whether the kernels are compiled or
interpreted is decided when :mod:`.gist_kernels` is first imported (``TRITON_INTERPRET=1``).
"""

# This folder is gist_ray.kernels (pyproject's package-dir), but from a checkout the repository
# root is often on sys.path (pytest, `python -m`, `gist-ray` run in the root, a Ray job's working
# dir), and then `import kernels` would find this folder before Hugging Face's `kernels`, which
# transformers imports. No pytest option or sys.path edit covers every one of those ways in, so
# the folder guards itself: imported as the top-level `kernels`, it loads the real distribution
# from the rest of sys.path in its place, or fails as if the name were absent.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' ({os.path.dirname(__file__)} is gist_ray.kernels)",
            name="kernels",
        )
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_real)
