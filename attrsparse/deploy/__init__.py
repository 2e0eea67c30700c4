"""Deployment: calibrated static masks, sliced stock exports and a sparse decoding runtime.

* :mod:`.calibrate`: :func:`calibrate` (mean per-token scores over calibration text), the sparsity
  directory (:func:`run_calibration`, :func:`load_static_policy`), the ``static_gxo`` selector;
* :mod:`.allocation`: static unit sets at a parameter-weighted ratio (``uniform``, ``greedy``);
* :mod:`.export`: :func:`slice_model` / :func:`export_model`, a physically smaller stock model;
* :mod:`.kernels`: gathered MLP/attention projections (C kernels, ``index_select`` fallback);
* :mod:`.runtime`: :func:`generate`, greedy decoding with a KV cache under static masks or a
  per-token unit chooser (predictors).
"""

from .calibrate import (CalibratedScores, CalibratedStaticPolicy, calibrate, load_static_policy,
                        read_static, run_calibration, static_masks, weights_fingerprint)
from .export import export_model, slice_model
from .runtime import GenerationResult, SparseRuntime, StaticChooser, UnitChooser, generate

__all__ = ["CalibratedScores", "CalibratedStaticPolicy", "GenerationResult", "SparseRuntime",
           "StaticChooser", "UnitChooser", "calibrate", "export_model", "generate", "load_static_policy",
           "read_static", "run_calibration", "slice_model", "static_masks", "weights_fingerprint"]
