"""Contextual predictors (Deja Vu / ShadowLLM style): the model and its run-time chooser.

Per layer, two small classifiers read the hidden state entering a block, *after* the block's
norm, i.e. the input of its first projection (``q_proj`` / ``c_attn`` / ``qkv_proj`` for
attention, ``gate_proj`` / ``fc1`` / ``c_fc`` / ``gate_up_proj`` for the MLP; the same tensor a
:class:`~attrsparse.selectors.chooser.UnitChooser` receives), so the choice exists before the work
it skips:

* heads:  ``h [.., d] -> Linear(d, r_h) -> ReLU -> Linear(r_h, H)`` logits;
* MLP:    ``h [.., d] -> Linear(d, r) -> ReLU -> Linear(r, N)`` logits.

Units are ranked by logit and kept by the labels' rule (:class:`~attrsparse.selectors.budget.BudgetRule`:
heads first, then the MLP units that fill the layer's parameter budget), so the executed
parameter-weighted ratio is the requested one up to half an MLP unit per layer.

**Cost**: multiply-adds per token = the predictor's weights (``d*r + r*N`` and ``d*r_h + r_h*H``
per layer) against the dense block's projection weights (attention scores excluded, which makes
the ratio conservative); :meth:`Predictor.cost`. Training is in :mod:`attrsparse.deploy.predictor`,
the file format and the policy in :mod:`attrsparse.policies.predictor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError, check_ratio
from ..core.units import UnitMap, UnitMasks, layer_param_fractions
from .budget import BudgetRule
from .chooser import NativeChoice, UnitChooser

# -- the predictor -------------------------------------------------------------------------------


class LowRankClassifier(nn.Module):
    """``h [.., d] -> Linear(d, r) -> ReLU -> Linear(r, C)``: logits ``[.., C]``."""

    def __init__(self, hidden: int, rank: int, classes: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.up = nn.Linear(rank, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(h)))

    def macs(self) -> int:
        return self.down.weight.numel() + self.up.weight.numel()


class Predictor(nn.Module):
    """Per-layer head and MLP classifiers of one model (see the module docstring).

    ``meta`` holds what the file records (units, ranks, training ratios, calibration, fingerprint).
    """

    def __init__(self, hidden: int, num_layers: int, mlp_size: int, num_heads: int, rank: int = 64,
                 head_rank: int = 32, meta: dict | None = None):
        super().__init__()
        self.hidden, self.num_layers, self.mlp_size, self.num_heads = hidden, num_layers, mlp_size, num_heads
        self.rank, self.head_rank = rank, head_rank
        self.mlp = nn.ModuleList(LowRankClassifier(hidden, rank, mlp_size) for _ in range(num_layers))
        self.heads = nn.ModuleList(LowRankClassifier(hidden, head_rank, num_heads) for _ in range(num_layers))
        self.meta = dict(meta or {})

    @classmethod
    def for_units(cls, units: UnitMap, hidden: int, rank: int = 64, head_rank: int = 32, meta=None) -> "Predictor":
        """An untrained predictor for ``units`` (``meta`` records the units, checked on use)."""
        return cls(hidden, units.num_layers, units.mlp_size, units.num_heads, rank, head_rank,
                   {"units": units.structure(), **(meta or {})})

    def mlp_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., d]`` (input of the MLP's first projection) -> ``[..., N]``."""
        return self.mlp[layer](hidden.float())

    def head_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., d]`` (input of the attention's first projection) -> ``[..., H]``."""
        return self.heads[layer](hidden.float())

    def cost(self, units: UnitMap) -> dict:
        """Multiply-adds per token of the predictors against the dense projections they gate."""
        mlp = self.mlp[0].macs()
        heads = self.heads[0].macs()
        dense_mlp = units.mlp_unit_params * units.mlp_size
        dense_attn = units.head_params * units.num_heads + units.kv_group_params * units.num_kv_heads
        return {"mlp_predictor_macs": mlp, "head_predictor_macs": heads,
                "dense_mlp_macs": dense_mlp, "dense_attention_macs": dense_attn,
                "mlp_cost_ratio": mlp / dense_mlp, "head_cost_ratio": heads / dense_attn,
                "layer_cost_ratio": (mlp + heads) / (dense_mlp + dense_attn),
                "note": "per token and layer; dense attention counts its projections only"}

    def chooser(self, ratio: float, units: UnitMap, layer_ratios=None,
                head_power: float | None = None) -> "PredictorChooser":
        """The chooser at ``ratio`` in every layer, or at ``layer_ratios`` (one per layer, e.g. a
        non-uniform allocation from :func:`layer_ratios_from_masks`; ``ratio`` is then unused).
        Heads keep ``ratio ** head_power`` of a layer's heads (default: the labels' exponent)."""
        head_power = self.meta.get("head_power", 0.5) if head_power is None else float(head_power)
        if head_power < 0:
            raise UserError(f"head power must be >= 0, got {head_power:g}")
        if layer_ratios is None:
            return PredictorChooser(self, BudgetRule(units, check_ratio(ratio), head_power))
        layer_ratios = [check_ratio(r) for r in layer_ratios]
        if len(layer_ratios) != units.num_layers:
            raise UserError(f"{len(layer_ratios)} layer ratios for a model of {units.num_layers} layers")
        return PredictorChooser(self, [BudgetRule(units, r, head_power) for r in layer_ratios])


def layer_ratios_from_masks(masks: UnitMasks, units: UnitMap) -> list[float]:
    """Each layer's parameter-weighted fraction kept by static ``masks`` (``mlp [L, N]``,
    ``heads [L, H]``): a calibrated, possibly non-uniform allocation as per-layer predictor budgets
    whose mean is the masks' executed ratio."""
    frac = layer_param_fractions(masks.mlp.unsqueeze(0), masks.heads.unsqueeze(0), units)[0]
    return [min(1.0, float(f)) for f in frac]


class PredictorChooser(UnitChooser):
    """The runtime's per-layer unit chooser: heads first, then the MLP in the rest of the budget.

    The heads chosen in a layer are remembered until that layer's MLP call, whose token rows they
    size (a call whose rows do not match uses the rule's head count for the budget).
    """

    def __init__(self, predictor: Predictor, rule: BudgetRule | list[BudgetRule]):
        self.predictor = predictor
        self.rules = list(rule) if isinstance(rule, (list, tuple)) else [rule] * predictor.num_layers
        self._heads: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def choose_heads(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        keep = self.rules[layer].heads(self.predictor.head_logits(layer, hidden))
        self._heads[layer] = keep
        return keep

    @torch.no_grad()
    def choose_mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.predictor.mlp_logits(layer, hidden)
        heads = self._heads.pop(layer, None)
        if heads is not None and heads.shape[:-1].numel() == logits.shape[:-1].numel():
            heads = heads.reshape(*logits.shape[:-1], heads.shape[-1])
        else:
            heads = None
        return self.rules[layer].mlp(logits, heads)

    def native(self, kind: str, layer: int) -> NativeChoice:
        """The same choice for one token row, made by the C library (the budget as a table)."""
        net = (self.predictor.mlp if kind == "mlp" else self.predictor.heads)[layer]
        rule = self.rules[layer]
        budget = rule.mlp_budget_table() if kind == "mlp" else torch.tensor([rule.head_keep])
        return NativeChoice(w1=net.down.weight, b1=net.down.bias, w2=net.up.weight, b2=net.up.bias,
                            budget=budget, by_heads=kind == "mlp")

    def cost_params(self) -> int:
        return sum(m.macs() for m in self.predictor.mlp) + sum(m.macs() for m in self.predictor.heads)
