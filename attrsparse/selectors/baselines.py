"""Gradient-free baselines from the field, as per-token scores in the same registry.

* ``random``: uniform random scores (fixed seed): the floor every selector must beat.
* ``wina``: WINA (Chen et al., 2025) scores a unit by ``|x_i| * ||W[:, i]||_2``, the input magnitude
  times the norm of the weight column that consumes it (the MLP down-projection column). Heads:
  ``||o_h||_2 * ||W_o[:, h]||_F`` (the head's slice of the output projection). Differences from the
  original: WINA sparsifies the inputs of every linear layer with one global threshold; here it
  scores the paper's units (MLP neurons and heads) and uses the same selection policies as every
  other metric.

In task evaluations (``make_policy``): ``random`` is one seeded random static mask (``k = ceil(r*C)``
units per layer); ``wina`` keeps, per token and layer, the top k units by ``|x_i| * ||W[:, i]||`` of
the live inputs (online; the rule reads the down / output-projection input, so a skipped unit still
ran its gate/up rows: ``prepaid_params``, added back by
:func:`attrsparse.policies.base.with_decision_cost`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.units import UnitMasks, UnitScores, unit_map
from .base import OnlineRule, TopKSelector, register_selector
from .thresholds import prepaid_on_unit_inputs
from .topk import keep_count, select, top_k


class Baseline(TopKSelector):
    """A gradient-free rule of the field (its sweep masks: top-k of its scores)."""

    kind = "baseline"


@register_selector
class RandomScores(Baseline):
    name = "random"
    description = "baseline: uniform random scores (fixed seed)"
    mode = "static"

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        gen = torch.Generator().manual_seed(0)  # on the CPU: the same draws on every device
        device = trace.mlp_x.device
        return UnitScores(torch.rand(trace.mlp_x.shape, generator=gen, device="cpu").to(device),
                          torch.rand(trace.head_x.shape[:-1], generator=gen, device="cpu").to(device))

    def static_masks(self, model, calibration, ratio, seed: int = 0, **_) -> UnitMasks:
        """One seeded random static mask, ``keep_count(ratio, C)`` units per layer."""
        units = unit_map(model)
        gen = torch.Generator().manual_seed(seed)
        scores = UnitScores(torch.rand(units.num_layers, units.mlp_size, generator=gen, device="cpu"),
                            torch.rand(units.num_layers, units.num_heads, generator=gen, device="cpu"))
        masks = select(scores, ratio)
        device = next(model.parameters()).device
        return UnitMasks(masks.mlp.to(device), masks.heads.to(device))


def _input_column_norms(module: nn.Module) -> torch.Tensor:
    """L2 norm of each input column of an ``nn.Linear`` or GPT-2 ``Conv1D``: ``[in_features]``."""
    weight = module.weight.detach().float()
    return weight.norm(dim=0) if isinstance(module, nn.Linear) else weight.norm(dim=1)


@register_selector
class Wina(Baseline):
    name = "wina_units"
    description = "unit-space stand-in for WINA (not the paper's rule): |x| times the norm of the consuming column"
    mode = "online"

    def online_rule(self, model, calibration, ratio) -> "WinaRule":
        return WinaRule(model, ratio)

    def prepaid_params(self, units):
        """The rule reads the down / output-projection input: see :func:`prepaid_on_unit_inputs`."""
        return prepaid_on_unit_inputs(units)

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        units = unit_map(model)
        down = torch.stack([_input_column_norms(m) for m in units.down_modules])  # [L, N]
        out = torch.stack([_input_column_norms(m) for m in units.out_modules])  # [L, H*D]
        head_norm = out.view(units.num_layers, units.num_heads, units.head_dim).norm(dim=-1)  # [L, H]
        return UnitScores(trace.mlp_x.abs() * down, trace.head_x.norm(dim=-1) * head_norm)


class WinaRule(OnlineRule):
    """``wina`` on tasks: per token and layer, top ``keep_count(ratio, C)`` of ``|x_i| * ||W[:, i]||``
    (heads ``||o_h|| * ||W_o[:, h]||_F``) over the live inputs."""

    def __init__(self, model: nn.Module, ratio: float):
        units = unit_map(model)
        self.down = [_input_column_norms(m) for m in units.down_modules]  # [N] each
        self.out = [_input_column_norms(m).view(units.num_heads, units.head_dim).norm(dim=-1)
                    for m in units.out_modules]  # [H] each
        self.k_mlp, self.k_heads = keep_count(ratio, units.mlp_size), keep_count(ratio, units.num_heads)

    def mlp_keep(self, layer, x):
        return top_k(x.detach().abs().float() * self.down[layer], self.k_mlp)

    def head_keep(self, layer, o):
        return top_k(o.detach().float().norm(dim=-1) * self.out[layer], self.k_heads)
