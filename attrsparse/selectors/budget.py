"""The one budget rule: a layer's parameter budget at a parameter-weighted ratio, split between
heads and MLP units.

* :func:`head_count`: heads favoured by ``ratio ** head_power`` (``head_power = 1``: the paper's
  equal unit ratios; 0.5: SmolLM2 at 0.3 keeps 5 of 9 heads);
* :func:`mlp_fill`: the MLP units that fill the rest of the layer's budget once the heads (and the
  key/value groups they need) are paid for;
* :class:`BudgetRule`: both, per token and layer (heads first, then the MLP given the heads really
  kept): the allocation of ``budget_gxo``/``progressive_gxo``, of the predictor's labels and of its
  chooser at run time.

Rounding is explicit: half up (``floor(x + 1/2)``), never Python's round-half-to-even.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.units import UnitMap, UnitMasks, UnitScores
from .topk import top_k

HEAD_POWER = 0.5  # heads keep ratio ** 0.5 of their units (heads are the bottleneck; see pitfalls)


def layer_budget(units: UnitMap, ratio: float) -> float:
    """Parameters one layer may run at ``ratio``."""
    return ratio * units.layer_params


def head_count(units: UnitMap, ratio: float, head_power: float = HEAD_POWER) -> int:
    """Query heads kept per layer: ``H * ratio ** head_power`` rounded half up, in [1, H]."""
    h = units.num_heads
    return max(1, min(h, math.floor(h * ratio ** head_power + 0.5)))


def mlp_fill(units: UnitMap, ratio: float, n_heads, n_groups):
    """MLP units per layer that fill the budget after ``n_heads`` query heads in ``n_groups``
    key/value groups (ints, or tensors broadcast: then a long tensor), rounded half up, in [1, N]."""
    room = layer_budget(units, ratio) - units.attention_params(n_heads, n_groups) - units.mlp_fixed_params
    if isinstance(room, torch.Tensor):
        return torch.clamp(torch.floor(room / units.mlp_unit_params + 0.5), 1, units.mlp_size).long()
    return int(min(units.mlp_size, max(1, math.floor(room / units.mlp_unit_params + 0.5))))


@dataclass
class BudgetRule:
    """Per token and layer: the top :func:`head_count` heads, then the top :func:`mlp_fill` MLP
    units given the query and key/value heads really kept (two steps, so heads can be chosen
    before attention runs and the MLP before the MLP runs)."""

    units: UnitMap
    ratio: float
    head_power: float = HEAD_POWER

    @property
    def head_keep(self) -> int:
        return head_count(self.units, self.ratio, self.head_power)

    def heads(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [..., H]`` -> keep ``[..., H]`` (bool)."""
        return top_k(logits, self.head_keep)

    def mlp_count(self, heads: torch.Tensor | None, leading: tuple, device=None) -> torch.Tensor:
        """MLP units per row ``[...]`` that fill the layer budget given ``heads [..., H]`` (None:
        the rule's head count, all key/value heads, on ``device``)."""
        u = self.units
        if heads is None:
            return mlp_fill(u, self.ratio, torch.full(leading, self.head_keep, device=device),
                            torch.full(leading, u.num_kv_heads, device=device))
        groups = heads.reshape(*heads.shape[:-1], u.num_kv_heads, u.group_size).any(-1)
        return mlp_fill(u, self.ratio, heads.sum(-1), groups.sum(-1))

    def mlp_budget_table(self) -> torch.Tensor:
        """:meth:`mlp_count` for every head outcome: ``[(H + 1) * (G + 1)]``, entry
        ``nh * (G + 1) + ng`` for ``nh`` heads in ``ng`` key/value groups (the C library's table)."""
        u = self.units
        return mlp_fill(u, self.ratio, torch.arange(u.num_heads + 1, device="cpu").unsqueeze(1),
                        torch.arange(u.num_kv_heads + 1, device="cpu")).reshape(-1)

    def mlp(self, logits: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``logits [..., N]`` -> keep ``[..., N]`` (bool) with :meth:`mlp_count` units per row."""
        return top_k(logits, self.mlp_count(heads, tuple(logits.shape[:-1]), logits.device))

    def masks(self, scores: UnitScores) -> UnitMasks:
        """Both steps on scores ``[..., L, *]``."""
        heads = self.heads(scores.heads)
        return UnitMasks(self.mlp(scores.mlp, heads), heads)
