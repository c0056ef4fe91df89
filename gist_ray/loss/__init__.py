"""The GIST loss: a module (:class:`GistLoss`), a functional form (:func:`gist_loss`), and the
backends behind them. The definition is in docs/loss.md.

* :mod:`.module`: ``GistLoss``, built once from the loss settings (validated there);
* :mod:`.functional`: the maths shared by both (checks, dtype, normalise, gather, statistics);
* :mod:`.plan`: the problem every backend sees, and the arithmetic they share (exact ties,
  mask bits);
* :mod:`.reference`: the materialised oracle; :mod:`.chunked`: the tiled CPU backend;
* :mod:`.op`: the custom op running ``chunked`` or the Triton kernels (``gist_ray.kernels``).

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

__all__ = [
    "BACKENDS",
    "HARDNESS_MODES",
    "STRATEGIES",
    "GistLoss",
    "gist_loss",
    "validate_loss_args",
    "validate_matryoshka",
]
