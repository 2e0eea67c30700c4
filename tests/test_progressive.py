"""The progressive_gxo selector and its ablations on tiny models."""

from __future__ import annotations

import pytest
import torch

from attrsparse import unit_map
from attrsparse.core.trace import position_multipliers, trace_gradients
from attrsparse.core.units import UnitScores, executed_ratio, layer_param_fractions
from attrsparse.scores import get_score
from attrsparse.selectors import get_metric, resolve_metric_names
from attrsparse.selectors.progressive import budget_masks

PROMPT = torch.tensor([1, 5, 9, 17])
TARGET = torch.tensor([3, 8, 21, 4, 30])


def context(model):
    return dict(model=model, prompt_ids=PROMPT, target_ids=TARGET, units=unit_map(model),
                trace=trace_gradients(model, PROMPT, TARGET).row(0))


def test_recommended_alias_resolves_to_progressive():
    assert resolve_metric_names(["recommended"]) == ["progressive_gxo"]
    assert resolve_metric_names(["ablation"]) == ["corrected_gxo", "budget_gxo",
                                                  "progressive_uniform_gxo", "progressive_gxo"]


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_budget_masks_meet_the_parameter_budget(make_tiny, ratio):
    model = make_tiny("llama")
    units = unit_map(model)
    torch.manual_seed(0)
    scores = UnitScores(torch.randn(5, units.num_layers, units.mlp_size),
                        torch.randn(5, units.num_layers, units.num_heads))
    masks = budget_masks(scores, ratio, units, head_power=0.5)
    executed = executed_ratio(masks, units)
    # the MLP fills the rest of each layer's budget to within half an MLP unit
    half_unit = 0.5 * units.mlp_unit_params / (units.mlp_params_per_layer + units.attn_params_per_layer)
    assert abs(executed.param - ratio) <= half_unit + 1e-9
    expected_heads = round(units.num_heads * ratio ** 0.5)
    assert torch.all(masks.heads.sum(-1) == expected_heads)


def test_budget_keeps_highest_scores(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    scores = UnitScores(torch.arange(units.mlp_size, dtype=torch.float).expand(2, units.num_layers, -1),
                        torch.arange(units.num_heads, dtype=torch.float).expand(2, units.num_layers, -1))
    masks = budget_masks(scores, 0.5, units, head_power=1.0)
    k = int(masks.mlp[0, 0].sum())
    assert torch.equal(masks.mlp[0, 0], torch.arange(units.mlp_size) >= units.mlp_size - k)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text"])
def test_progressive_shapes_ratios_and_dense_at_one(make_tiny, name):
    model = make_tiny(name)
    ctx = context(model)
    selector = get_metric("progressive_gxo")
    many = selector.masks_for_many(None, [0.3, 0.6, 1.0], **ctx)
    units = ctx["units"]
    for masks, ratio in zip(many, [0.3, 0.6, 1.0]):
        assert masks.mlp.shape == (TARGET.numel(), units.num_layers, units.mlp_size)
        assert masks.heads.shape == (TARGET.numel(), units.num_layers, units.num_heads)
        if ratio == 1.0:
            assert masks.mlp.all() and masks.heads.all()
        else:  # each (token, layer) within half an MLP unit of its budget, unless the heads alone
            # overshoot it (then the MLP keeps its minimum of one unit)
            frac = layer_param_fractions(masks.mlp, masks.heads, units)  # [T, L]
            half_unit = 0.5 * units.mlp_unit_params / (units.mlp_params_per_layer + units.attn_params_per_layer)
            assert bool(((frac <= ratio + half_unit + 1e-9) | (masks.mlp.sum(-1) == 1)).all())
    # one ratio alone gives the same masks as in the batch (rows are independent)
    single = selector.masks_for(None, 0.6, **ctx)
    assert torch.equal(single.mlp, many[1].mlp) and torch.equal(single.heads, many[1].heads)


def test_progressive_rescoring_sees_earlier_masks(make_tiny):
    """Block 2's scores come from a trace with block 1 masked, not from the dense trace."""
    model = make_tiny("gemma3_text")  # 3 layers -> 3 blocks
    ctx = context(model)
    progressive = get_metric("progressive_gxo").masks_for(None, 0.3, **ctx)
    budget_only = get_metric("budget_gxo").masks_for(None, 0.3, **ctx)
    # the first block is chosen from the dense trace in both
    assert torch.equal(progressive.mlp[:, 0], budget_only.mlp[:, 0])
    # re-derive the last block from a trace under the first blocks' masks
    masked = progressive.mlp.clone()
    masked[:, 2:] = True
    heads = progressive.heads.clone()
    heads[:, 2:] = True
    trace = trace_gradients(model, PROMPT, TARGET,
                            mlp_mult=position_multipliers(masked.unsqueeze(0), PROMPT.numel()),
                            head_mult=position_multipliers(heads.unsqueeze(0), PROMPT.numel())).row(0)
    scores = get_score("corrected_gxo").from_trace(trace)
    last = budget_masks(UnitScores(scores.mlp[:, 2:], scores.heads[:, 2:]), 0.3, ctx["units"], 0.5)
    assert torch.equal(last.mlp, progressive.mlp[:, 2:])
    assert torch.equal(last.heads, progressive.heads[:, 2:])
