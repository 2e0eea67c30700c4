"""Calibrated channel rules (torch ChannelRuleSet) converted to the native engine's rules compute what
ChannelHooks computes with the original rule set: the same logits at every position (fp32, tight
tolerance), the same kept channels per site and the same weights read per token; rules the engine
cannot express are refused with one line naming the rule, the site and why."""

from __future__ import annotations

import pytest
import torch

from attrsparse.core.channel_hooks import ChannelHooks
from attrsparse.core.errors import UserError
from attrsparse.core.sites import SITE_NAMES, site_map
from attrsparse.deploy.engine import Engine, convert_rules, pack
from attrsparse.deploy.engine.sites import SITES
from attrsparse.selectors import channel_calibration as cc
from attrsparse.selectors.channels import ChannelRuleSet, SiteRule, site_key
from conftest import VOCAB
from test_engine import dequantised

ARCHS = ["llama", "qwen2", "gemma3_text"]
IDS = [1, 5, 9, 3, 7, 11, 2, 4, 8, 6, 13, 10]


def site_inputs(model, ids) -> dict:
    """Every site's input ``[T, in]`` on a dense pass."""
    got, handles = {}, []
    for l, layer in enumerate(site_map(model).layers):
        for name in SITE_NAMES:
            handles.append(layer[name].modules[0].register_forward_pre_hook(
                lambda m, args, key=(l, name): got.__setitem__(key, args[0][0].detach().float())))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return got


def hand_rules(model, seed: int = 0) -> ChannelRuleSet:
    """A rule on every site: scale [in] (on attn_out a [C, in] scale with identical rows), a
    center equal to the fill on attn_in and mlp_out (compensation), thresholds equal over the
    site's consumers at the median of the site's scores on a dense pass (about half kept)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = site_inputs(model, IDS)
    sites = {}
    for (l, name), x in inputs.items():
        n, c = x.shape[-1], len(site_map(model).layers[l][name].modules)
        scale = torch.rand(n, generator=gen) * 1.5 + 0.25
        fill = x.mean(0) + torch.randn(n, generator=gen) * 0.05 if name in ("attn_in", "mlp_out") else None
        rule = SiteRule(torch.zeros(c), scale=scale.expand(c, n).clone() if name == "attn_out" else scale,
                        center=fill, fill=fill)
        rule.thresholds[:] = rule.score(x, 0).median()
        sites[site_key(l, name)] = rule
    return ChannelRuleSet("hand", sites)


def engine_run(path, rules, ids=IDS):
    """Logits ``[T, V]``, kept channels ``[T, L, 4]`` and linear weights read ``[T]`` per position."""
    logits, kept, reads = [], [], []
    with Engine(path, threads=1, max_ctx=32, rules=rules) as eng:
        for tok in ids:
            step = eng.step(tok, logits=True)
            logits.append(torch.frombuffer(bytearray(eng.last_logits), dtype=torch.float32))
            kept.append(eng.kept())
            reads.append(int(step.linear_reads))
    return torch.stack(logits), torch.tensor(kept), torch.tensor(reads, dtype=torch.float64)


def hooks_run(model, rule_set: ChannelRuleSet, ids=IDS):
    """The same under ChannelHooks: logits, kept channels (rule.keep of consumer 0 on each site's
    input), weights read per position."""
    rule_set.bind(model)
    smap = site_map(model)
    kept = torch.zeros(len(ids), smap.num_layers, 4, dtype=torch.long)
    handles = []
    for l, layer in enumerate(smap.layers):
        for s, name in enumerate(SITE_NAMES):
            def count(module, args, l=l, s=s, name=name):
                k = rule_set.keep(l, name, 0, args[0])
                kept[:, l, s] = k[0].sum(-1) if k is not None else args[0].shape[-1]
            handles.append(layer[name].modules[0].register_forward_pre_hook(count))  # before ChannelHooks'
    try:
        with torch.no_grad(), ChannelHooks(model, rule_set) as hooks, rule_set.live_state(model):
            logits = model(torch.tensor([ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    return logits, kept, hooks.read.clone()


def assert_same(model, path, rule_set, precision="fp32", reference=None):
    rules = convert_rules(rule_set, model, precision)
    got, kept, reads = engine_run(path, rules)
    want, want_kept, want_reads = hooks_run(reference if reference is not None else model, rule_set)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    assert torch.equal(kept, want_kept)  # the same decisions at every site and position
    assert torch.equal(reads, want_reads)  # and the same weights read: the same read ratio
    dense = site_map(model).decoder_params
    assert 0.2 < float(reads.mean()) / dense < 0.9
    return rules, got


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_rules_match_channel_hooks(make_tiny, tmp_path, arch):
    model = make_tiny(arch)
    rule_set = hand_rules(model)
    path = pack(model, "fp32", directory=tmp_path)
    rules, got = assert_same(model, path, rule_set)
    # every site has a rule, compensated where the fill is set
    assert len(rules.sites) == 4 * model.config.num_hidden_layers
    assert set(rules.get(0, "attn_in").bias) == {"q", "k", "v"} and set(rules.get(0, "mlp_out").bias) == {"down"}
    assert not rules.get(0, "mlp_in").bias and rules.get(0, "mlp_in").center is None
    dense, _, _ = engine_run(path, None)
    assert (got - dense).abs().max() > 1e-2  # the rules change the logits
    for (layer, site), r in rules.sites.items():  # without the compensation the outputs differ
        r.bias = {}
    uncompensated, _, _ = engine_run(path, rules)
    assert (got - uncompensated).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_compensation_uses_the_stored_weights(make_tiny, tmp_path, precision):
    """bf16/int8 files: the compensation W fill is computed from the weights as stored, so the engine
    equals ChannelHooks on the model holding the engine's dequantised weights."""
    model = make_tiny("llama")
    rule_set = hand_rules(model, seed=1)
    path = pack(model, precision, directory=tmp_path)
    reference = dequantised(model, precision)
    assert_same(model, path, ChannelRuleSet("hand", rule_set.sites), precision, reference=reference)


def test_calibrated_rules_match_channel_hooks(make_tiny, tmp_path, monkeypatch):
    """Rules from the real calibration path: attr_channel (a scale per channel, one threshold over
    every site) and SCAP (center = fill = the calibrated mode, folded into the compensation)."""
    monkeypatch.setattr(cc, "_CALIBRATORS", {})
    model = make_tiny("llama")
    calib = [torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(100 + s)) for s in range(6)]
    path = pack(model, "fp32", directory=tmp_path)
    for selector in ("attr_channel", "scap"):
        rule_set = cc.calibrate_channels(model, calib, selector, [0.6])[0.6]
        rules, _ = assert_same(model, path, rule_set)
        assert any(r.bias for r in rules.sites.values()) == (selector == "scap")


def test_rules_the_engine_cannot_express_are_refused(make_tiny):
    model = make_tiny("llama")
    smap = site_map(model)

    def one(site, **kw):
        c = len(smap.layers[1][site].modules)
        kw.setdefault("thresholds", torch.full((c,), 0.5))
        return ChannelRuleSet("probe", {site_key(1, site): SiteRule(**kw)})

    n = smap.layers[1]["attn_in"].in_features
    cases = [
        (one("attn_in", thresholds=torch.tensor([0.1, 0.2, 0.3])), "threshold per projection \\(q 0.1, k 0.2, v 0.3\\)"),
        (one("mlp_in", scale=torch.rand(2, n)), "scale per projection"),
        (one("mlp_out", gate=True), "CATS gate"),
        (one("attn_out", lowrank=[(torch.zeros(32, 2), torch.zeros(2, 32))]), "low-rank"),
        (one("attn_in", center=torch.ones(n), fill=torch.zeros(n) + 0.5), "decision center .* other than its fill"),
        (one("attn_in", center=torch.ones(n)), "decision center but no fill"),
        (one("attn_in", fill=torch.ones(n)), "fill but no decision center"),
    ]
    for rule_set, why in cases:
        with pytest.raises(UserError, match=f"channel rule probe at L001\\.\\w+ cannot run in the native engine: "
                                            f"it has .*{why}") as err:
            convert_rules(rule_set, model)
        assert "\n" not in str(err.value)
    # a zero center with no fill, or a zero fill with no center, is the plain rule
    assert convert_rules(one("attn_in", center=torch.zeros(n)), model).get(1, "attn_in").center is None
    bad = ChannelRuleSet("probe", {"L009.attn_in": SiteRule(torch.zeros(3))})
    with pytest.raises(UserError, match="no such site"):
        convert_rules(bad, model)
    with pytest.raises(UserError, match="transformers"):
        convert_rules(ChannelRuleSet("probe", {}), make_tiny("gpt2"))
    assert SITES == SITE_NAMES  # the engine's kept counts come in attrsparse's site order
