"""The one-way layout: sites, the spec parser and artifact manifests, the sparsify() entry point,
the one budget and top-k rules, and the CLI's list options."""

from __future__ import annotations

import math

import pytest
import torch

from attrsparse import sparsify, unit_map
from attrsparse.cli.args import comma_floats, comma_ints, comma_list
from attrsparse.core.artifacts import MANIFEST, artifact_kind, read_manifest, write_manifest
from attrsparse.core.errors import UserError
from attrsparse.core.masking import apply_masks
from attrsparse.core.sites import SITE_NAMES, site_map
from attrsparse.core.units import UnitMasks
from attrsparse.policies import DensePolicy, make_policy, parse_spec
from attrsparse.selectors.budget import BudgetRule, head_count, mlp_fill
from attrsparse.selectors.topk import top_k, unit_ranks
from conftest import ARCHS, VOCAB


def _ids(n=12, seed=0, batch=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


# -- sites ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_sites_cover_every_decoder_linear_and_the_head(make_tiny, arch):
    model = make_tiny(arch)
    smap = site_map(model)
    layer_linears = {id(m) for block in unit_map(model).layer_modules for m in block.modules()
                     if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2}
    in_sites = {id(m) for layer in smap.layers for s in layer.values() for m in s.modules}
    assert in_sites == layer_linears  # every 2-D weight of a decoder layer belongs to exactly one site
    weights = sum(m.weight.numel() for block in unit_map(model).layer_modules for m in block.modules()
                  if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
    assert smap.decoder_params == weights
    assert set(smap.layers[0]) == set(SITE_NAMES)
    assert smap.lm_head.weight_params == model.get_output_embeddings().weight.numel()
    # the shared inputs: q/k/v read one attn_in site, gate/up one mlp_in site
    assert smap.layers[0]["attn_in"].in_features == smap.layers[0]["mlp_in"].in_features


def test_read_params_counts_kept_columns(make_tiny):
    model = make_tiny("llama")  # hidden 32, MLP 48, 4 heads of 8, 2 kv heads
    smap = site_map(model)
    L = smap.num_layers
    assert float(smap.read_params({})) == smap.decoder_params
    kept = {"mlp_out": torch.full((L,), 24.0)}  # half the down-projection's 48 input columns
    # one down column = 32 weights; 24 columns skipped per layer
    assert float(smap.read_params(kept)) == smap.decoder_params - L * 24 * 32
    kept = {"attn_in": torch.zeros(L)}  # nothing of q, k, v is read: (32 + 16 + 16) * 32 weights
    assert float(smap.read_params(kept)) == smap.decoder_params - L * 32 * 64


def test_units_are_groups_of_sites(make_tiny):
    model = make_tiny("llama")
    units, smap = unit_map(model), site_map(model)
    assert units.down_modules[1] is smap.layers[1]["mlp_out"].modules[0]
    assert units.out_modules[0] is smap.layers[0]["attn_out"].modules[0]
    # an MLP unit: one down column (32) + one gate row and one up row (32 each)
    assert units.mlp_unit_params == smap.layers[0]["mlp_out"].params_per_channel + 2 * 32


# -- one budget rule, one top-k rule ----------------------------------------------------------------

def test_budget_rounds_half_up_by_hand(make_tiny):
    units = unit_map(make_tiny("llama"))  # 4 heads; layer = 4*512 + 2*512 + 48*96 = 7680 params
    assert head_count(units, 0.25, 0.5) == 2  # 4 * 0.5 = 2
    assert head_count(units, 0.5625, 0.5) == 3  # 4 * 0.75 = 3
    # ratio 0.5: budget 3840; 2 heads in 1 group = 1536; room 2304 = 24 units of 96
    assert mlp_fill(units, 0.5, 2, 1) == 24
    # exactly 22.5 units: rounds half up to 23 (Python's round would give 22)
    ratio = (1536 + 22.5 * 96) / 7680
    assert mlp_fill(units, ratio, 2, 1) == 23
    assert BudgetRule(units, ratio, 0.5).mlp_count(torch.tensor([[True, True, False, False]]), (1,)).item() == 23


def test_top_k_ties_go_to_the_lower_index_and_per_row_counts_agree():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert top_k(scores, 2).tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    assert torch.equal(top_k(scores, torch.tensor([2, 2])), top_k(scores, 2))
    assert top_k(scores, torch.tensor([1, 4])).sum(-1).tolist() == [1, 4]
    assert unit_ranks(scores)[0].tolist() == [3, 0, 1, 4, 2]


# -- specs and manifests ------------------------------------------------------------------------

def test_spec_parser(tmp_path, make_tiny):
    assert parse_spec("dense") == ("dense", "dense")
    assert parse_spec("teal") == ("selector", "teal")
    assert parse_spec(f"static:{tmp_path}") == ("static", str(tmp_path))
    with pytest.raises(UserError, match="no attrsparse.json"):
        parse_spec(str(tmp_path))  # a directory says what it holds, or is named with its kind
    write_manifest(tmp_path, "predictor", make_tiny("llama"), "tiny")
    assert parse_spec(str(tmp_path)) == ("predictor", str(tmp_path))
    assert artifact_kind(tmp_path) == "predictor" and read_manifest(tmp_path)["model"]["spec"] == "tiny"
    with pytest.raises(UserError, match="no such file or directory"):
        parse_spec("runs/my-export")
    with pytest.raises(UserError, match="unknown sparsity prefix"):
        parse_spec("weights:x")
    with pytest.raises(UserError, match="did you mean 'teal'"):
        parse_spec("tea")
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        parse_spec(str(tmp_path))
    assert isinstance(make_policy("teal", 1.0), DensePolicy)
    with pytest.raises(UserError, match="needs a ratio"):
        make_policy("teal")


# -- sparsify ---------------------------------------------------------------------------------

def test_sparsify_masks_equal_apply_masks(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    gen = torch.Generator().manual_seed(3)
    masks = UnitMasks(torch.rand(units.num_layers, units.mlp_size, generator=gen) > 0.5,
                      torch.rand(units.num_layers, units.num_heads, generator=gen) > 0.3)
    ids = _ids()
    with apply_masks(model, masks) as handle:
        want = model(input_ids=ids).logits
    with sparsify(model, masks) as sp:
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    assert sp.executed.tokens == handle.executed.tokens and sp.executed.param == handle.executed.param


@pytest.mark.parametrize("spec", ["wina_units", "random", "teal_units"])
def test_sparsify_applies_a_policy_to_plain_calls(make_tiny, spec):
    model = make_tiny("llama")
    calibration = [_ids(16, seed=s)[0] for s in range(4)]
    sp = sparsify(model, spec, 0.5, calibration=calibration)
    ids = _ids(10, seed=9, batch=2)
    out = sp.forward(ids)
    with sp:
        plain = model(input_ids=ids).logits.float()
    assert torch.allclose(plain, out.logits, atol=1e-6)
    assert sp.executed.tokens == 2 * 20  # forward() and the plain call: 2 x 10 tokens each
    assert 0.0 < sp.executed.param < 1.0
    dense = model(input_ids=ids).logits.float()  # outside the block the model is dense again
    assert not torch.allclose(dense, plain, atol=1e-4)


def test_sparsify_oracle_and_calibration_need_what_they_need(make_tiny):
    model = make_tiny("llama")
    sp = sparsify(model, "corrected_gxo", 0.5)
    out = sp.forward(_ids(8))
    assert out.logits.shape[:2] == (1, 8) and math.isfinite(sp.executed.param)
    with pytest.raises(UserError, match="cannot generate"):
        with sp:
            pass
    with pytest.raises(UserError, match="calibrates on text"):
        sparsify(model, "teal_units", 0.5)


# -- the CLI's list options -------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [("0.5,,0.3", "empty item"), ("0.5,0.5", "repeats"),
                                        ("0.5,nan", "finite"), ("0.5,inf", "finite"),
                                        ("0.5,1.5", r"ratio must lie in \(0, 1\], got 1.5"),
                                        ("0.5,x", "numbers")])
def test_bad_ratio_lists_are_refused(text, match):
    with pytest.raises(UserError, match=match):
        comma_floats(text, "--ratios", ratios=True)


def test_lists_parse():
    assert comma_floats("0.5, 0.3", "--ratios", ratios=True) == [0.5, 0.3]
    assert comma_list("a,b", "--x") == ["a", "b"] and comma_list(None, "--x") == []
    assert comma_ints("3,0,7", "--questions") == [3, 0, 7]
    for bad in ("0,0", "1,-2", "1,,2"):
        with pytest.raises(UserError):
            comma_ints(bad, "--questions")
