"""The GIST loss: a module (:class:`GistLoss`), a functional form (:func:`gist_loss`), and the
backends behind them. The definition is in docs/loss.md.

* :mod:`.module`: ``GistLoss``, built once from the loss settings (validated there);
* :mod:`.functional`: the maths shared by both (normalise, gather, segment plan, statistics);
* :mod:`.plan`: the flattened problem every backend sees;
* :mod:`.reference`, :mod:`.chunked`, :mod:`.triton_backend`: the backends.

Importing this package imports neither triton nor Ray.
"""

from gist_ray.loss.functional import BACKENDS, gist_loss, validate_loss_args
from gist_ray.loss.module import GistLoss
from gist_ray.loss.plan import STRATEGIES

__all__ = ["BACKENDS", "STRATEGIES", "GistLoss", "gist_loss", "validate_loss_args"]
