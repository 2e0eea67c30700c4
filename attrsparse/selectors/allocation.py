"""Static unit sets at a parameter-weighted activation ratio, from calibrated scores.

Both allocations keep the same **head structure** in every layer: ``kv`` key/value groups with
``g`` query heads each (chosen per layer by score), so key/value parameters are really saved
(a key/value head runs while any query head of its group runs) and the export is a stock model
with ``kv * g`` heads and ``kv`` key/value heads, without padding.

* ``uniform``: whole groups (``g`` = every query head of a group) whose head count is closest to
  ``H * ratio ** head_power`` (ties: fewer parameters); every layer then keeps the top ``k`` MLP
  units by score that fill the rest of its parameter budget, ``k = floor(room / unit_params + 1/2)``
  (explicit rounding). Whole groups because a group's key/value heads cost as much as one of its
  query heads (SmolLM2): on SmolLM2 the calibration loss of 2x3 heads at ratio 0.3 was 3.3 against
  6.9 for 2x2 (4 held-out WikiText-2 windows), and whole groups were best at 0.3, 0.5 and 0.7.
* ``greedy``: non-uniform across layers, chosen on calibration loss, the KL divergence of the
  masked model's next-token distribution from the dense model's, averaged over calibration tokens
  (fidelity to the dense model is what the evaluation measures):

  1. the head structure with the lowest loss among all structures that fit the budget (each with
     the uniform MLP fill);
  2. the MLP budget across layers: a per-layer sensitivity curve (loss when only that layer's MLP
     is cut to each of :data:`LEVELS` of its units, every other layer dense; measured once for all
     ratios) and a greedy removal of ``N / 64`` units at a time from the layer whose curve rises
     least, until the total fits the budget exactly (assumes the layers' losses add up);
  3. a check of the joint loss against the uniform allocation with the same heads: the better
     one is kept and both losses are recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.architectures import model_device
from ..core.hooks import UnitHooks
from ..core.trace import to_ids
from ..core.units import UnitMap, UnitMasks, UnitScores, executed_ratio
from .budget import HEAD_POWER, layer_budget, mlp_fill
from .topk import top_k

ALLOCATIONS = ("uniform", "greedy")
LEVELS = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8)  # MLP fractions of the sensitivity curves


def head_params(units: UnitMap, kv: int, g: int) -> int:
    """Attention parameters of one layer keeping ``kv`` groups of ``g`` query heads."""
    return units.attention_params(kv * g, kv)


def mlp_units_for(units: UnitMap, ratio: float, kv: int, g: int) -> int:
    """MLP units per layer that fill the layer's budget after the heads (in [1, N])."""
    return mlp_fill(units, ratio, kv * g, kv)


def feasible_structures(units: UnitMap, ratio: float) -> list[tuple[int, int]]:
    """Every ``(kv, g)`` whose attention leaves room for at least one MLP unit per layer."""
    budget = layer_budget(units, ratio) - units.mlp_fixed_params - units.mlp_unit_params
    out = [(kv, g) for kv in range(1, units.num_kv_heads + 1) for g in range(1, units.group_size + 1)
           if head_params(units, kv, g) <= budget]
    return out or [(1, 1)]


def power_structure(units: UnitMap, ratio: float, head_power: float = HEAD_POWER) -> tuple[int, int]:
    """Whole groups closest to ``H * ratio ** head_power`` heads (module docstring); partial
    groups only when no whole group fits the budget."""
    target = units.num_heads * ratio ** head_power
    feasible = feasible_structures(units, ratio)
    whole = [s for s in feasible if s[1] == units.group_size] or feasible
    return min(whole, key=lambda s: (abs(s[0] * s[1] - target), head_params(units, *s), -s[0]))


def structured_heads(scores: torch.Tensor, units: UnitMap, kv: int, g: int) -> torch.Tensor:
    """Keep ``g`` heads in each of ``kv`` groups per layer: ``scores [L, H]`` -> bool ``[L, H]``.

    In each group the top-``g`` heads by score; the groups with the largest sum of those.
    """
    grouped = scores.reshape(units.num_layers, units.num_kv_heads, units.group_size).double()
    top, order = torch.sort(grouped, dim=-1, descending=True, stable=True)
    group_value = top[..., :g].sum(-1)  # [L, KV]
    groups = torch.argsort(group_value, dim=-1, descending=True, stable=True)[:, :kv]
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    for l in range(units.num_layers):
        for j in groups[l].tolist():
            keep[l, j, order[l, j, :g]] = True
    return keep.reshape(units.num_layers, units.num_heads)


def top_units(scores: torch.Tensor, counts) -> torch.Tensor:
    """Top ``counts[l]`` entries of each row of ``scores [L, N]`` (ties -> lower index)."""
    return top_k(scores, torch.as_tensor(counts, device=scores.device))


def uniform_masks(scores: UnitScores, ratio: float, units: UnitMap, structure=None,
                  head_power: float = HEAD_POWER) -> UnitMasks:
    """Same head structure and MLP count in every layer (module docstring)."""
    kv, g = structure or power_structure(units, ratio, head_power)
    k = mlp_units_for(units, ratio, kv, g)
    return UnitMasks(top_units(scores.mlp, [k] * units.num_layers), structured_heads(scores.heads, units, kv, g))


class LossProbe:
    """Calibration loss of masked variants: mean KL(dense || masked) over the tokens of a few
    sequences. Variants are batch rows: multipliers ``mlp [R, L, N]``, ``heads [R, L, H]`` (any
    device: they are moved to the model's; the losses come back on the CPU)."""

    def __init__(self, model: nn.Module, sequences: list[torch.Tensor], max_rows: int = 6):
        self.model, self.max_rows = model, max_rows
        self.device = model_device(model)
        self.sequences = [to_ids(s, self.device).reshape(1, -1) for s in sequences]
        self.dense = []  # (p [S, V], sum_v p log p [S]) of the dense model
        with torch.no_grad():
            for s in self.sequences:
                logp = F.log_softmax(model(input_ids=s, use_cache=False).logits[0].float(), -1)
                p = logp.exp()
                self.dense.append((p, (p * logp).sum(-1)))
        self.tokens = sum(s.numel() for s in self.sequences)
        self.passes = 0

    @torch.no_grad()
    def loss(self, mlp: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """``[R]`` mean KL per variant."""
        rows = mlp.shape[0]
        total = torch.zeros(rows, dtype=torch.float64, device="cpu")
        for seq, (p, neg_entropy) in zip(self.sequences, self.dense):
            for start in range(0, rows, self.max_rows):
                sl = slice(start, min(rows, start + self.max_rows))
                r = sl.stop - sl.start
                with UnitHooks(self.model) as hooks:
                    hooks.mlp_mult = mlp[sl].to(self.device, torch.float32)
                    hooks.head_mult = heads[sl].to(self.device, torch.float32)
                    logits = self.model(input_ids=seq.expand(r, -1), use_cache=False).logits.float()
                kl = neg_entropy - (p * F.log_softmax(logits, -1)).sum(-1)  # [r, S]
                total[sl] += kl.sum(-1).double().cpu()
                self.passes += 1
        return total / self.tokens

    def loss_of(self, masks: UnitMasks) -> float:
        return float(self.loss(masks.mlp.unsqueeze(0), masks.heads.unsqueeze(0))[0])


@dataclass
class Sensitivity:
    """``loss [L, len(counts)]``: calibration loss when only layer l keeps ``counts[j]`` MLP units."""

    counts: list[int]
    loss: torch.Tensor

    def at(self, layer: int, k: float) -> float:
        """Loss of layer ``layer`` at ``k`` kept units, linear between measured counts (0 at N)."""
        xs, ys = self.counts, self.loss[layer].tolist()
        if k >= xs[-1]:
            return ys[-1]
        if k <= xs[0]:
            return ys[0]
        j = next(i for i in range(1, len(xs)) if xs[i] >= k)
        w = (k - xs[j - 1]) / (xs[j] - xs[j - 1])
        return ys[j - 1] * (1 - w) + ys[j] * w


def mlp_sensitivity(probe: LossProbe, scores: UnitScores, units: UnitMap, levels=LEVELS,
                    progress=None) -> Sensitivity:
    """Per-layer sensitivity curves of the MLP with every head kept (module docstring)."""
    n, L = units.mlp_size, units.num_layers
    counts = sorted({max(1, round(f * n)) for f in levels}) + [n]
    rank_masks = torch.stack([top_units(scores.mlp, [k] * L) for k in counts[:-1]])  # [J, L, N]
    heads = torch.ones(len(counts) - 1, L, units.num_heads, device=scores.mlp.device)
    loss = torch.zeros(L, len(counts), dtype=torch.float64, device="cpu")
    for l in range(L):
        mlp = torch.ones(len(counts) - 1, L, n, device=scores.mlp.device)
        mlp[:, l] = rank_masks[:, l].float()
        loss[l, :-1] = probe.loss(mlp, heads)
        if progress is not None:
            progress(l)
    # fewer units never helps on average: make each curve non-increasing in the kept count
    loss = torch.flip(torch.cummax(torch.flip(loss.clamp_min(0), [-1]), -1).values, [-1])
    return Sensitivity(counts, loss)


def greedy_counts(sens: Sensitivity, units: UnitMap, total: int, chunk: int | None = None) -> list[int]:
    """Per-layer MLP counts summing to ``total`` (greedy removal on the sensitivity curves)."""
    n, L = units.mlp_size, units.num_layers
    floor = sens.counts[0]
    if total <= floor * L or total >= n * L:
        base, extra = divmod(min(max(total, L), n * L), L)
        return [base + (1 if l < extra else 0) for l in range(L)]
    chunk = chunk or max(1, n // 64)
    counts = [n] * L
    excess = n * L - total
    while excess > 0:
        costs = []
        for l in range(L):
            step = min(chunk, excess, counts[l] - floor)
            if step <= 0:
                costs.append(math.inf)
                continue
            costs.append((sens.at(l, counts[l] - step) - sens.at(l, counts[l])) / step)
        l = min(range(L), key=lambda i: (costs[i], -counts[i], i))  # ties: the fullest layer
        step = min(chunk, excess, counts[l] - floor)
        counts[l] -= step
        excess -= step
    return counts


def greedy_masks(probe: LossProbe, scores: UnitScores, ratio: float, units: UnitMap,
                 sens: Sensitivity) -> tuple[UnitMasks, dict]:
    """The ``greedy`` allocation and its search record (module docstring)."""
    structures = feasible_structures(units, ratio)
    candidates = [uniform_masks(scores, ratio, units, s) for s in structures]
    losses = probe.loss(torch.stack([c.mlp for c in candidates]).float(),
                        torch.stack([c.heads for c in candidates]).float()).tolist()
    best = min(range(len(structures)), key=lambda i: (losses[i], i))
    kv, g = structures[best]
    uniform = candidates[best]
    attn = head_params(units, kv, g)
    room = units.num_layers * (layer_budget(units, ratio) - attn - units.mlp_fixed_params)
    total = int(min(units.num_layers * units.mlp_size,
                    max(units.num_layers, math.floor(room / units.mlp_unit_params + 0.5))))
    counts = greedy_counts(sens, units, total)
    greedy = UnitMasks(top_units(scores.mlp, counts), uniform.heads)
    greedy_loss = probe.loss_of(greedy)
    use_greedy = greedy_loss <= losses[best]
    record = {
        "heads": {"kv_groups": kv, "heads_per_group": g},
        "structure_losses": {f"{a}x{b}": round(x, 6) for (a, b), x in zip(structures, losses)},
        "uniform_loss": losses[best], "greedy_loss": greedy_loss,
        "chosen": "greedy" if use_greedy else "uniform (greedy was not better on calibration)",
        "kept_mlp_per_layer_greedy": counts,
    }
    return (greedy if use_greedy else uniform), record


def describe_masks(masks: UnitMasks, units: UnitMap) -> dict:
    """Executed ratios and per-layer counts of static masks ``[L, *]``."""
    acc = executed_ratio(masks, units)
    groups = masks.heads.reshape(units.num_layers, units.num_kv_heads, units.group_size)
    return {**{k: v for k, v in acc.as_dict().items() if k != "executed_tokens"},
            "kept_mlp_per_layer": masks.mlp.sum(-1).tolist(),
            "kept_heads_per_layer": masks.heads.sum(-1).tolist(),
            "kept_kv_heads_per_layer": groups.any(-1).sum(-1).tolist()}
