"""Calibrated channel rules (torch ChannelRuleSet) converted to the native engine's rules compute what
ChannelHooks computes with the original rule set: the same logits at every position (fp32, tight
tolerance), the same kept channels per projection and the same weights read per token, for shared
decisions and for a threshold and scale per consumer (TEAL, WINA); rules the engine cannot express
are refused with one line naming the rule, the site and why."""

from __future__ import annotations

from array import array

import pytest
import torch

from attrsparse.core.channel_hooks import ChannelHooks
from attrsparse.core.errors import UserError
from attrsparse.core.sites import SITE_NAMES, site_map
from attrsparse.deploy.engine import Engine, convert_rules, pack
from attrsparse.deploy.engine.sites import (
    PROJECTIONS,
    RULES_FORMAT,
    SITE_PROJECTIONS,
    SITES,
    ChannelRules,
    rules_from_json,
    rules_to_json,
)
from attrsparse.deploy.engine.sites import SiteRule as EngineRule
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


def hand_rules(model, seed: int = 0, per_projection: bool = False) -> ChannelRuleSet:
    """A rule on every site: scale [in] (on attn_out a [C, in] scale with identical rows), a
    center equal to the fill on attn_in and mlp_out (compensation), thresholds equal over the
    site's consumers at the median of the site's scores on a dense pass (about half kept).
    ``per_projection``: on attn_in and mlp_in a [C, in] scale with different rows and a threshold
    per consumer at different quantiles of its own score (q keeps 70%, k 40%, v 55%; gate 70%, up
    40%), and a fill on mlp_in too."""
    gen = torch.Generator().manual_seed(seed)
    inputs = site_inputs(model, IDS)
    sites = {}
    for (l, name), x in inputs.items():
        n, c = x.shape[-1], len(site_map(model).layers[l][name].modules)
        own = per_projection and c > 1
        scale = torch.rand(c if own else 1, n, generator=gen) * 1.5 + 0.25
        scale = scale if own else scale[0].expand(c, n).clone() if name == "attn_out" else scale[0]
        filled = name in ("attn_in", "mlp_out") or (own and name == "mlp_in")
        fill = x.mean(0) + torch.randn(n, generator=gen) * 0.05 if filled else None
        rule = SiteRule(torch.zeros(c), scale=scale, center=fill, fill=fill)
        for k in range(c):
            rule.thresholds[k] = rule.score(x, k).quantile((0.3, 0.6, 0.45)[k]) if own else rule.score(x, 0).median()
        sites[site_key(l, name)] = rule
    return ChannelRuleSet("hand", sites)


def engine_run(path, rules, ids=IDS, threads=1):
    """Logits ``[T, V]``, kept channels per projection ``[T, L, 7]`` and linear weights read ``[T]``
    per position; with an fp32 KV cache at every precision, as ChannelHooks' transformers keeps
    (the bf16 cache is tested in test_engine.py)."""
    logits, kept, reads = [], [], []
    with Engine(path, threads=threads, max_ctx=32, rules=rules, kv_cache="fp32") as eng:
        for tok in ids:
            step = eng.step(tok, logits=True)
            logits.append(torch.frombuffer(bytearray(eng.last_logits), dtype=torch.float32))
            kept.append(eng.kept())
            reads.append(int(step.linear_reads))
    return torch.stack(logits), torch.tensor(kept), torch.tensor(reads, dtype=torch.float64)


def hooks_run(model, rule_set: ChannelRuleSet, ids=IDS):
    """The same under ChannelHooks: logits, kept channels (rule.keep of each consumer on its site's
    input), weights read per position."""
    rule_set.bind(model)
    smap = site_map(model)
    kept = torch.zeros(len(ids), smap.num_layers, len(PROJECTIONS), dtype=torch.long)
    handles = []
    for l, layer in enumerate(smap.layers):
        for name in SITE_NAMES:
            for c, module in enumerate(layer[name].modules):
                def count(module, args, l=l, name=name, c=c):
                    k = rule_set.keep(l, name, c, args[0])
                    kept[:, l, PROJECTIONS.index(SITE_PROJECTIONS[name][c])] = (
                        k[0].sum(-1) if k is not None else args[0].shape[-1])
                handles.append(module.register_forward_pre_hook(count))  # before ChannelHooks'
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
    assert torch.equal(kept, want_kept)  # the same decisions at every projection and position
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


@pytest.mark.parametrize("arch", ARCHS)
def test_per_projection_rules_match_channel_hooks(make_tiny, tmp_path, arch):
    """A threshold per consumer and a [C, in] scale with different rows on attn_in (q, k, v) and
    mlp_in (gate, up), with compensation: the engine's projections decide on their own and match
    the hooks' logits, kept channels per projection and weights read; the read count equals the
    count by hand (kept channels of each projection x its outputs, and at layer 0 the kept channels
    from the embedding's own scores); 1 and 2 threads give identical logits; the rules survive
    JSON."""
    model = make_tiny(arch)
    rule_set = hand_rules(model, seed=2, per_projection=True)
    path = pack(model, "fp32", directory=tmp_path)
    rules, got = assert_same(model, path, rule_set)
    for site in ("attn_in", "mlp_in"):
        rule = rules.get(0, site)
        assert set(rule.thresholds) == set(rule.scales) == set(SITE_PROJECTIONS[site]) and rule.threshold is None
        assert len(set(rule.thresholds.values())) == len(rule.thresholds) and set(rule.bias) == set(rule.thresholds)
    assert rules.get(0, "attn_out").threshold is not None and not rules.get(0, "attn_out").thresholds
    _, kept, reads = engine_run(path, rules)
    q, k, v, gate, up = (int(kept[..., PROJECTIONS.index(p)].sum()) for p in ("q", "k", "v", "gate", "up"))
    assert q > v > k and gate > up  # about 70 / 55 / 40% on the dense pass's inputs
    # the read count by hand: kept channels of each projection x its outputs
    smap, c = site_map(model), model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    outs = {"q": c.num_attention_heads * hd, "k": c.num_key_value_heads * hd, "v": c.num_key_value_heads * hd,
            "o": c.hidden_size, "gate": c.intermediate_size, "up": c.intermediate_size, "down": c.hidden_size}
    by_hand = (kept.double() * torch.tensor([outs[p] for p in PROJECTIONS], dtype=torch.float64)).sum((1, 2))
    assert torch.equal(reads, by_hand)
    x0 = site_inputs(model, IDS)[(0, "attn_in")]  # layer 0's attn_in input does not depend on the rules
    for k, proj in enumerate(SITE_PROJECTIONS["attn_in"]):
        rule = rule_set.sites[site_key(0, "attn_in")]
        want = (rule.score(x0, k) > rule.thresholds[k]).sum(-1)
        assert torch.equal(kept[:, 0, PROJECTIONS.index(proj)], want)
    assert smap.decoder_params * 0.2 < float(reads.mean()) < smap.decoder_params * 0.9
    # 1 and 2 threads: identical logits and counts; JSON keeps the per-projection tests
    assert all(torch.equal(a, b) for a, b in zip(engine_run(path, rules), engine_run(path, rules, threads=2)))
    again = rules_from_json(rules_to_json(rules))
    assert all(torch.equal(a, b) for a, b in zip(engine_run(path, again), engine_run(path, rules)))


def test_calibrated_rules_match_channel_hooks(make_tiny, tmp_path, monkeypatch):
    """Rules from the real calibration path: attr_channel (a scale per channel, one threshold over
    every site) with per-consumer decisions (a [C, in] scale on attn_in and mlp_in) and with shared
    ones, SCAP (center = fill = the calibrated mode, folded into the compensation), TEAL (a
    threshold per projection from its greedy allocation) and WINA (also a scale per consumer: the
    column norms of q, k, v differ)."""
    model = make_tiny("llama")
    calib = [torch.randint(3, VOCAB, (24,), generator=torch.Generator().manual_seed(100 + s)) for s in range(6)]
    path = pack(model, "fp32", directory=tmp_path)
    for selector, per_consumer in (("attr_channel", True), ("attr_channel", False), ("scap", None),
                                   ("teal", None), ("wina", None)):
        monkeypatch.setattr(cc, "_CALIBRATORS", {})
        monkeypatch.setitem(cc.ATTR, "per_consumer", per_consumer)
        rule_set = cc.calibrate_channels(model, calib, selector, [0.5])[0.5]
        rules, _ = assert_same(model, path, rule_set)
        assert any(r.bias for r in rules.sites.values()) == (selector == "scap")
        per_projection = any(r.thresholds or r.scales for r in rules.sites.values())
        assert per_projection == (selector in ("teal", "wina") or bool(per_consumer))
        if selector in ("teal", "wina"):  # TEAL's allocation gives q, k, v (gate, up) their own thresholds
            assert any(r.thresholds for r in rules.sites.values())
        if selector == "wina" or per_consumer:  # a scale per consumer (W_c's column norms; c's own gradient)
            assert any(r.scales for r in rules.sites.values())


def test_rules_the_engine_cannot_express_are_refused(make_tiny):
    model = make_tiny("llama")
    smap = site_map(model)

    def one(site, **kw):
        c = len(smap.layers[1][site].modules)
        kw.setdefault("thresholds", torch.full((c,), 0.5))
        return ChannelRuleSet("probe", {site_key(1, site): SiteRule(**kw)})

    n = smap.layers[1]["attn_in"].in_features
    cases = [
        (one("mlp_in", scale=torch.rand(3, n)), "a scale of 3 rows for the site's 2 projections"),
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
    # a threshold and a scale per projection are the engine's per-projection rule
    rule = convert_rules(one("attn_in", thresholds=torch.tensor([0.1, 0.2, 0.3]), scale=torch.rand(3, n)),
                         model).get(1, "attn_in")
    assert rule.thresholds == pytest.approx({"q": 0.1, "k": 0.2, "v": 0.3}) and set(rule.scales) == {"q", "k", "v"}
    # a zero center with no fill, or a zero fill with no center, is the plain rule
    assert convert_rules(one("attn_in", center=torch.zeros(n)), model).get(1, "attn_in").center is None
    bad = ChannelRuleSet("probe", {"L009.attn_in": SiteRule(torch.zeros(3))})
    with pytest.raises(UserError, match="no such site"):
        convert_rules(bad, model)
    with pytest.raises(UserError, match="transformers"):
        convert_rules(ChannelRuleSet("probe", {}), make_tiny("gpt2"))
    assert SITES == SITE_NAMES  # the engine's kept counts come in attrsparse's site order


def test_rules_file_vectors_are_exact_float32_and_old_formats_read():
    """Vectors are written as base64 float32 (format 3 on): reading gives the float32 values bit for
    bit, the head's rule included (format 4); format 2 files (JSON lists) read to the same rules; a
    corrupt vector is one clear error."""
    values = [0.1, -2.5, 1e-30, 3.4e38, float(torch.tensor(1 / 3, dtype=torch.float32))]
    rules = ChannelRules({(0, "attn_in"): EngineRule(thresholds={"q": 0.5, "k": 1.0, "v": 2.0},
                                                     scales={"q": values, "k": values, "v": values}),
                          (1, "mlp_out"): EngineRule(threshold=0.25, scale=values, center=values,
                                                     keep=[True, False, True, True, False], bias={"down": values})},
                         head=EngineRule(threshold=0.75, scale=values))
    data = rules_to_json(rules)
    assert data["format"] == RULES_FORMAT == 4 and isinstance(data["sites"][0]["scales"]["q"], str)
    again = rules_from_json(data)
    want = array("f", values)
    assert again.head.threshold == 0.75 and rules_from_json(rules_to_json(ChannelRules())).head is None
    for got in (again.get(0, "attn_in").scales["q"], again.get(1, "mlp_out").scale, again.get(1, "mlp_out").center,
                again.get(1, "mlp_out").bias["down"], again.head.scale):
        assert got == want and got.tobytes() == want.tobytes()
    assert list(again.get(1, "mlp_out").keep) == [1, 0, 1, 1, 0] and again.get(0, "attn_in").thresholds["k"] == 1.0
    old = {"format": 2, "sites": [{"layer": 1, "site": "mlp_out", "threshold": 0.25, "scale": values, "center": values,
                                   "keep": [True, False, True, True, False], "bias": {"down": values}}]}
    assert rules_from_json(old).get(1, "mlp_out") == again.get(1, "mlp_out")
    for bad in ("not base64!", "AAA="):  # not base64; 2 bytes, not a whole float32
        broken = {"format": 3, "sites": [{"layer": 0, "site": "mlp_out", "threshold": 1.0, "scale": bad}]}
        with pytest.raises(UserError, match="not a channel-rules file"):
            rules_from_json(broken)
