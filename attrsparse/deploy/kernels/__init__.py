"""Native kernels: C sources shipped as package data (``*.c``, ``*.h``), built by :mod:`.build`.

* :mod:`.gather`: gathered MLP/attention products and one-token plans (``gather.c``) behind a
  torch fallback.
"""

from .gather import SUFFIX, CBackend, OneTokenPlan, TorchBackend, gather_backend, measure_break_even

__all__ = ["SUFFIX", "CBackend", "OneTokenPlan", "TorchBackend", "gather_backend", "measure_break_even"]
