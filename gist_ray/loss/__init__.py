"""The GIST loss: a module (:class:`GistLoss`), a functional form (:func:`gist_loss`), and the
backends behind them. The definition is in docs/loss.md.

* :mod:`.module`: ``GistLoss``, built once from the loss settings (validated there);
* :mod:`.functional`: the maths shared by both (checks, dtype, normalise, gather, statistics);
* :mod:`.plan`: the problem every backend sees, and the arithmetic they share (exact ties,
  mask bits);
* :mod:`.reference`: the materialised oracle; :mod:`.chunked`: the tiled CPU backend;
* :mod:`.op`: the custom op running ``chunked`` or the Triton kernels (``gist_ray.kernels``);
* :mod:`.select`: what ``loss.compute_dtype`` and ``loss.backend`` become on a device (the
  kernel checked first by :mod:`.probe`, a small comparison with the reference).

Importing this package imports neither triton nor Ray.
"""

from gist_ray.loss.functional import (
    BACKENDS,
    gist_loss,
    validate_loss_args,
    validate_matryoshka,
)
from gist_ray.loss.module import GistLoss
from gist_ray.loss.plan import HARDNESS_MODES, STRATEGIES
from gist_ray.loss.select import COMPUTE_DTYPES, choose_backend, compute_dtype_for

__all__ = [
    "BACKENDS",
    "COMPUTE_DTYPES",
    "HARDNESS_MODES",
    "STRATEGIES",
    "GistLoss",
    "choose_backend",
    "compute_dtype_for",
    "gist_loss",
    "validate_loss_args",
    "validate_matryoshka",
]
