"""The field's calibrated baselines (teal, cats, wanda) and the task policies of random and wina,
on tiny in-code models: exact thresholds, hand-computed statistics and scores, shapes, determinism,
kept fractions on the calibration data, ratio 1.0 = dense, masks = zeroed weights, the sweep."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS

from attrsparse import capture_units, get_metric, list_metrics, trace_gradients, unit_map
from attrsparse.cli.main import main
from attrsparse.core.hooks import UnitHooks
from attrsparse.core.units import UnitMasks, executed_ratio, zero_head_, zero_mlp_unit_
from attrsparse.policies import DensePolicy, make_policy
from attrsparse.selectors import thresholds as calibrated
from attrsparse.selectors.thresholds import decision_cost_fraction, exact_thresholds, resolve_calibration
from attrsparse.selectors.topk import keep_count

PROMPT = torch.tensor([1, 5, 9, 17])
TARGET = torch.tensor([3, 8, 21, 4])
FIELD = ("teal_units", "cats_units", "wanda")


def calibration(n: int = 4, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (length,), generator=gen) for _ in range(n)]


def prepared(name: str, ratio: float, model, calib):
    policy = make_policy(name, ratio)
    policy.prepare(model, calib)
    return policy


# -- registry and CLI ---------------------------------------------------------------------------
def test_registered_as_baselines_and_listed_by_the_cli(capsys):
    assert set(FIELD) | {"random", "wina_units"} <= set(list_metrics("baseline"))
    assert main(["selectors"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert set(FIELD) <= listed


# -- exact thresholds ---------------------------------------------------------------------------
def test_exact_thresholds_by_hand():
    batches = lambda: [[torch.tensor([0.1, 0.5]), torch.tensor([0.0, 0.0])],  # noqa: E731
                       [torch.tensor([0.2, 0.9, 0.3]), torch.tensor([0.0, 1.0, 2.0])]]
    taus = exact_thresholds(batches, [0.4, 1.0])
    # stream 0: k = ceil(0.4 * 5) = 2 -> tau = 3rd largest = 0.3, keeps {0.5, 0.9}
    # stream 1: k = 2 -> tau = 3rd largest = 0.0 (two zeros tie: only 1.0 and 2.0 exceed it)
    assert taus[0.4].tolist() == pytest.approx([0.3, 0.0])
    assert taus[1.0].tolist() == [float("-inf")] * 2


def test_exact_thresholds_keep_exactly_k_over_many_magnitudes():
    gen = torch.Generator().manual_seed(3)
    chunks = [torch.exp(torch.randn(20_000, generator=gen) * 6) * (torch.rand(20_000, generator=gen) > 0.1)
              for _ in range(3)]  # spans ~2^-30..2^30, 10% exact zeros
    values = torch.cat(chunks)
    for ratio in (0.05, 0.37, 0.5, 0.93):
        tau = exact_thresholds(lambda: [[c] for c in chunks], [ratio])[ratio][0]
        # exactly k, except when the (k+1)-th largest is one of the tied zeros: then every non-zero
        expected = min(keep_count(ratio, values.numel()), int((values > 0).sum()))
        assert int((values > tau).sum()) == expected


# -- statistics and scores by hand --------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "phi3", "gpt2"])
def test_cats_statistic_is_the_gate_activation(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    layer = 1
    block = units.layer_modules[layer]
    mlp_module = block.mlp
    seen = {}
    handle = mlp_module.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
    trace = trace_gradients(model, PROMPT, TARGET).row(0)
    try:
        scores = get_metric("cats_units").scores(model, PROMPT, TARGET, trace)
    finally:
        handle.remove()
    h = seen["h"][0, PROMPT.numel() - 1:]  # [T, hidden], the MLP input at the target positions
    if name == "llama":
        expected = F.silu(mlp_module.gate_proj(h)).abs()
    elif name == "phi3":
        gate, _ = mlp_module.gate_up_proj(h).chunk(2, dim=-1)
        expected = mlp_module.activation_fn(gate).abs()
    else:  # not gated: the statistic is the down-projection input (the MLP unit itself)
        expected = trace.mlp_x[:, layer].abs()
    torch.testing.assert_close(scores.mlp[:, layer], expected, rtol=1e-5, atol=1e-6)
    assert torch.all(scores.heads == 1)  # CATS leaves attention dense


def test_teal_statistic_is_magnitude(make_tiny):
    model = make_tiny("qwen2")
    trace = trace_gradients(model, PROMPT, TARGET).row(0)
    teal = get_metric("teal_units").scores(model, PROMPT, TARGET, trace)
    dense_pass = get_metric("teal_units").values(model, torch.cat([PROMPT, TARGET[:-1]]).unsqueeze(0))
    torch.testing.assert_close(teal.mlp, trace.mlp_x.abs())
    torch.testing.assert_close(teal.heads, trace.head_x.norm(dim=-1))
    torch.testing.assert_close(dense_pass.mlp[0, PROMPT.numel() - 1:], teal.mlp, rtol=1e-5, atol=1e-6)


def test_wanda_scores_by_hand(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    calib = calibration()
    trace = trace_gradients(model, PROMPT, TARGET).row(0)
    scores = get_metric("wanda").scores(model, PROMPT, TARGET, trace, calibration=calib)
    with torch.no_grad(), capture_units(model) as cap:
        inputs_mlp, inputs_heads = [], []
        for seq in calib:
            model(input_ids=seq[None])
            inputs_mlp.append(cap.mlp_inputs[1][0])
            inputs_heads.append(cap.head_inputs[1][0])
    x = torch.cat(inputs_mlp)  # [tokens, N] of layer 1
    o = torch.cat(inputs_heads)  # [tokens, H, D]
    unit, head = 7, 2
    down = units.down_modules[1].weight  # [hidden, N]
    expected_unit = x[:, unit].norm() * down[:, unit].abs().sum()
    sl = slice(head * units.head_dim, (head + 1) * units.head_dim)
    out_w = units.out_modules[1].weight[:, sl].abs().sum(0)  # [D]
    expected_head = (o[:, head].norm(dim=0) * out_w).sum()
    assert scores.mlp.shape == (TARGET.numel(), units.num_layers, units.mlp_size)
    torch.testing.assert_close(scores.mlp[:, 1, unit], expected_unit.expand(TARGET.numel()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.heads[:, 1, head], expected_head.expand(TARGET.numel()), rtol=1e-5, atol=1e-6)


# -- shapes, determinism, kept fractions --------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_determinism_on_every_architecture(make_tiny, arch):
    model = make_tiny(arch)
    units = unit_map(model)
    calib = calibration()
    trace = trace_gradients(model, PROMPT, TARGET).row(0)
    ids = torch.stack(calib[:2])
    t, layers = TARGET.numel(), units.num_layers
    for name in FIELD:
        metric = get_metric(name)
        scores = metric.scores(model, PROMPT, TARGET, trace, calibration=calib)
        again = metric.scores(model, PROMPT, TARGET, trace, calibration=calib)
        assert scores.mlp.shape == (t, layers, units.mlp_size)
        assert scores.heads.shape == (t, layers, units.num_heads)
        context = dict(model=model, trace=trace, units=units, calibration=calib)
        masks = metric.masks_for(scores, 0.5, **context)
        assert masks.mlp.shape == scores.mlp.shape and masks.heads.shape == scores.heads.shape
        assert torch.equal(masks.mlp, metric.masks_for(again, 0.5, **context).mlp)
        out = prepared(name, 0.5, model, calib).forward(model, ids)
        repeat = prepared(name, 0.5, model, calib).forward(model, ids)
        assert out.logits.shape == (2, ids.shape[1], model.config.vocab_size)
        assert out.masks.mlp.shape == (2, ids.shape[1], layers, units.mlp_size)
        assert out.masks.heads.shape == (2, ids.shape[1], layers, units.num_heads)
        assert torch.equal(out.logits, repeat.logits) and torch.equal(out.masks.mlp, repeat.masks.mlp)


@pytest.mark.parametrize("name", ["teal_units", "cats_units"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_thresholds_keep_the_ratio_on_the_calibration_data(make_tiny, arch, name):
    model = make_tiny(arch)
    units = unit_map(model)
    calib = calibration()
    ratio = 0.3
    metric = get_metric(name)
    policy = prepared(name, ratio, model, calib)
    dense = [metric.values(model, seq[None]) for seq in calib]
    mlp = torch.cat([d.mlp[0] for d in dense])  # [tokens, L, N]
    heads = torch.cat([d.heads[0] for d in dense])
    tokens = mlp.shape[0]
    for layer in range(units.num_layers):
        kept = int((mlp[:, layer] > policy.rule.tau[layer]).sum())
        assert kept == keep_count(ratio, tokens * units.mlp_size)
        if name == "teal_units":
            kept = int((heads[:, layer] > policy.rule.tau[units.num_layers + layer]).sum())
            assert kept == keep_count(ratio, tokens * units.num_heads)
    # online, the first layer's inputs do not depend on any mask: same kept fraction there
    online = policy.forward(model, torch.stack(calib)).masks
    first = online.heads[:, :, 0] if name == "teal_units" else online.mlp[:, :, 0]  # cats: heads dense
    assert int(first.sum()) == keep_count(ratio, first.numel())
    if name == "cats_units":
        assert torch.all(online.heads)


def test_wanda_random_wina_keep_exactly_k_per_layer(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    calib = calibration()
    ids = torch.stack(calib)
    k_mlp, k_heads = keep_count(0.3, units.mlp_size), keep_count(0.3, units.num_heads)
    wanda = prepared("wanda", 0.3, model, calib)
    rand = make_policy("random", 0.3)
    rand.prepare(model)
    for static in (wanda, rand):
        assert static.masks.mlp.shape == (units.num_layers, units.mlp_size)
        assert torch.all(static.masks.mlp.sum(-1) == k_mlp) and torch.all(static.masks.heads.sum(-1) == k_heads)
    again = make_policy("random", 0.3)
    again.prepare(model)
    assert torch.equal(again.masks.mlp, rand.masks.mlp)
    wina = make_policy("wina_units", 0.3).forward(model, ids).masks
    assert torch.all(wina.mlp.sum(-1) == k_mlp) and torch.all(wina.heads.sum(-1) == k_heads)


# -- ratio 1.0 and equivalence with zeroed weights ----------------------------------------------
@pytest.mark.parametrize("name", ["teal_units", "cats_units", "wanda", "wina_units", "random"])
def test_ratio_one_is_dense(make_tiny, name):
    model = make_tiny("qwen2")
    ids = torch.stack(calibration(n=2))
    dense = DensePolicy().forward(model, ids).logits
    assert isinstance(make_policy(name, 1.0), DensePolicy)
    policy = make_policy(name, 1.0)  # the policy class itself, at ratio 1.0
    policy.prepare(model, calibration())
    out = policy.forward(model, ids)
    assert torch.equal(out.logits, dense)
    assert executed_ratio(out.masks, unit_map(model)).param == 1.0


def _zeroed_copy(model, mlp: torch.Tensor, heads: torch.Tensor):
    """A copy whose dropped units (masks ``[L, *]``) have zeroed down columns / output slices."""
    pruned = copy.deepcopy(model)
    for layer, unit in (~mlp).nonzero().tolist():
        zero_mlp_unit_(pruned, layer, unit)
    for layer, head in (~heads).nonzero().tolist():
        zero_head_(pruned, layer, head)
    return pruned


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_static_wanda_equals_zeroed_weights(make_tiny, arch):
    model = make_tiny(arch)
    calib = calibration()
    ids = torch.stack(calib[:2])
    policy = prepared("wanda", 0.4, model, calib)
    pruned = _zeroed_copy(model, policy.masks.mlp, policy.masks.heads)
    torch.testing.assert_close(policy.forward(model, ids).logits,
                               DensePolicy().forward(pruned, ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["teal_units", "cats_units", "wina_units"])
def test_online_masks_are_what_ran(make_tiny, name):
    """Replaying the returned masks gives the same logits; for one position they equal zeroed weights."""
    model = make_tiny("llama")
    calib = calibration()
    ids = torch.stack(calib[:2])
    policy = make_policy(name, 0.4)
    policy.prepare(model, calib)
    out = policy.forward(model, ids)
    with torch.no_grad(), UnitHooks(model) as hooks:
        hooks.mlp_mult, hooks.head_mult = out.masks.mlp, out.masks.heads
        replay = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(out.logits, replay)
    single = policy.forward(model, ids[:1, :1])
    pruned = _zeroed_copy(model, single.masks.mlp[0, 0], single.masks.heads[0, 0])
    torch.testing.assert_close(single.logits, DensePolicy().forward(pruned, ids[:1, :1]).logits,
                               rtol=1e-5, atol=1e-5)


# -- honest accounting of what an online rule must run ------------------------------------------
def test_decision_cost_by_hand(make_tiny):
    model = make_tiny("llama")  # hidden 32, N 48, 4 heads of 8 dims, 2 key/value heads
    units = unit_map(model)
    mlp = torch.zeros(1, units.num_layers, units.mlp_size, dtype=torch.bool)
    mlp[..., :12] = True
    heads = torch.zeros(1, units.num_layers, units.num_heads, dtype=torch.bool)
    heads[..., 0] = True
    masks = UnitMasks(mlp, heads)
    teal = get_metric("teal_units")
    extra = decision_cost_fraction(masks, units, *teal.prepaid_params(units))
    hidden, n, hd = 32, 48, 8
    # what really runs: all gate+up rows, 12 down columns; all query rows, 1 head's output
    # columns, all key/value rows
    read = n * 2 * hidden + 12 * hidden + 4 * hd * hidden + 1 * hd * hidden + 2 * 2 * hd * hidden
    layer = n * 3 * hidden + 4 * 2 * hd * hidden + 2 * 2 * hd * hidden
    assert executed_ratio(masks, units).param + float(extra[0]) == pytest.approx(read / layer)
    cats = get_metric("cats_units")  # a dropped unit ran its gate row only
    extra = decision_cost_fraction(masks, units, *cats.prepaid_params(units))
    unit_level = executed_ratio(masks, units).param
    assert unit_level + float(extra[0]) == pytest.approx(unit_level + 36 * hidden / layer)


# -- the oracle sweep ---------------------------------------------------------------------------
def test_sweep_masks_fall_back_to_each_questions_own_tokens(make_tiny, capsys):
    model = make_tiny("llama")
    units = unit_map(model)
    trace = trace_gradients(model, PROMPT, TARGET).row(0)
    scores = get_metric("teal_units").scores(model, PROMPT, TARGET, trace)
    masks = get_metric("teal_units").masks_for_many(scores, [0.5, 1.0], model=model, trace=trace, units=units)
    t = TARGET.numel()
    for layer in range(units.num_layers):
        assert int(masks[0].mlp[:, layer].sum()) == keep_count(0.5, t * units.mlp_size)
        assert int(masks[0].heads[:, layer].sum()) == keep_count(0.5, t * units.num_heads)
    assert torch.all(masks[1].mlp) and torch.all(masks[1].heads)


def test_sweep_calibrates_through_the_saved_tokenizer(tiny_truthfulqa_lm, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_truthfulqa_lm()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text("What happens if you eat watermelon seeds ? Nothing happens . " * 20)
    monkeypatch.setattr(calibrated, "CALIBRATION", {"source": str(text), "n_sequences": 3, "seq_len": 8})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval().requires_grad_(False)
    seqs = resolve_calibration(loaded, {})
    assert seqs is not None and len(seqs) == 3
    assert torch.equal(seqs[0], tok(text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0][:8])
    policy = prepared("teal_units", 0.5, loaded, seqs)
    units = unit_map(loaded)
    trace = trace_gradients(loaded, PROMPT, TARGET).row(0)
    scores = get_metric("teal_units").scores(loaded, PROMPT, TARGET, trace)
    masks = get_metric("teal_units").masks_for(scores, 0.5, model=loaded, trace=trace, units=units)
    expected = scores.mlp > torch.tensor(policy.rule.tau[:units.num_layers]).view(-1, 1)
    assert torch.equal(masks.mlp, expected)  # the same calibrated thresholds as the task policy


def test_sweep_runs_every_baseline_by_name(tiny_truthfulqa_lm, tmp_path, monkeypatch):
    from pathlib import Path

    import attrsparse.experiments.plots
    from attrsparse.experiments.sweep import Sweep, SweepConfig

    monkeypatch.setattr(attrsparse.experiments.plots, "plot_curves", lambda results, out_dir: [])
    model, tok = tiny_truthfulqa_lm()
    data = Path(__file__).parent / "fixtures" / "truthfulqa_3.csv"
    names = ["teal_units", "cats_units", "wanda", "wina_units", "random"]
    cfg = SweepConfig(metrics=names, ratios=[0.5, 1.0], limit=1, template="paper", data=str(data),
                      max_new_tokens=5, mc1=False)
    results = Sweep(cfg, out=tmp_path / "sweep", model=model, tokenizer=tok).run(progress=False)
    rows = {(a["metric"], a["requested_ratio"]): a for a in results["aggregates"]}
    for name in names:
        ratio = rows[(name, 0.5)]["executed_ratio"]
        assert 0.0 < ratio < 1.0 and not math.isnan(ratio)
    assert rows[("cats_units", 0.5)]["executed_ratio_heads"] == 1.0
