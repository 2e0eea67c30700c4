"""Containers for per-unit tensors (scores, masks) and honest activation-ratio accounting.

Shapes: ``mlp`` is ``[..., L, N]`` and ``heads`` is ``[..., L, H]``; the leading dims are usually
``T`` (one row per generated token), sometimes ``B, T`` (batched rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .architectures import UnitMap


@dataclass
class UnitScores:
    """Importance of every unit: higher = keep. ``mlp [T, L, N]``, ``heads [T, L, H]``."""

    mlp: torch.Tensor
    heads: torch.Tensor

    def map(self, fn) -> "UnitScores":
        return UnitScores(fn(self.mlp), fn(self.heads))


@dataclass
class UnitMasks:
    """Boolean keep-masks. ``mlp [..., L, N]``, ``heads [..., L, H]``; True = unit is computed.

    ``[L, *]`` is a static mask (every position), ``[T, L, *]`` a per-token schedule (row t is used
    for generated token t), ``[B, T, L, *]`` a batched schedule (one schedule per batch row).
    """

    mlp: torch.Tensor
    heads: torch.Tensor

    @classmethod
    def dense(cls, units: UnitMap, *leading: int, device: torch.device | str = "cpu") -> "UnitMasks":
        """All-True masks ``[*leading, L, *]`` on ``device``."""
        return cls(torch.ones(*leading, units.num_layers, units.mlp_size, dtype=torch.bool, device=device),
                   torch.ones(*leading, units.num_layers, units.num_heads, dtype=torch.bool, device=device))

    def __getitem__(self, index) -> "UnitMasks":
        return UnitMasks(self.mlp[index], self.heads[index])

    @staticmethod
    def stack(masks: list["UnitMasks"], dim: int = 0) -> "UnitMasks":
        return UnitMasks(torch.stack([m.mlp for m in masks], dim),
                         torch.stack([m.heads for m in masks], dim))


@dataclass
class ExecutedRatio:
    """Activation ratio that was really executed, accumulated over token rows.

    ``param`` weighs attention and MLP by their real parameter counts: kept MLP units times the
    parameters of one unit, kept query heads times (query rows + output columns), key/value heads
    that at least one kept query head still needs times (key + value rows), plus the always-run
    biases; divided by all attention and MLP parameters. Embeddings and the LM head are outside
    the ratio (as in the paper) and reported separately by :meth:`UnitMap.summary`.
    """

    tokens: int = 0
    sum_param: float = 0.0
    sum_mlp: float = 0.0
    sum_heads: float = 0.0
    sum_kv: float = 0.0
    per_layer_param: list = field(default_factory=list)  # sums per layer

    @property
    def param(self) -> float:
        return self.sum_param / self.tokens if self.tokens else float("nan")

    @property
    def mlp(self) -> float:
        return self.sum_mlp / self.tokens if self.tokens else float("nan")

    @property
    def heads(self) -> float:
        return self.sum_heads / self.tokens if self.tokens else float("nan")

    @property
    def kv_heads(self) -> float:
        return self.sum_kv / self.tokens if self.tokens else float("nan")

    def add(self, other: "ExecutedRatio") -> "ExecutedRatio":
        layers = [a + b for a, b in zip(self.per_layer_param, other.per_layer_param)] \
            if self.per_layer_param else list(other.per_layer_param)
        return ExecutedRatio(self.tokens + other.tokens, self.sum_param + other.sum_param,
                             self.sum_mlp + other.sum_mlp, self.sum_heads + other.sum_heads,
                             self.sum_kv + other.sum_kv, layers)

    def as_dict(self) -> dict:
        return {"executed_ratio": self.param, "executed_ratio_mlp": self.mlp,
                "executed_ratio_heads": self.heads, "executed_ratio_kv_heads": self.kv_heads,
                "executed_tokens": self.tokens}


def layer_param_fractions(mlp: torch.Tensor, heads: torch.Tensor, units: UnitMap) -> torch.Tensor:
    """Executed parameter fraction per row and layer: ``[..., L]`` from masks ``[..., L, *]``."""
    mlp, heads = mlp.to(torch.float64), heads.to(torch.float64)
    kept_mlp = mlp.sum(-1)
    kept_heads = heads.sum(-1)
    groups = heads.reshape(*heads.shape[:-1], units.num_kv_heads, units.group_size)
    kept_kv = groups.amax(-1).sum(-1)
    return (units.mlp_params(kept_mlp) + units.attention_params(kept_heads, kept_kv)) / units.layer_params


def executed_ratio(masks: UnitMasks, units: UnitMap) -> ExecutedRatio:
    """Account masks ``[..., L, *]``: every leading index is one executed token row."""
    mlp, heads = masks.mlp, masks.heads
    if mlp.dim() == 2:
        mlp, heads = mlp.unsqueeze(0), heads.unsqueeze(0)
    mlp = mlp.reshape(-1, *mlp.shape[-2:])
    heads = heads.reshape(-1, *heads.shape[-2:])
    layer_frac = layer_param_fractions(mlp, heads, units)  # [R, L]
    groups = heads.to(torch.float64).reshape(heads.shape[0], units.num_layers,
                                             units.num_kv_heads, units.group_size).amax(-1)
    rows = mlp.shape[0]
    return ExecutedRatio(
        tokens=rows,
        sum_param=float(layer_frac.mean(-1).sum()),
        sum_mlp=float(mlp.to(torch.float64).mean((-1, -2)).sum()),
        sum_heads=float(heads.to(torch.float64).mean((-1, -2)).sum()),
        sum_kv=float(groups.mean((-1, -2)).sum()),
        per_layer_param=layer_frac.sum(0).tolist(),
    )
