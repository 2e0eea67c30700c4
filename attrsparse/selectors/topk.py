"""The one top-k rule, and turning scores into keep-masks at a target activation ratio.

Top-k everywhere in attrsparse is :func:`top_k`: the ``k`` highest entries of each row, ties to
the lower index (a stable descending sort), ``k`` an int or a per-row tensor; :func:`unit_ranks`
gives the same order as ranks (predictor labels store them).

Selection scopes (``select(..., scope=...)``):

* ``per_layer`` (the paper): in every (token, layer) row keep the top ``k = ceil(r * C)`` units,
  MLP and heads separately (C = N or H). Ties are broken by unit index, so exactly k.
* ``global``: per token, keep the top ``ceil(r * L * C)`` units of a kind over all layers at once
  (raw scores compared across layers).
* ``threshold``: one threshold per unit kind over all tokens and layers, set at the score quantile
  that keeps a fraction r (ties at the threshold are kept, so the kept fraction can exceed r).

``ratio`` is a *unit* ratio; ``head_ratio`` overrides it for heads. What was really kept is
measured with :func:`attrsparse.core.units.executed_ratio`.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import UserError, check_ratio
from ..core.units import UnitMasks, UnitScores

SCOPES = ("per_layer", "global", "threshold")


def keep_count(ratio: float, total: int) -> int:
    """Units kept out of ``total`` at ``ratio``: ``ceil(ratio * total)`` (at least 1).

    A tiny tolerance keeps float noise from rounding 0.3 * 10 = 3.0000000000000004 up to 4.
    """
    return max(1, min(total, math.ceil(ratio * total - 1e-9)))


def unit_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry in its row of ``scores [..., C]`` (0 = highest; ties -> lower index)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def top_k(scores: torch.Tensor, k) -> torch.Tensor:
    """Keep-mask of the ``k`` highest entries of each row of ``scores [..., C]`` (ties -> lower
    index); ``k`` is an int or a tensor of per-row counts broadcast to ``scores.shape[:-1]``."""
    if isinstance(k, int):
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask.scatter_(-1, order[..., :k], True)
        return mask
    return unit_ranks(scores) < torch.as_tensor(k, device=scores.device).unsqueeze(-1)


def _per_layer(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    return top_k(scores, keep_count(ratio, scores.shape[-1]))


def _global(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = scores.reshape(*scores.shape[:-2], -1)
    return top_k(flat, keep_count(ratio, flat.shape[-1])).reshape(scores.shape)


def _threshold(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = scores.reshape(-1).float()
    k = keep_count(ratio, flat.numel())
    tau = torch.topk(flat, k).values[-1]
    return scores >= tau


_SCOPE_FNS = {"per_layer": _per_layer, "global": _global, "threshold": _threshold}


def check_scope(scope: str) -> str:
    if scope not in _SCOPE_FNS:
        raise UserError(f"unknown selection scope '{scope}' (the top-k scope, formerly called policy; "
                        f"available: {', '.join(SCOPES)})")
    return scope


def select(scores: UnitScores, ratio: float, scope: str = "per_layer",
           head_ratio: float | None = None) -> UnitMasks:
    """Keep-masks with the shapes of ``scores`` (``mlp [..., L, N]``, ``heads [..., L, H]``)."""
    ratio = check_ratio(ratio)
    head_ratio = ratio if head_ratio is None else check_ratio(head_ratio, "head_ratio")
    fn = _SCOPE_FNS[check_scope(scope)]
    return UnitMasks(fn(scores.mlp, ratio), fn(scores.heads, head_ratio))
