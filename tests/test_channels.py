"""Input-channel rules on every linear: masks by hand, skipped columns never read, compensation,
R-Sparse at full rank, calibrated read ratios, the channel file and its bad inputs."""

from __future__ import annotations

import pytest
import torch

import json

from attrsparse.cli.main import main
from attrsparse.core.channel_hooks import ChannelHooks
from attrsparse.core.errors import UserError
from attrsparse.core.models import load_model
from attrsparse.core.sites import site_map
from attrsparse.policies import make_policy
from attrsparse.policies.channel import read_channels
from attrsparse.selectors import channel_calibration as cc
from attrsparse.selectors.channel_stats import attribution
from attrsparse.selectors.channels import ChannelRuleSet, SiteRule, site_key
from conftest import ARCHS, VOCAB


def _ids(n=12, seed=0, batch=1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _calib(n=6, length=24):
    return [_ids(length, seed=100 + s)[0] for s in range(n)]


def _rule(model, name, site="mlp_out", layer=0, **kw) -> ChannelRuleSet:
    c = len(site_map(model).layers[layer][site].modules)
    kw.setdefault("thresholds", torch.zeros(c))
    return ChannelRuleSet(name, {site_key(layer, site): SiteRule(**kw)}).bind(model)


def test_a_site_rule_keeps_what_the_formula_says():
    rule = SiteRule(torch.tensor([1.0, 2.5]), scale=torch.tensor([1.0, 2.0, 0.5, 4.0]),
                    center=torch.tensor([0.0, 1.0, 0.0, -1.0]))
    x = torch.tensor([[1.5, 2.0, 3.0, -1.5]])
    # |x - c| * scale = [1.5, 2.0, 1.5, 2.0]
    assert torch.equal(rule.score(x, 0), torch.tensor([[1.5, 2.0, 1.5, 2.0]]))
    assert (rule.score(x, 0) > rule.thresholds[0]).tolist() == [[True, True, True, True]]
    assert (rule.score(x, 1) > rule.thresholds[1]).tolist() == [[False, False, False, False]]
    per = SiteRule(torch.tensor([1.0, 1.0]), scale=torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))
    assert (per.score(x, 0) > 1.0).tolist() == [[True, False, True, False]]  # WINA: a scale per consumer
    assert (per.score(x, 1) > 1.0).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("arch", ARCHS)
def test_skipped_channels_are_never_read(make_tiny, arch):
    """Computed from the kept columns alone (plus the fill's bias, computed before), the output is the
    sparse one; weight columns of skipped channels set to NaN leave it finite and unchanged."""
    model = make_tiny(arch)
    smap = site_map(model)
    gen = torch.Generator().manual_seed(5)
    sites = {}
    for l, layer in enumerate(smap.layers):
        for name, site in layer.items():
            fill = torch.randn(site.in_features, generator=gen) * 0.1 if name == "mlp_out" else None
            sites[site_key(l, name)] = SiteRule(torch.full((len(site.modules),), 0.6), fill=fill)
    rule = ChannelRuleSet("teal", sites).bind(model)
    ids = _ids(10)
    with torch.no_grad(), ChannelHooks(model, rule) as hooks:
        want = model(input_ids=ids).logits
    assert 0 < float(hooks.read.mean()) < smap.decoder_params
    used: dict = {}
    keep = rule.keep

    def recording_keep(layer, site, consumer, x):
        k = keep(layer, site, consumer, x)
        if k is not None:
            key = (layer, site, consumer)
            used[key] = used.get(key, False) | k.reshape(-1, k.shape[-1]).any(0)
        return k

    rule.keep = recording_keep
    with torch.no_grad(), ChannelHooks(model, rule, gathered=True):
        first = model(input_ids=ids).logits
        torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
        poisoned = 0
        for (l, name, c), kept in used.items():  # poison every column no token read
            m = smap.layers[l][name].modules[c]
            cols = (~kept).nonzero().flatten()
            poisoned += cols.numel()
            if isinstance(m, torch.nn.Linear):
                m.weight[:, cols] = float("nan")
            else:
                m.weight[cols, :] = float("nan")
        got = model(input_ids=ids).logits
    assert poisoned > 0 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_read_counts_by_hand(make_tiny):
    model = make_tiny("llama")  # mlp_out: 48 channels into down [32 x 48]
    x = torch.zeros(1, 3, 48)
    x[0, 0, :5] = 2.0  # token 0 keeps 5 channels, token 1 none, token 2 all 48
    x[0, 2] = 3.0
    rule = _rule(model, "teal", thresholds=torch.tensor([1.0]))
    new, read = rule.transform(0, "mlp_out", 0, x)
    assert read.tolist() == [[5 * 32, 0, 48 * 32]]
    assert torch.equal(new, x)  # kept channels pass unchanged, the dropped ones are 0 already


def test_compensation_is_exact_when_dropped_inputs_equal_their_fill(make_tiny):
    model = make_tiny("llama")
    down = site_map(model).layers[0]["mlp_out"].modules[0]
    fill = torch.linspace(-0.5, 0.5, 48)
    x = fill.clone().view(1, 1, 48).repeat(1, 2, 1)
    x[0, :, :6] = torch.tensor([3.0, -2.0, 4.0, 2.5, -3.0, 5.0])  # large: kept
    rule = _rule(model, "scap", thresholds=torch.tensor([1.0]), center=fill, fill=fill)
    new, read = rule.transform(0, "mlp_out", 0, x)
    assert read.tolist() == [[6 * 32, 6 * 32]]
    # y = sum_kept W[:, j] (x_j - f_j) + W f: exactly W x when the dropped x_j equal f_j
    torch.testing.assert_close(down(new), down(x))


def test_r_sparse_at_full_rank_equals_dense(make_tiny):
    model = make_tiny("llama")
    smap = site_map(model)
    sites = {}
    for l, layer in enumerate(smap.layers):
        for name, site in layer.items():
            lowrank = []
            for m in site.modules:
                w = cc.as_out_in(m)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                lowrank.append(((u * s).contiguous(), vh.contiguous()))
            sites[site_key(l, name)] = SiteRule(torch.full((len(site.modules),), 0.8), lowrank=lowrank)
    rule = ChannelRuleSet("r_sparse", sites).bind(model)
    assert rule.adds_output
    ids = _ids(9)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with ChannelHooks(model, rule) as hooks:
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)
    assert float(hooks.read.min()) > smap.decoder_params  # the full-rank path costs more than dense


def test_cats_reads_gate_in_full_and_kept_units(make_tiny):
    model = make_tiny("llama")  # gate/up [48 x 32], down [32 x 48]
    rule = ChannelRuleSet("cats", {site_key(0, "mlp_in"): SiteRule(torch.zeros(2), gate=True),
                                   site_key(0, "mlp_out"): SiteRule(torch.tensor([0.5]), gate=True)}).bind(model)
    x = torch.randn(1, 4, 32)
    _, gate_read = rule.transform(0, "mlp_in", 0, x)
    _, up_read = rule.transform(0, "mlp_in", 1, x)
    assert gate_read.tolist() == [[48 * 32] * 4] and up_read.tolist() == [[0] * 4]
    h = torch.zeros(1, 1, 48)
    h[0, 0, :7] = 1.0  # act(gate x) above the threshold for 7 units (not gated in this call: h is the input)
    rule._acts = None
    new, read = rule.transform(0, "mlp_out", 0, h)
    assert read.tolist() == [[7 * (32 + 32)]]  # down column + up row per kept unit


@pytest.mark.parametrize("selector", ["teal", "wina", "cats", "r_sparse", "scap", "attr_channel"])
def test_calibrated_read_ratio_is_the_requested_one(make_tiny, selector, monkeypatch):
    monkeypatch.setattr(cc, "_CALIBRATORS", {})
    model = make_tiny("llama")
    calib = _calib()
    ratios = [0.75] if selector == "cats" else [0.5, 0.7]  # CATS reads attention and the gate in full
    rules = cc.calibrate_channels(model, calib, selector, ratios)
    cal = cc._CALIBRATORS[cc.calibrator_key(model, calib, selector)][0]
    weights, decoder = cal.stream_weights(), site_map(model).decoder_params
    for ratio, rule in rules.items():
        assert abs(rule.meta["calibration_read_ratio"] - ratio) <= 0.01, (selector, ratio, rule.meta)
        kept = rule.meta["kept_fraction"]  # per stream, the budgets of the allocation
        assert list(kept) == cal.stream_names() and all(0.0 <= k <= 1.0 for k in kept.values())
        assert abs((sum(w * k for w, k in zip(weights, kept.values())) + cal.fixed_read()) / decoder - ratio) <= 0.02
    if selector in ("teal", "attr_channel"):  # a stream per projection
        assert {n.rsplit(".", 1)[-1] for n in kept if n.count(".") == 2} >= {"q_proj", "k_proj", "gate_proj"}
    # on tasks through the policy: the same rule, reads accounted per position
    policy = make_policy(selector, ratios[0])
    policy.prepare(model, calib)
    out = policy.forward(model, torch.stack(calib[:2]))
    assert out.masks is None and out.read.shape == (2, 24)
    assert abs(float(out.read.mean()) - ratios[0]) <= 0.01


def test_channel_file_round_trip_and_bad_input(make_tiny, tmp_path, llama_dir, capsys):
    def calibrate(out, ratios="0.6", calib=None):
        return main(["calibrate", "--model", llama_dir, "--selector", "attr_channel", "--ratios", ratios,
                     "--n-seq", "4", "--seq-len", "24", "--calib", str(calib or _text_file(tmp_path)),
                     "--out", str(out)])

    out = tmp_path / "chan"
    assert calibrate(out) == 0
    capsys.readouterr()
    model, _ = load_model(llama_dir)
    policy = make_policy(str(out), 0.6)  # the manifest says: channel rules
    policy.prepare(model)
    assert policy.forward(model, _ids(8)).read.shape == (1, 8)
    with pytest.raises(UserError, match="no rule at read ratio 0.5"):
        make_policy(f"channel:{out}", 0.5)
    with pytest.raises(UserError, match="different weights"):
        make_policy(str(out), 0.6).prepare(make_tiny("llama", seed=7))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for ratios, calib in (("1.5", None), ("0", None), ("0.5", empty)):
        bad = tmp_path / f"bad-{ratios}"
        code = calibrate(bad, ratios, calib)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("attrsparse: error: ")
        assert not (bad / "channels.json").exists() and not (bad / "attrsparse.json").exists()


def _text_file(tmp_path):
    path = tmp_path / "calib.txt"
    words = " ".join(f"w{i % 61}" for i in range(600))
    path.write_text(words)
    return path


def test_channel_rules_are_not_units():
    with pytest.raises(UserError, match="evaluate it on tasks"):
        make_policy("teal", 0.5).selector.masks_for(None, 0.5)


@pytest.mark.parametrize("attr", [{"per_consumer": ["attn_in"]}, {"allocation": "greedy"}, {"allocation": "layer"},
                                  {"center": "mode"},
                                  {"allocation": "greedy_global"}, {"per_consumer": True, "allocation": "greedy_global"}])
def test_attr_channel_variants_reach_the_requested_read_ratio(make_tiny, monkeypatch, attr):
    monkeypatch.setattr(cc, "_CALIBRATORS", {})
    monkeypatch.setattr(cc, "ATTR", {**cc.ATTR, **attr})
    model = make_tiny("llama")
    rules = cc.calibrate_channels(model, _calib(), "attr_channel", [0.5, 0.7])
    for ratio, rule in rules.items():
        assert abs(rule.meta["calibration_read_ratio"] - ratio) <= 0.01, (attr, ratio, rule.meta)
        if cc.ATTR["allocation"] == "layer":  # every layer's streams read the ratio of their weights
            cal = cc._CALIBRATORS[cc.calibrator_key(model, _calib(), "attr_channel")][0]
            kept = list(rule.meta["kept_fraction"].values())
            for sparsity in cal.layer_sparsity(kept):
                assert abs(1 - sparsity - ratio) <= 0.02
        per = [r.scale.dim() == 2 for k, r in sorted(rule.sites.items())]
        pc = cc.ATTR["per_consumer"]
        assert per == [pc is True or (pc and k.endswith("attn_in")) for k in sorted(rule.sites)]


def test_per_consumer_attribution_sums_to_the_shared_gradient(make_tiny):
    """The shared input's statistics from per-consumer gradients (their sum) equal those of the
    plain shared gradient; each consumer's own gradient differs from it."""
    model = make_tiny("llama")
    shared = attribution(model, _calib(3), 4, per_token=False, per_consumer=False)
    both = attribution(model, _calib(3), 4, per_token=False, per_consumer=True)
    for key, st in shared.items():
        for stat in ("sq_grad", "abs_grad", "mean", "abs"):
            torch.testing.assert_close(both[key][stat], st[stat], rtol=1e-5, atol=1e-9)  # fp32 sums
    assert not torch.allclose(both[(0, "attn_in", 0)]["sq_grad"], shared[(0, "attn_in")]["sq_grad"])


def test_attribution_under_a_rule_sees_what_the_consumers_see(make_tiny, monkeypatch):
    """Under a rule that drops every channel of one site, that site's captured inputs are its
    fill (0) while its gradient stays W^T dL/dy; calibrating with the attribution re-measured under
    the rule still reaches the requested read ratio."""
    model = make_tiny("llama")
    rule = _rule(model, "r", site="mlp_out", thresholds=torch.full((1,), float("inf")))
    st = attribution(model, _calib(2), 4, per_token=False, per_consumer=True, rule=rule)
    assert float(st[(0, "mlp_out")]["abs"].abs().max()) == 0.0
    assert float(st[(0, "mlp_out")]["sq_grad"].min()) > 0.0
    dense = attribution(model, _calib(2), 4, per_token=False, per_consumer=True)
    assert float(dense[(0, "mlp_out")]["abs"].min()) > 0.0
    monkeypatch.setattr(cc, "_CALIBRATORS", {})
    monkeypatch.setattr(cc, "ATTR", {**cc.ATTR, "at_rule": 1})
    for ratio, r in cc.calibrate_channels(model, _calib(), "attr_channel", [0.5]).items():
        assert abs(r.meta["calibration_read_ratio"] - ratio) <= 0.01


def test_attribution_statistics_against_a_plain_backward(make_tiny, monkeypatch):
    """E[g^2] and the |x|^p-weighted moments E|x|^p, E[|x|^p g^2] at the input of one down
    projection equal those of a plain backward of the summed next-token loss with the input
    captured by a hook (x_weight p's scale is sqrt(E[|x|^p g^2] / E|x|^p))."""
    model = make_tiny("llama")
    seq = _calib(1)[0]
    st = attribution(model, [seq], 4, per_token=False, per_consumer=False)[(0, "mlp_out")]
    seen = {}

    def grab(_m, args):
        args[0].retain_grad()
        seen["x"] = args[0]

    down = site_map(model).layers[0]["mlp_out"].modules[0]
    handle = down.register_forward_pre_hook(grab)
    try:
        embeds = model.get_input_embeddings()(seq[:-1].view(1, -1)).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0]
        torch.nn.functional.cross_entropy(logits.float(), seq[1:], reduction="sum").backward()
    finally:
        handle.remove()
    x, g = seen["x"].detach()[0].double(), seen["x"].grad[0].double()
    torch.testing.assert_close(st["sq_grad"], (g * g).mean(0), rtol=1e-4, atol=1e-14)
    for p in (1, 2, 4):
        torch.testing.assert_close(st[f"x{p}"], (x.abs() ** p).mean(0), rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(st[f"x{p}_sq_grad"], (x.abs() ** p * g * g).mean(0), rtol=1e-4, atol=1e-16)
    torch.testing.assert_close(st["x_sq_grad"], (x * g * g).mean(0), rtol=1e-4, atol=1e-16)
    # skip_first: the window's first position out of the sums (its gradient from every later loss kept)
    st1 = attribution(model, [seq], 4, per_token=False, per_consumer=False, skip_first=1)[(0, "mlp_out")]
    for name, ref in (("sq_grad", g * g), ("x2", x * x), ("x2_sq_grad", x * x * g * g), ("mean", x)):
        torch.testing.assert_close(st1[name], ref[1:].mean(0), rtol=1e-4, atol=1e-14)
    # center="mode": the (x - m)²-weighted RMS of g from these moments, against the shifted input directly
    monkeypatch.setattr(cc, "ATTR", {**cc.ATTR, "per_consumer": False})
    cal = cc.Calibrator.__new__(cc.Calibrator)
    cal.smap = site_map(model)
    m = x.mean(0) + 0.3 * x.std(0)
    scale = cal._attr_scale({(0, "mlp_out"): st}, 0, "mlp_out", m)
    direct = (((x - m) ** 2 * g * g).mean(0) / ((x - m) ** 2).mean(0)).sqrt() / cal.smap.layers[0]["mlp_out"].params_per_channel ** 0.5
    torch.testing.assert_close(scale.double(), direct, rtol=1e-4, atol=1e-12)


def test_sampled_labels_estimate_the_true_fisher(make_tiny):
    """labels="sampled": E[g^2] at the input of a down projection, over many copies of one sequence
    (each position's target drawn from the model's own prediction), approaches the true Fisher
    diagonal computed by enumerating every target of every position: sum_t sum_y p_t(y) (dl_t(y)/dx)^2
    (the cross terms of different positions vanish in expectation). The text's own targets (the
    empirical Fisher) give another value."""
    model = make_tiny("llama")
    seq = _calib(1, length=8)[0]
    copies = 600
    est = attribution(model, [seq] * copies, 200, per_token=False, labels="sampled")[(0, "mlp_out")]["sq_grad"]
    text = attribution(model, [seq], 4, per_token=False)[(0, "mlp_out")]["sq_grad"]
    seen = {}
    down = site_map(model).layers[0]["mlp_out"].modules[0]
    handle = down.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))
    try:
        embeds = model.get_input_embeddings()(seq[:-1].view(1, -1)).detach().requires_grad_(True)
        with torch.enable_grad():
            logp = torch.log_softmax(model(inputs_embeds=embeds, use_cache=False).logits[0].double(), -1)
            fisher = torch.zeros(seen["x"].shape[-1], dtype=torch.float64)
            for t in range(logp.shape[0]):
                for y in range(logp.shape[1]):
                    (g,) = torch.autograd.grad(-logp[t, y], seen["x"], retain_graph=True)
                    fisher += logp[t, y].exp().detach() * (g[0].double() ** 2).sum(0)
    finally:
        handle.remove()
    fisher /= logp.shape[0]
    rel = lambda a: float((a - fisher).norm() / fisher.norm())
    assert rel(est) < 0.1  # 0.027 with this seed
    assert rel(text) > 0.3  # 0.49


def test_attr_options_are_checked_and_restored(make_tiny, monkeypatch):
    monkeypatch.setattr(cc, "ATTR", dict(cc.ATTR))
    before = dict(cc.ATTR)
    for bad, match in (({"bogus": 1}, "unknown attr_channel option 'bogus'"), ({"statistic": "max"}, "abs, rms"), ({"x_weight": 3}, "0, 1, 2, 4"),
                       ({"per_consumer": ["attn"]}, "list of sites"), ({"grad_power": -1}, ">= 0"),
                       ({"at_rule": 1.5}, "integer"), ({"center": "yes"}, "true, false or mode"),
                       ({"per_token": "yes"}, "true or false"), ({"skip_first": -1}, "integer from 0 to 16"),
                       ({"allocation": "layers"}, "global, layer, uniform")):
        with pytest.raises(UserError, match=match):
            with cc.attr_options(bad):
                pass
    with pytest.raises(RuntimeError):
        with cc.attr_options({"x_weight": 2, "per_consumer": False}) as now:
            assert cc.ATTR == now and now["x_weight"] == 2 and now["per_consumer"] is False
            raise RuntimeError
    assert cc.ATTR == before
    recorded = {k: v for k, v in before.items() if k != "grad_power"}  # a rule from before the key existed
    assert cc.same_attr(recorded, before) and not cc.same_attr(recorded, {**before, "grad_power": 0.5})
    assert not cc.same_attr({k: v for k, v in before.items() if k != "per_consumer"}, before)  # was shared


def test_calibrate_attr_options_on_the_command_line(tmp_path, llama_dir, capsys, monkeypatch):
    """`--attr per_consumer=false` gives shared decisions (one scale row per site) and is recorded;
    the same folder is refused for other options; bad options fail with one line, nothing written."""
    monkeypatch.setattr(cc, "_CALIBRATORS", {})

    def calibrate(out, *attr):
        return main(["calibrate", "--model", llama_dir, "--selector", "attr_channel", "--ratios", "0.6",
                     "--n-seq", "4", "--seq-len", "24", "--calib", str(_text_file(tmp_path)), "--out", str(out),
                     *[a for kv in attr for a in ("--attr", kv)]])

    out = tmp_path / "shared"
    assert calibrate(out, "per_consumer=false", "x_weight=1") == 0
    capsys.readouterr()
    model, _ = load_model(llama_dir)
    make_policy(str(out), 0.6).prepare(model)  # it loads
    _, tensors = read_channels(out)
    scales = [v for k, v in tensors.items() if k.endswith(".scale")]
    assert scales and all(v.dim() == 1 for v in scales)  # one decision per shared input
    doc = json.loads((out / "channels.json").read_text())
    assert doc["ratios"]["0.6"]["attr"]["per_consumer"] is False and doc["ratios"]["0.6"]["attr"]["x_weight"] == 1
    assert cc.ATTR["per_consumer"] is True and cc.ATTR["x_weight"] == 2  # restored
    code = calibrate(out)  # the default options into a folder of other options
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "other options" in err[0]
    assert json.loads((out / "channels.json").read_text())["ratios"]["0.6"]["attr"]["per_consumer"] is False
    for bad in (["bogus=1"], ["statistic=max"], ["novalue"]):
        folder = tmp_path / f"bad-{bad[0]}"
        code = calibrate(folder, *bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("attrsparse: error: ")
        assert not folder.exists() or not any(folder.iterdir())


def test_calibrating_more_ratios_extends_a_channel_folder(tmp_path, llama_dir, capsys, monkeypatch):
    """A second calibration of the same configuration adds its ratios and keeps the others bit for
    bit; one on other text (another number of windows) is refused with one line, the folder intact."""
    monkeypatch.setattr(cc, "_CALIBRATORS", {})

    def calibrate(ratios, n_seq="4"):
        return main(["calibrate", "--model", llama_dir, "--selector", "attr_channel", "--ratios", ratios,
                     "--n-seq", n_seq, "--seq-len", "24", "--calib", str(_text_file(tmp_path)), "--out", str(out)])

    out = tmp_path / "chan"
    assert calibrate("0.6") == 0
    _, first = read_channels(out)
    assert calibrate("0.5,0.7") == 0
    doc, both = read_channels(out)
    assert list(doc["ratios"]) == ["0.5", "0.6", "0.7"]
    assert all(torch.equal(both[k], v) for k, v in first.items())
    model, _ = load_model(llama_dir)
    for ratio in (0.5, 0.6, 0.7):
        make_policy(str(out), ratio).prepare(model)
    capsys.readouterr()
    before = (out / "channels.json").read_bytes()
    assert calibrate("0.4", n_seq="3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other text" in err[0]
    assert (out / "channels.json").read_bytes() == before


def test_greedy_search_resumes_from_its_checkpoint(make_tiny, monkeypatch, greedy_checkpoints):
    """TEAL's greedy search writes each finished layer to its checkpoint: a search interrupted
    after layer 0 resumes at layer 1 and gives the uninterrupted search's rules exactly; a finished
    one is reused without a single trial forward; another text is another checkpoint."""
    from attrsparse.selectors import channel_greedy

    model, calib = make_tiny("llama"), _calib()
    trials = []
    error = channel_greedy._error
    monkeypatch.setattr(channel_greedy, "_error", lambda t, n: trials.append(1) or error(t, n))

    def run(progress=None):
        monkeypatch.setattr(cc, "_CALIBRATORS", {})
        trials.clear()
        rules = cc.calibrate_channels(model, calib, "teal", [0.5, 0.7], progress=progress)
        return {r: {k: s.thresholds.tolist() for k, s in rule.sites.items()} for r, rule in rules.items()}, len(trials)

    def stop_after_layer_0(layer):
        if layer == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(stop_after_layer_0)
    files = list(greedy_checkpoints.iterdir())
    assert len(files) == 1
    layers = json.loads(files[0].read_text())["layers"]
    assert layers[0] and layers[1] is None  # layer 0 written before the interruption
    resumed, resumed_trials = run()
    reused, reused_trials = run()
    for f in files:
        f.unlink()
    full, full_trials = run()
    assert resumed == full and reused == full
    assert 0 < resumed_trials < full_trials and reused_trials == 0
    monkeypatch.setattr(cc, "_CALIBRATORS", {})
    cc.calibrate_channels(model, _calib(4), "teal", [0.5])  # another calibration text
    assert len(list(greedy_checkpoints.iterdir())) == 2
