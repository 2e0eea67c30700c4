"""Gradient-free baselines from the field, as per-token scores in the same registry.

* ``random``: uniform random scores (fixed seed): the floor every selector must beat.
* ``wina``: WINA (Chen et al., 2025) scores a unit by ``|x_i| * ||W[:, i]||_2``, the input magnitude
  times the norm of the weight column that consumes it (the MLP down-projection column). Heads:
  ``||o_h||_2 * ||W_o[:, h]||_F`` (the head's slice of the output projection). Differences from the
  original: WINA sparsifies the inputs of every linear layer with one global threshold; here it
  scores the paper's units (MLP neurons and heads) and uses the same selection policies as every
  other metric.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import unit_map
from ..units import UnitScores
from .base import Metric, register_metric


@register_metric
class RandomScores(Metric):
    name = "random"
    description = "baseline: uniform random scores (fixed seed)"
    kind = "baseline"

    def from_trace(self, trace, head_reduction="sum"):
        gen = torch.Generator().manual_seed(0)
        return UnitScores(torch.rand(trace.mlp_x.shape, generator=gen),
                          torch.rand(trace.head_x.shape[:-1], generator=gen))


def _input_column_norms(module: nn.Module) -> torch.Tensor:
    """L2 norm of each input column of an ``nn.Linear`` or GPT-2 ``Conv1D``: ``[in_features]``."""
    weight = module.weight.detach().float()
    return weight.norm(dim=0) if isinstance(module, nn.Linear) else weight.norm(dim=1)


@register_metric
class Wina(Metric):
    name = "wina"
    description = "baseline (WINA): |x| times the norm of the weight column that consumes it"
    kind = "baseline"

    def from_trace(self, trace, head_reduction="sum"):
        raise NotImplementedError("wina needs the model's weights: use from_model")

    def from_model(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        units = unit_map(model)
        down = torch.stack([_input_column_norms(m) for m in units.down_modules])  # [L, N]
        out = torch.stack([_input_column_norms(m) for m in units.out_modules])  # [L, H*D]
        head_norm = out.view(units.num_layers, units.num_heads, units.head_dim).norm(dim=-1)  # [L, H]
        return UnitScores(trace.mlp_x.abs() * down, trace.head_x.norm(dim=-1) * head_norm)
