"""Integrated Gradients with a zero baseline and the right Riemann rule of the official code.

For unit i with output x_i: ``IG_i = (1/m) * sum_{k=1..m} x_i(alpha_k) dL/dz_i (z = alpha_k x)``,
``alpha_k = k/m``. The importance is ``-IG_i`` (loss increase on removal); completeness:
``sum_i -IG_i -> L(units zeroed) - L(x)`` as m grows.

* ``ig`` (the paper): only one layer's units (MLP or heads) are scaled, every other layer stays
  dense; one set of passes per layer and unit kind.
* ``ig_all_layers`` (faster, not the paper's): all layers' units are scaled together, so one set of
  passes serves every layer. A unit's own output then moves along the path (its inputs are scaled
  too), so ``x_i(alpha)`` is the output before scaling at that alpha; completeness holds for all
  units of all layers jointly: ``sum -IG -> L(all units off) - L(x)``.

Every pass covers all T target tokens at once: the off-diagonal keys/values come from the dense
pass (:class:`~attrsparse.core.attention.KVRecorder`), so scaling position t changes nothing that other
positions see, exactly as in incremental decoding with a dense cache. The m alphas run as batch
rows, ``chunk`` rows at a time.
"""

from __future__ import annotations

import torch

from ..core.architectures import model_device
from ..core.trace import forward_units, record_dense_kv, to_ids
from ..core.units import UnitScores, unit_map
from .base import Score, head_sum, register_score

DEFAULT_STEPS = 20


def alphas(n_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The Riemann points ``[m]``: 1/m, 2/m, ..., 1."""
    return torch.arange(1, n_steps + 1, dtype=torch.float32, device=device) / n_steps


def _grad_sums(model, prompt_ids, target_ids, recorder, layers, kind, n_steps, chunk):
    """Sum over alphas of ``x(alpha) * dL/dz`` at each layer in ``layers`` for units of ``kind``.

    Returns per layer ``[S, N]`` (mlp) or ``[S, H, D]`` (heads) sums over the m alpha rows. With
    one layer scaled, ``x(alpha) = x`` (the dense output); with all layers scaled it moves.
    """
    units = unit_map(model)
    sums = {l: 0.0 for l in layers}
    all_alpha = alphas(n_steps, model_device(model))
    for start in range(0, n_steps, chunk):
        a = all_alpha[start:start + chunk]
        scale = a.view(-1, 1, 1)
        mlp_mult = [None] * units.num_layers
        head_mult = [None] * units.num_layers
        for l in layers:
            (mlp_mult if kind == "mlp" else head_mult)[l] = scale
        (mlp_in, head_in), _, (mlp_g, head_g), _, _ = forward_units(
            model, prompt_ids, target_ids, rows=len(a), mlp_mult=mlp_mult, head_mult=head_mult,
            recorder=recorder, grad_layers=layers)
        grads, inputs = (mlp_g, mlp_in) if kind == "mlp" else (head_g, head_in)
        for l, g in zip(layers, grads):
            shape = (-1,) + (1,) * (g.dim() - 1)
            # dL/dalpha = sum_i g_i * x_i(alpha): x_i(alpha) = captured / alpha is the unit's output
            # before scaling, which moves with alpha when earlier layers are scaled too
            x_alpha = inputs[l].detach().float() / a.view(shape)
            sums[l] = sums[l] + (g.float() * x_alpha).sum(0)
    return sums


def integrated_gradients(model, prompt_ids, target_ids, trace, *, n_steps: int = DEFAULT_STEPS,
                         all_layers: bool = False, head_reduction: str = "sum",
                         chunk: int = 10) -> UnitScores:
    """IG importance ``mlp [T, L, N]``, ``heads [T, L, H]`` (see module docstring)."""
    units = unit_map(model)
    p = to_ids(prompt_ids).numel()
    t = trace.mlp_x.shape[0]
    sl = slice(p - 1, p - 1 + t)
    recorder = record_dense_kv(model, prompt_ids, target_ids)
    layer_groups = [list(range(units.num_layers))] if all_layers else [[l] for l in range(units.num_layers)]
    mlp = torch.zeros_like(trace.mlp_x)
    heads = torch.zeros(*trace.head_x.shape[:-1], device=trace.head_x.device)
    for group in layer_groups:
        for kind in ("mlp", "heads"):
            sums = _grad_sums(model, prompt_ids, target_ids, recorder, group, kind, n_steps, chunk)
            for l in group:
                mean_xg = sums[l][sl] / n_steps
                if kind == "mlp":
                    mlp[:, l] = -mean_xg
                else:
                    heads[:, l] = head_sum(-mean_xg, head_reduction)
    return UnitScores(mlp, heads)


@register_score
class IntegratedGradients(Score):
    name = "ig"
    description = "integrated gradients, zero baseline, one layer scaled at a time (the paper)"
    single_pass = False
    is_ig = True
    all_layers = False

    def from_model(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        return integrated_gradients(model, prompt_ids, target_ids, trace,
                                    n_steps=options.get("ig_steps", DEFAULT_STEPS),
                                    all_layers=self.all_layers, head_reduction=head_reduction)


@register_score
class IntegratedGradientsAllLayers(IntegratedGradients):
    name = "ig_all_layers"
    description = "integrated gradients with all layers scaled together (faster variant)"
    all_layers = True
