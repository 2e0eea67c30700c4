"""``cats_units``: CATS (Lee et al., 2024, "CATS: Contextually-Aware Thresholding for Sparsity in LLMs") on
the unit masks (no read accounting of its own); the rule with its reads counted is ``cats``
(:mod:`.channels`).

CATS thresholds the gate activation of a gated MLP: neuron i is kept when ``|act(gate_i x)| > t``,
one cut-off per layer read from a histogram of calibration activations at the target sparsity; the
up-projection row and down-projection column of a dropped neuron are skipped (a custom kernel), the
gate projection always runs. Attention is left dense.

Here:

* The statistic ``|act(gate x)|`` is read by a forward hook on the MLP's activation module (the
  ``mlp_act`` path of :mod:`attrsparse.core.architectures`), in the same pass; the keep-mask multiplies
  the down-projection input ``act(gate x) * up x`` (our MLP unit), exactly zeroing the neuron.
* Non-gated MLPs (GPT-2, OPT, Phi-1.5/2) have no gate: the statistic is ``|act(fc1 x)|``, the
  down-projection input itself, and CATS coincides with TEAL's MLP rule.
* One threshold per layer, calibrated on dense WikiText-2 valid activations so that exactly the
  requested fraction exceeds it (as TEAL and CATS both calibrate on dense activations).
* Heads are all kept (CATS does not sparsify attention), so the executed parameter-weighted ratio
  lies above the requested MLP ratio; the accounting reports it as executed. A dropped unit still
  ran its gate row: the policy's ``prepaid_params`` adds that back
  (:func:`attrsparse.policies.base.with_decision_cost`).
* CATS's fine-tuning variant (CATS+FT) is not modelled.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..core.architectures import find_arch, linear_dims
from ..core.units import UnitScores, unit_map
from .base import register_selector
from .thresholds import ThresholdSelector


def activation_modules(model: nn.Module) -> list[nn.Module] | None:
    """Per layer, the activation module of a gated MLP; None for non-gated MLPs."""
    spec = find_arch(model.config.model_type)
    if not spec.mlp_gated:
        return None
    path = spec.mlp_act
    modules = [layer.get_submodule(path) for layer in unit_map(model).layer_modules]
    if len({id(m) for m in modules}) != len(modules):
        raise RuntimeError("the MLP activation module is shared between layers; cannot hook it per layer")
    return modules


@contextmanager
def capture_activations(model: nn.Module) -> Iterator[list[torch.Tensor | None] | None]:
    """During the block, ``acts[l]`` is layer l's last ``act(gate x)`` ``[B, q, N]``
    (None for non-gated MLPs, whose activation output is the down-projection input)."""
    modules = activation_modules(model)
    if modules is None:
        yield None
        return
    acts: list[torch.Tensor | None] = [None] * len(modules)

    def hook(layer):
        def record(module, args, output):
            acts[layer] = output
        return record

    handles = [m.register_forward_hook(hook(l)) for l, m in enumerate(modules)]
    try:
        yield acts
    finally:
        for handle in handles:
            handle.remove()


@register_selector
class Cats(ThresholdSelector):
    name = "cats_units"
    description = ("unit-space CATS (units executed, reads not counted): |act(gate x)| of the MLP above per-layer thresholds calibrated "
                   "on dense WikiText-2 activations; heads dense")
    sparsify_heads = False

    @contextmanager
    def live_state(self, model):
        with capture_activations(model) as acts:
            yield acts

    def mlp_values(self, layer, x, state):
        act = x if state is None else state[layer].view(x.shape)
        return act.detach().abs().float()

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        """``|act(gate x)|`` along the dense label ``[T, L, N]`` (one extra dense pass); heads ones."""
        if activation_modules(model) is None:
            return UnitScores(trace.mlp_x.abs(), torch.ones(trace.head_x.shape[:-1]))
        return super().scores(model, prompt_ids, target_ids, trace, head_reduction, **options)

    def prepaid_params(self, units):
        """A dropped unit still ran its gate row (non-gated: its whole fc1 row); heads all run."""
        spec = find_arch(units.model_type)
        in_f, _, bias = linear_dims(units.layer_modules[0].get_submodule(spec.mlp_in[0]))
        return in_f + int(bias), 0, False
