"""Deployment: the one verb to make a model sparse, calibrated static masks, predictors, sliced
stock exports, kernels and the sparse decoding runtime.

* :mod:`.sparsify`: :func:`sparsify`, the entry point for any sparsity spec;
* :mod:`.calibrate`: ``attrsparse calibrate``, the sparsity directory (:func:`run_calibration`);
* :mod:`.predictor`: ``attrsparse train-predictor`` (oracle labels, training, held-out report);
* :mod:`.export`: :func:`slice_model` / :func:`export_model`, a physically smaller stock model;
* :mod:`.kernels`: C sources and their one build step; gathered MLP/attention products;
* :mod:`.gathered`, :mod:`.runtime`: :func:`generate`, greedy decoding with a KV cache under
  static masks, per-token unit choosers (predictors) or online rules;
* :mod:`.engine`: the native decode engine (see docs/engine.md).
"""

from .calibrate import run_calibration, save_static
from .export import export_model, slice_model
from .runtime import GenerationResult, SparseRuntime, generate
from .sparsify import Sparsified, sparsify

__all__ = ["GenerationResult", "SparseRuntime", "Sparsified", "export_model", "generate", "run_calibration",
           "save_static", "slice_model", "sparsify"]
