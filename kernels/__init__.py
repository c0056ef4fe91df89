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
