"""Triton kernels of the GIST loss, installed as ``gist_ray.kernels`` (never as ``kernels``).

Three layers, kept apart:

* :mod:`.gist_kernels`: the ``@triton.jit`` forward (online lse, masked and above counts) and
  backward (masked softmax tile) kernels;
* :mod:`.gist_function`: launchers and the ``torch.autograd.Function`` (tile shapes, column
  splits, backward chunks and GEMMs);
* ``gist_ray.loss.triton_backend``: the thin adapter from the loss front end's segment plan.

Importing this package imports nothing (not even triton): whether the kernels are compiled or
interpreted is decided when :mod:`.gist_kernels` is first imported (``TRITON_INTERPRET=1``).
"""
