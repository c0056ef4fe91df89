"""``gist-ray doctor``'s checks: what a user runs before a long job (docs/doctor.md).

Needs torch, and triton on CUDA; never Ray, MLflow or datasets (the GPU machine may lack them).

* :mod:`.settings`: what is checked (the loss settings and dtypes of a run, as plain values);
* :mod:`.environment`: versions and GPUs;
* :mod:`.cases`: the checked sizes (small, and across the tiled backends' seams) and inputs;
* :mod:`.compare`: one backend against the ``reference`` oracle, forward and backward;
* :mod:`.gather`: W processes with the all-gather against one process;
* :mod:`.speed`: the speed figure on a GPU;
* :mod:`.machine`: every check of one machine, as a report; :mod:`.report`: its table.
"""

from gist_ray.doctor.machine import check_machine
from gist_ray.doctor.settings import Settings

__all__ = ["Settings", "check_machine"]
