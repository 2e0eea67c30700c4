"""Weights read per token: the read ratio of every selector, over the sites of the decoder layers.

**read ratio** (what channel rules target and every table reports): weights of the decoder-layer
linears (q, k, v, o, gate, up, down; a low-rank path or predictor included where one runs) read for
a token ÷ all of them, the field's convention (TEAL's "40% sparsity" is over these linears).
**total read ratio** (what speed-ups are set against): the same with the LM head added, read in
full (the embedding lookup reads one row and is not counted). Thresholds make both vary per token:
:class:`ReadRatio` keeps every token's value and reports the mean and the 10th/90th percentiles.

Unit masks (neurons, heads) read what :func:`attrsparse.core.units.layer_param_fractions` counts,
plus what an online rule had to compute before deciding (its decision cost): :func:`unit_read`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .sites import site_map
from .units import UnitMasks, layer_param_fractions, unit_map


@dataclass
class ReadRatio:
    """Per-token read fractions of the decoder linears (``decoder`` weights; ``head`` weights of the
    LM head, read in full)."""

    decoder: int
    head: int
    values: list = field(default_factory=list)  # 1-D float64 tensors

    @classmethod
    def of(cls, model: nn.Module) -> "ReadRatio":
        smap = site_map(model)
        return cls(smap.decoder_params, smap.head_params)

    def add(self, fractions: torch.Tensor) -> "ReadRatio":
        """Add the read fraction of every token in ``fractions`` (any shape; real tokens only)."""
        if fractions.numel():
            self.values.append(fractions.detach().reshape(-1).to("cpu", torch.float64))
        return self

    @property
    def tokens(self) -> int:
        return sum(v.numel() for v in self.values)

    def _all(self) -> torch.Tensor:
        return torch.cat(self.values) if self.values else torch.empty(0, dtype=torch.float64)

    def as_dict(self) -> dict:
        v = self._all()
        if not v.numel():
            return {"read_ratio": None, "read_ratio_p10": None, "read_ratio_p90": None,
                    "total_read_ratio": None, "read_tokens": 0}
        mean = float(v.mean())
        return {"read_ratio": mean, "read_ratio_p10": float(torch.quantile(v, 0.1)),
                "read_ratio_p90": float(torch.quantile(v, 0.9)),
                "total_read_ratio": (mean * self.decoder + self.head) / (self.decoder + self.head),
                "read_tokens": int(v.numel())}


def decision_cost(masks: UnitMasks, units, prepaid: tuple[int, int, bool]) -> torch.Tensor:
    """Per row and layer ``[..., L]`` (masks ``[..., L, *]``): the parameter fraction that the unit
    accounting counts as skipped but an online rule had to run to decide. ``prepaid`` = (parameters
    of a skipped MLP unit still run, of a skipped head, whether every key/value head runs)."""
    mlp_prepaid, head_prepaid, all_kv = prepaid
    mlp, heads = masks.mlp.to(torch.float64), masks.heads.to(torch.float64)
    extra = (units.mlp_size - mlp.sum(-1)) * mlp_prepaid + (units.num_heads - heads.sum(-1)) * head_prepaid
    if all_kv:
        groups = heads.reshape(*heads.shape[:-1], units.num_kv_heads, units.group_size).amax(-1)
        extra = extra + (units.num_kv_heads - groups.sum(-1)) * units.kv_group_params
    return extra / units.layer_params


def unit_read(masks: UnitMasks, model: nn.Module, prepaid: tuple[int, int, bool] | None = None) -> torch.Tensor:
    """Read fraction per row of unit masks ``[..., L, *]`` -> ``[...]``: the executed parameters of
    every layer (:func:`layer_param_fractions`) plus, for an online rule, its :func:`decision_cost`."""
    units = unit_map(model)
    frac = layer_param_fractions(masks.mlp, masks.heads, units)  # [..., L]
    if prepaid is not None:
        frac = frac + decision_cost(masks, units, prepaid)
    return frac.mean(-1)
