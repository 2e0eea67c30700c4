"""Metrics: hand formulas from the trace, the registry, and agreement with real loss changes.

Sign convention (paper-notes §3.2): importance = estimated increase of loss_t when the unit is
removed at token t; x = unit output, g = d loss_t / d x.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from attrsparse import UserError, get_metric, list_metrics, score, trace_gradients, unit_map
from attrsparse.core.attention import KVRecorder
from attrsparse.core.trace import forward_units
from attrsparse.scores import get_score
from attrsparse.scores.ig import integrated_gradients

PROMPT = [1, 5, 9, 17, 33]
TARGET = [7, 8, 40, 3, 11, 12]
SINGLE_PASS = ("magnitude", "gradient", "gxo", "snip", "corrected_gxo")
ALL = SINGLE_PASS + ("ig", "ig_all_layers")


@pytest.fixture
def llama_trace(make_tiny):
    model = make_tiny("llama")
    return model, trace_gradients(model, PROMPT, TARGET).row(0)


# -- hand formulas ---------------------------------------------------------------------------------

def hand_scores(tr, name: str, reduction: str):
    """Each metric written out element by element (loops over heads), independently of attrsparse."""
    x, g, o, gh = tr.mlp_x, tr.mlp_g, tr.head_x, tr.head_g  # [T,L,N], [T,L,N], [T,L,H,D] x2
    t_, l_, h_, d_ = o.shape
    red = (lambda v: v.sum(-1)) if reduction == "sum" else (lambda v: v.sum(-1) / d_)
    heads = torch.zeros(t_, l_, h_)
    if name == "magnitude":
        mlp = x.abs()
        for h in range(h_):
            heads[..., h] = o[..., h, :].pow(2).sum(-1).sqrt()
    elif name == "gradient":
        mlp = -g
        for h in range(h_):
            heads[..., h] = -red(gh[..., h, :])
    elif name in ("gxo", "snip"):
        mlp = -x * g
        for h in range(h_):
            heads[..., h] = -red(o[..., h, :] * gh[..., h, :])
        if name == "snip":
            mlp, heads = mlp.abs(), heads.abs()
    elif name == "corrected_gxo":
        mlp = -x * g + 0.5 * x.abs() * g.pow(2).sum(-1, keepdim=True).sqrt()
        if reduction == "sum":  # norm over the whole o_proj input of the layer
            layer_norm = gh.pow(2).sum((-1, -2)).sqrt()
        else:  # official code: norm of the per-head mean gradients
            layer_norm = (gh.sum(-1) / d_).pow(2).sum(-1).sqrt()
        for h in range(h_):
            o_norm = o[..., h, :].pow(2).sum(-1).sqrt()
            heads[..., h] = -red(o[..., h, :] * gh[..., h, :]) + 0.5 * o_norm * layer_norm
    else:
        raise AssertionError(name)
    return mlp, heads


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", SINGLE_PASS)
def test_metric_equals_hand_formula(llama_trace, name, reduction):
    model, tr = llama_trace
    got = get_score(name).from_trace(tr, head_reduction=reduction)
    mlp, heads = hand_scores(tr, name, reduction)
    assert got.mlp.shape == mlp.shape and got.heads.shape == heads.shape
    torch.testing.assert_close(got.mlp, mlp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.heads, heads, atol=1e-6, rtol=1e-5)


def test_score_shares_one_trace_and_matches_metrics(llama_trace):
    model, tr = llama_trace
    units = unit_map(model)
    out = score(model, torch.tensor(PROMPT), torch.tensor(TARGET), metrics=list(SINGLE_PASS))
    assert list(out) == list(SINGLE_PASS)
    for name, s in out.items():
        assert s.mlp.shape == (len(TARGET), units.num_layers, units.mlp_size)
        assert s.heads.shape == (len(TARGET), units.num_layers, units.num_heads)
        ref = get_score(name).from_trace(tr)
        torch.testing.assert_close(s.mlp, ref.mlp, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(s.heads, ref.heads, atol=1e-6, rtol=1e-6)
    # a single metric name as a string works too; official "mean" form passes through score()
    mean = score(model, PROMPT, TARGET, metrics="corrected_gxo", head_reduction="mean", trace=tr)
    torch.testing.assert_close(mean["corrected_gxo"].heads, hand_scores(tr, "corrected_gxo", "mean")[1],
                               atol=1e-6, rtol=1e-5)


def test_mean_reduction_is_sum_over_head_dim(llama_trace):
    model, tr = llama_trace
    d = unit_map(model).head_dim
    for name in ("gradient", "gxo"):
        s = get_score(name).from_trace(tr, "sum").heads
        m = get_score(name).from_trace(tr, "mean").heads
        torch.testing.assert_close(m * d, s, atol=1e-6, rtol=1e-5)


def test_registry_and_errors(llama_trace):
    names = list_metrics()
    assert set(ALL) <= set(names)
    assert len(names) == len(set(names))
    for name in ALL:
        metric = get_metric(name)
        assert metric.name == name and metric.description
        assert metric.single_pass == (name in SINGLE_PASS)
    with pytest.raises(UserError, match="did you mean 'gxo'"):
        get_metric("gxoo")
    with pytest.raises(UserError, match="did you mean 'corrected_gxo'"):
        get_metric("corected_gxo")
    with pytest.raises(UserError, match="unknown metric"):
        get_metric("zzzzzzzzzz")
    model, tr = llama_trace
    with pytest.raises(UserError, match="did you mean"):
        score(model, PROMPT, TARGET, metrics=["magnitud"], trace=tr)
    with pytest.raises(UserError, match="head_reduction"):
        get_score("gxo").from_trace(tr, head_reduction="max")
    with pytest.raises(UserError, match="empty"):
        score(model, [], TARGET)
    with pytest.raises(UserError, match="empty"):
        score(model, PROMPT, [])


# -- real loss changes -----------------------------------------------------------------------------

def dense_recorder(model):
    recorder = KVRecorder()
    _, dense, _, _, _ = forward_units(model, PROMPT, TARGET, recorder=recorder, want_grad=False)
    recorder.record = False
    return recorder, dense[0]


def loss_changes(model, recorder, dense, *, mlp_mult=None, head_mult=None, rows=1):
    """loss_t(units multiplied at token t only, dense context) - loss_t(dense): ``[rows, T]``.

    With a dense KVRecorder, every position sees the dense keys/values of the other positions,
    so multiplying the units of every position at once gives each token's own effect."""
    _, losses, _, _, _ = forward_units(model, PROMPT, TARGET, rows=rows, mlp_mult=mlp_mult,
                                       head_mult=head_mult, recorder=recorder, want_grad=False)
    return losses - dense


def incremental_zeroed_loss(model, t, layer, kind):
    """The same loss change by explicit incremental decoding: zero layer ``layer``'s MLP units
    (or heads) at step t only, with a DynamicCache of dense earlier steps."""
    units = unit_map(model)
    module = (units.down_modules if kind == "mlp" else units.out_modules)[layer]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPT[:-1]]), cache=cache, use_cache=True)
        for step, token in enumerate([PROMPT[-1]] + TARGET[:t]):
            handle = None
            if step == t:
                handle = module.register_forward_pre_hook(lambda m, a: (a[0] * 0,) + tuple(a[1:]))
            try:
                logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
            finally:
                if handle is not None:
                    handle.remove()
    return F.cross_entropy(logits[0, -1:], torch.tensor([TARGET[t]])).item()


def test_recorded_context_equals_incremental_decoding(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    recorder, dense = dense_recorder(model)
    for kind in ("mlp", "heads"):
        for layer in range(units.num_layers):
            mult = [None] * units.num_layers
            mult[layer] = torch.zeros(1, 1, units.mlp_size if kind == "mlp" else units.num_heads)
            kw = {"mlp_mult": mult} if kind == "mlp" else {"head_mult": mult}
            delta = loss_changes(model, recorder, dense, **kw)[0]
            for t in (0, 2, 5):
                want = incremental_zeroed_loss(model, t, layer, kind) - dense[t].item()
                assert delta[t].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_text", "gpt2", "phi", "phi3"])
def test_gxo_predicts_single_unit_removal(make_tiny, name):
    """Removing MLP unit i at one token changes loss_t by about gxo_i (first order): the signs
    agree for the units with the largest |gxo|, and the two correlate strongly overall."""
    model = make_tiny(name)
    units = unit_map(model)
    tr = trace_gradients(model, PROMPT, TARGET).row(0)
    gxo = get_score("gxo").from_trace(tr)
    recorder, dense = dense_recorder(model)
    n = units.mlp_size
    est, real = [], []
    for layer in range(units.num_layers):
        mult = [None] * units.num_layers
        mult[layer] = 1.0 - torch.eye(n).unsqueeze(1)  # row i removes unit i: [N, 1, N]
        real.append(loss_changes(model, recorder, dense, mlp_mult=mult, rows=n).T)  # [T, N]
        est.append(gxo.mlp[:, layer])
    est, real = torch.stack(est).flatten(), torch.stack(real).flatten()
    big = est.abs() >= est.abs().quantile(0.9)
    assert (est[big].sign() == real[big].sign()).float().mean() >= 0.9
    assert torch.corrcoef(torch.stack([est, real]))[0, 1] > 0.8


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi"])
def test_head_gxo_predicts_single_head_removal(make_tiny, name):
    """Heads: -o_h . g_h (sum reduction) is the first-order loss change of removing head h."""
    model = make_tiny(name)
    units = unit_map(model)
    tr = trace_gradients(model, PROMPT, TARGET).row(0)
    gxo = get_score("gxo").from_trace(tr, head_reduction="sum")
    recorder, dense = dense_recorder(model)
    h = units.num_heads
    est, real = [], []
    for layer in range(units.num_layers):
        mult = [None] * units.num_layers
        mult[layer] = 1.0 - torch.eye(h).unsqueeze(1)  # [H, 1, H]
        real.append(loss_changes(model, recorder, dense, head_mult=mult, rows=h).T)
        est.append(gxo.heads[:, layer])
    est, real = torch.stack(est).flatten(), torch.stack(real).flatten()
    big = est.abs() >= est.abs().quantile(0.75)
    assert (est[big].sign() == real[big].sign()).float().mean() >= 0.85
    assert torch.corrcoef(torch.stack([est, real]))[0, 1] > 0.7


# -- Integrated Gradients completeness ---------------------------------------------------------------

def _completeness_errors(model, all_layers: bool, steps_list=(4, 64)):
    """max |sum of IG scores - real loss change| per step count, for MLP units and heads.

    ``ig``: per layer l, sum over its units -> L(layer l's units zeroed at token t) - L(dense).
    ``ig_all_layers``: sum over all layers' units -> L(all units of that kind zeroed) - L(dense).
    """
    units = unit_map(model)
    tr = trace_gradients(model, PROMPT, TARGET).row(0)
    recorder, dense = dense_recorder(model)
    L = units.num_layers
    groups = [list(range(L))] if all_layers else [[l] for l in range(L)]
    real = {}
    for kind, width in (("mlp", units.mlp_size), ("heads", units.num_heads)):
        for group in groups:
            mult = [torch.zeros(1, 1, width) if l in group else None for l in range(L)]
            kw = {"mlp_mult": mult} if kind == "mlp" else {"head_mult": mult}
            real[kind, tuple(group)] = loss_changes(model, recorder, dense, **kw)[0]
    errors, scale = {}, max(v.abs().max().item() for v in real.values())
    for steps in steps_list:
        ig = integrated_gradients(model, PROMPT, TARGET, tr, n_steps=steps, all_layers=all_layers,
                                  chunk=steps)  # all alphas in one batch: fast
        err = 0.0
        for kind, s in (("mlp", ig.mlp), ("heads", ig.heads)):
            for group in groups:
                total = s[:, group].sum((-1, -2))  # [T]
                err = max(err, (total - real[kind, tuple(group)]).abs().max().item())
        errors[steps] = err
    return errors, scale


# Gemma 3's sandwich norms (post_feedforward_layernorm / post_attention_layernorm) make a whole
# layer's output scale-invariant down to alpha ~ sqrt(eps): the loss jumps between alpha = 0 and
# the first Riemann point, so layer-wise completeness cannot hold for it with any practical m.
@pytest.mark.parametrize("name", ["llama", "gpt2", "phi"])
def test_ig_completeness_one_layer(make_tiny, name):
    model = make_tiny(name)
    errors, scale = _completeness_errors(model, all_layers=False)
    assert scale > 0.1  # zeroing a layer matters
    assert errors[64] < errors[4] / 8  # right Riemann rule: error ~ 1/m
    assert errors[64] < 0.05 * scale


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi"])
def test_ig_all_layers_completeness(make_tiny, name):
    model = make_tiny(name)
    errors, scale = _completeness_errors(model, all_layers=True)
    assert errors[64] < errors[4] / 8
    assert errors[64] < 0.05 * scale


def test_ig_one_step_is_gxo(llama_trace):
    """m = 1: the only Riemann point is alpha = 1, the dense gradient, so IG equals GxO."""
    model, tr = llama_trace
    gxo = get_score("gxo").from_trace(tr)
    for all_layers in (False, True):
        ig = integrated_gradients(model, PROMPT, TARGET, tr, n_steps=1, all_layers=all_layers)
        torch.testing.assert_close(ig.mlp, gxo.mlp, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ig.heads, gxo.heads, atol=1e-5, rtol=1e-4)
    via_score = score(model, PROMPT, TARGET, metrics=["ig"], ig_steps=1, trace=tr)["ig"]
    torch.testing.assert_close(via_score.mlp, gxo.mlp, atol=1e-5, rtol=1e-4)
