"""The one model fingerprint: which weights a file, a cache entry or a result belongs to.

:func:`model_fingerprint` identifies a model's structure and weights independently of its dtype
(float32 and bfloat16 copies agree), so a sparsity or predictor file made on one serves the other.
Where rounding matters (cached activations, thresholds, result records), :func:`model_key` adds the
dtype and the device type.
"""

from __future__ import annotations

import torch
from torch import nn

from .io import stable_hash
from .units import unit_map


def model_fingerprint(model: nn.Module) -> str:
    """Unit structure, parameter count and bf16-rounded sums of three tensors, hashed."""
    units = unit_map(model)
    params = list(model.parameters())
    probe = [f"{float(p.detach().to(torch.bfloat16).double().sum()):.9g}"
             for p in (params[0], params[len(params) // 2], params[-1])]
    return stable_hash([units.model_type, units.num_layers, units.mlp_size, units.num_heads,
                        units.num_kv_heads, units.head_dim, sum(p.numel() for p in params), probe])


def model_key(model: nn.Module) -> str:
    """:func:`model_fingerprint` with the dtype and device type: ``<fingerprint>-float32-cpu``."""
    p = next(model.parameters())
    return f"{model_fingerprint(model)}-{str(p.dtype).removeprefix('torch.')}-{p.device.type}"
