"""Parameter-weighted activation ratio (paper-notes §6) against counts taken from weight shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS
from torch import nn

from attrsparse import UnitMasks, executed_ratio, unit_map
from attrsparse.core.architectures import find_arch


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _weight_used(module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    """(used, total) parameter counts of a Linear/Conv1D given which output rows / input columns
    run (None = all), in the Linear convention ``weight[out, in]``; the bias follows the rows."""
    w = module.weight if isinstance(module, nn.Linear) else module.weight.T  # Conv1D is [in, out]
    out_f, in_f = w.shape
    rows = torch.ones(out_f, dtype=torch.bool) if rows is None else rows
    cols = torch.ones(in_f, dtype=torch.bool) if cols is None else cols
    assert rows.numel() == out_f and cols.numel() == in_f
    used = int(rows.sum()) * int(cols.sum())
    total = w.numel()
    if getattr(module, "bias", None) is not None:
        used += int(rows.sum())
        total += module.bias.numel()
    return used, total


def count_by_shapes(model, mlp_keep: torch.Tensor, head_keep: torch.Tensor):
    """Executed and total attention+MLP parameters for one token row ``[L, N]``, ``[L, H]``,
    element by element from the real weight matrices (not from UnitMap's per-unit numbers)."""
    spec = find_arch(model.config.model_type)
    layers = list(_get(model, spec.layers))
    h = model.config.num_attention_heads if hasattr(model.config, "num_attention_heads") else model.config.n_head
    kv = getattr(model.config, "num_key_value_heads", None) or h
    used_all = total_all = 0
    for layer, mk, hk in zip(layers, mlp_keep, head_keep):
        out = _get(layer, spec.attn_out)
        d = (out.weight.shape[1] if isinstance(out, nn.Linear) else out.weight.shape[0]) // h
        q_rows = hk.repeat_interleave(d)
        kv_rows = hk.view(kv, h // kv).any(-1).repeat_interleave(d)  # a k/v head runs if any of its group does
        parts = []
        for path in spec.mlp_in:  # output rows i (and N + i for a fused gate_up)
            mod = _get(layer, path)
            n_out = mod.weight.shape[0] if isinstance(mod, nn.Linear) else mod.weight.shape[1]
            parts.append((mod, mk.repeat(n_out // mk.numel()), None))
        parts.append((_get(layer, spec.mlp_down), None, mk))
        if len(spec.attn_qkv) == 3:
            q, k, v = (_get(layer, p) for p in spec.attn_qkv)
            parts += [(q, q_rows, None), (k, kv_rows, None), (v, kv_rows, None)]
        else:  # fused [q | k | v] rows
            parts.append((_get(layer, spec.attn_qkv[0]), torch.cat([q_rows, kv_rows, kv_rows]), None))
        parts.append((out, None, q_rows))
        for mod, rows, cols in parts:
            used, total = _weight_used(mod, rows, cols)
            used_all += used
            total_all += total
    return used_all, total_all


def test_hand_checked_gqa_example(make_tiny):
    """Llama, hidden 32, MLP 48, 4 query heads of dim 8, 2 k/v heads, no biases. Per layer:
    MLP unit = gate row 32 + up row 32 + down column 32 = 96; MLP 48 * 96 = 4608;
    q 32x32 = 1024, k 16x32 = 512, v 512, o 32x32 = 1024 -> attention 3072; layer 7680.
    Layer 0 keeps 12 MLP units and head 0 (k/v group 0 only):
        12*96 + (q 8*32 + o 32*8) + (k 8*32 + v 8*32) = 1152 + 512 + 512 = 2176.
    Layer 1 keeps all MLP units and heads 1, 2 (both k/v groups):
        4608 + 2*512 + 2*512 = 6656.
    Ratio = (2176 + 6656) / (2 * 7680) = 0.575."""
    model = make_tiny("llama")
    units = unit_map(model)
    assert (units.mlp_unit_params, units.head_params, units.kv_group_params) == (96, 512, 512)
    masks = UnitMasks.dense(units)
    masks.mlp[0, 12:] = False
    masks.heads[0] = torch.tensor([True, False, False, False])
    masks.heads[1] = torch.tensor([False, True, True, False])
    got = executed_ratio(masks, units)
    assert got.param == pytest.approx(0.575, abs=1e-12)
    assert got.mlp == pytest.approx((12 + 48) / 96)
    assert got.heads == pytest.approx(3 / 8)
    assert got.kv_heads == pytest.approx(3 / 4)
    assert got.tokens == 1
    assert got.per_layer_param == pytest.approx([2176 / 7680, 6656 / 7680])
    used, total = count_by_shapes(model, masks.mlp, masks.heads)
    assert (used, total) == (2176 + 6656, 2 * 7680)


@pytest.mark.parametrize("name", ARCHS)
def test_executed_ratio_equals_weight_shape_count(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    gen = torch.Generator().manual_seed(3)
    rows = []
    for t in range(4):
        mlp = torch.rand(units.num_layers, units.mlp_size, generator=gen) < 0.4
        heads = torch.rand(units.num_layers, units.num_heads, generator=gen) < 0.5
        if t == 1:
            heads[:] = False  # no head at all: only the output bias still runs
            mlp[0] = False
        if t == 2:
            heads[:] = True
        rows.append(UnitMasks(mlp, heads))
    masks = UnitMasks.stack(rows)
    got = executed_ratio(masks, units)
    fractions = []
    for r in rows:
        used, total = count_by_shapes(model, r.mlp, r.heads)
        fractions.append(used / total)
    assert total == units.maskable_params
    assert got.tokens == 4
    assert got.param == pytest.approx(sum(fractions) / 4, abs=1e-12)
    assert executed_ratio(rows[1], units).param == pytest.approx(fractions[1], abs=1e-12)
    assert executed_ratio(UnitMasks.dense(units), units).param == pytest.approx(1.0)
    assert executed_ratio(UnitMasks.dense(units, 3), units).tokens == 3


def _numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_summary_equals_parameter_numel(make_tiny, name):
    model = make_tiny(name)
    spec = find_arch(model.config.model_type)
    layers = list(_get(model, spec.layers))
    attn = [_get(l, p) for l in layers for p in spec.attn_qkv + (spec.attn_out,)]
    mlp = [_get(l, p) for l in layers for p in spec.mlp_in + (spec.mlp_down,)]
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    summary = unit_map(model).summary()
    assert summary["attention_params"] == _numel(attn)
    assert summary["mlp_params"] == _numel(mlp)
    assert summary["total_params"] == total
    assert summary["other_params"] == total - _numel(attn) - _numel(mlp)
    assert summary["share_attention"] + summary["share_mlp"] + summary["share_other"] == pytest.approx(1.0)
    assert summary["attention_share_of_maskable"] == pytest.approx(_numel(attn) / (_numel(attn) + _numel(mlp)))
    assert summary["num_layers"] == len(layers)
    assert summary["mlp_units_per_layer"] == 48
    assert summary["heads_per_layer"] == 4


def test_summary_hand_numbers_llama_and_gpt2(make_tiny):
    llama = unit_map(make_tiny("llama")).summary()
    # 2 layers x (q 1024 + k 512 + v 512 + o 1024) and 2 x 3 x 32 x 48
    assert llama["attention_params"] == 2 * 3072 and llama["mlp_params"] == 2 * 4608
    assert llama["kv_heads_per_layer"] == 2 and llama["head_dim"] == 8
    gpt2 = unit_map(make_tiny("gpt2")).summary()
    # c_attn 32x96 + 96, c_proj 32x32 + 32; c_fc 32x48 + 48, c_proj 48x32 + 32
    assert gpt2["attention_params"] == 2 * (32 * 96 + 96 + 32 * 32 + 32)
    assert gpt2["mlp_params"] == 2 * (32 * 48 + 48 + 48 * 32 + 32)
    assert gpt2["params_per_mlp_unit"] == 32 + 1 + 32  # c_fc column + bias, c_proj row
    assert gpt2["params_per_head"] == (8 * 32 + 8) + 8 * 32  # q cols + q bias, c_proj rows
    assert gpt2["params_per_kv_head"] == 2 * (8 * 32 + 8)
