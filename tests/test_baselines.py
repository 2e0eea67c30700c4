"""Baseline selectors (random, wina) on tiny models: shapes, determinism, formulas."""

from __future__ import annotations

import pytest
import torch

from attrsparse import UserError, list_metrics, score, select, unit_map

PROMPT = torch.tensor([1, 5, 9, 17])
TARGET = torch.tensor([3, 8, 21, 4])


def test_baselines_are_registered_with_their_kind():
    assert {"random", "wina_units"} <= set(list_metrics("baseline"))


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_baseline_shapes_ratio_and_determinism(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    first = score(model, PROMPT, TARGET, metrics=["random", "wina_units"])
    again = score(model, PROMPT, TARGET, metrics=["random", "wina_units"])
    for metric in ("random", "wina_units"):
        s = first[metric]
        assert s.mlp.shape == (TARGET.numel(), units.num_layers, units.mlp_size)
        assert s.heads.shape == (TARGET.numel(), units.num_layers, units.num_heads)
        assert torch.equal(s.mlp, again[metric].mlp) and torch.equal(s.heads, again[metric].heads)
        masks = select(s, 0.5)
        assert torch.all(masks.mlp.sum(-1) == (units.mlp_size + 1) // 2)


def test_wina_equals_its_formula(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    both = score(model, PROMPT, TARGET, metrics=["magnitude", "wina_units"])
    layer, unit, head = 1, 7, 2
    column = units.down_modules[layer].weight[:, unit].norm()
    expected = both["magnitude"].mlp[:, layer, unit] * column
    torch.testing.assert_close(both["wina_units"].mlp[:, layer, unit], expected)
    sl = slice(head * units.head_dim, (head + 1) * units.head_dim)
    head_norm = units.out_modules[layer].weight[:, sl].norm()
    torch.testing.assert_close(both["wina_units"].heads[:, layer, head],
                               both["magnitude"].heads[:, layer, head] * head_norm)


def test_selectors_are_not_scores(make_tiny):
    with pytest.raises(UserError, match="selector"):
        score(make_tiny("llama"), PROMPT, TARGET, metrics=["progressive_gxo"])
