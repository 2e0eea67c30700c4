"""``wanda``: Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for LLMs"), structured.

Wanda prunes individual weights, unstructured or N:M, scoring weight ``W[j, i]`` by
``|W[j, i]| * ||X_i||_2`` (``X_i``: input channel i over the calibration tokens) and comparing
weights within each output row; the pruned weights are removed for good (a static mask).

Here the mask is static too, but structured per unit, and the score of a unit is the sum of the
Wanda scores of the weights it removes *from the projection that consumes it*:

* MLP unit i of layer l: ``||X_i||_2 * sum_j |W_down[j, i]|`` (X = down-projection input);
* head h: ``sum_{d in h} ||X_d||_2 * sum_j |W_o[j, d]|`` (X = output-projection input).

The gate/up (or fc1) rows and query/key/value rows that go with a unit are not scored (their input,
the normed hidden state, is shared by every unit). Units are compared within each layer: top-k per
layer at the ratio (``k = ceil(ratio * N)``, the paper's rule), every position, every token. The
norms come from dense passes over WikiText-2 valid windows (128 tokens x 16, cached per model);
in the oracle sweep without a reachable tokenizer they come from the question's own target tokens
(a per-question static mask, said once on stderr).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import UserError
from ..core.fingerprint import model_key
from ..core.hooks import UnitHooks
from ..core.trace import to_ids
from ..core.units import UnitMasks, UnitScores, unit_map
from .base import TopKSelector, register_selector
from .thresholds import calibration_hash, note_once, resolve_calibration
from .topk import select

_NORMS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def input_norms(model: nn.Module, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``||X_j||_2`` over every calibration token: down inputs ``[L, N]``, output-projection inputs
    ``[L, H, D]`` (dense passes, one sequence at a time; cached per model and calibration)."""
    key = (model_key(model), calibration_hash(sequences))
    if key in _NORMS:
        return _NORMS[key]
    units = unit_map(model)
    device = next(model.parameters()).device
    mlp = torch.zeros(units.num_layers, units.mlp_size, dtype=torch.float64, device="cpu")  # sums on the host
    heads = torch.zeros(units.num_layers, units.num_heads, units.head_dim, dtype=torch.float64, device="cpu")
    with torch.no_grad(), UnitHooks(model, capture=True) as hooks:
        for seq in sequences:
            model(input_ids=to_ids(seq, device).view(1, -1), use_cache=False)
            for l in range(units.num_layers):
                mlp[l] += hooks.mlp_inputs[l].double().pow(2).sum((0, 1)).cpu()
                heads[l] += hooks.head_inputs[l].double().pow(2).sum((0, 1)).cpu()
    _NORMS[key] = (mlp.sqrt().float(), heads.sqrt().float())
    return _NORMS[key]


def column_abs_sums(module: nn.Module) -> torch.Tensor:
    """``sum_j |W[j, i]|`` for each input channel i of an ``nn.Linear`` or GPT-2 ``Conv1D``: ``[in]``."""
    weight = module.weight.detach().float().abs()
    return weight.sum(0) if isinstance(module, nn.Linear) else weight.sum(1)


def wanda_scores(model: nn.Module, mlp_norm: torch.Tensor, head_norm: torch.Tensor) -> UnitScores:
    """Static unit scores ``mlp [L, N]``, ``heads [L, H]`` from input norms (module docstring)."""
    units = unit_map(model)
    down = torch.stack([column_abs_sums(m).cpu() for m in units.down_modules])  # [L, N]
    out = torch.stack([column_abs_sums(m).cpu() for m in units.out_modules])  # [L, H*D]
    out = out.view(units.num_layers, units.num_heads, units.head_dim)
    return UnitScores(mlp_norm * down, (head_norm * out).sum(-1))


@register_selector
class Wanda(TopKSelector):
    name = "wanda"
    description = ("baseline (Wanda, structured, static): sum over the unit's down/o-proj weights of "
                   "|W| times the calibration input norm; top-k per layer")
    kind = "baseline"
    mode = "static"
    needs_calibration = True

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        """The static scores repeated at each of the T target tokens: ``[T, L, N]``, ``[T, L, H]``."""
        sequences = resolve_calibration(model, options)
        if sequences is None:
            note_once("fallback-wanda", "wanda: no tokenizer reachable; input norms are taken over "
                                        "each question's own target tokens")
            norms = trace.mlp_x.norm(dim=0), trace.head_x.norm(dim=0)
        else:
            norms = input_norms(model, sequences)
        static = wanda_scores(model, *norms)
        t = trace.mlp_x.shape[0]
        return UnitScores(static.mlp.expand(t, *static.mlp.shape), static.heads.expand(t, *static.heads.shape))

    def static_masks(self, model, calibration, ratio, scope: str = "per_layer", **_) -> UnitMasks:
        """One structured Wanda mask ``[L, *]`` from calibration input norms."""
        if not calibration:
            raise UserError("wanda: the static mask needs calibration sequences")
        masks = select(wanda_scores(model, *input_norms(model, list(calibration))), ratio, scope)
        device = next(model.parameters()).device
        return UnitMasks(masks.mlp.to(device), masks.heads.to(device))
