"""The input-sparse LM head (``pack(..., head_layout="input")`` and ``ChannelRules.head``).

The head stored input-major runs as one more input-sparse linear: without a rule its logits are
transformers' (tied embeddings read from its columns); with a rule they are those of transformers
with the same rule applied to the head's input by a hook; skipped channels' weights are never read
(NaN there leaves the logits unchanged); ``check`` mode gives the argmax of the head with every
channel kept; 1 and 2 threads are bit-identical; the accounting counts kept channels x vocabulary.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_engine import ARCHS, IDS, dequantised, engine_logits, hf_logits

from attrsparse.core.errors import UserError
from attrsparse.deploy.engine import ChannelRules, Engine, SiteRule, pack
from attrsparse.deploy.engine.fmt import read_header
from attrsparse.deploy.engine.head_rule import calibrate_head, head_scale, head_statistics
from attrsparse.deploy.engine.pack import quantize


def head_rule(model, seed: int, keep: bool = False) -> SiteRule:
    """A head rule with a threshold near the median of |h - m| * a on the tiny models, a random
    scale, center and compensation bias (and a fixed keep-mask)."""
    gen = torch.Generator().manual_seed(seed)
    d, V = model.config.hidden_size, model.config.vocab_size
    return SiteRule(threshold=0.4, scale=torch.rand(d, generator=gen) * 2, center=torch.randn(d, generator=gen) * 0.1,
                    bias={"head": torch.randn(V, generator=gen) * 0.1},
                    keep=(torch.rand(d, generator=gen) > 0.3).tolist() if keep else None)


def hooked_head_logits(model, rule: SiteRule, kept: list) -> torch.Tensor:
    """transformers' logits with ``rule`` applied to the head's input the slow way."""
    head = model.get_output_embeddings()

    def pre(module, args):
        h = args[0]
        v = h - torch.as_tensor(rule.center, dtype=h.dtype)
        mask = v.abs() * torch.as_tensor(rule.scale, dtype=h.dtype) > rule.threshold
        if rule.keep is not None:
            mask &= torch.as_tensor(rule.keep)
        kept.extend(int(n) for n in mask[0].sum(-1))
        return (torch.where(mask, v, torch.zeros_like(v)),)

    def post(module, args, out):
        return out + torch.as_tensor(rule.bias["head"], dtype=out.dtype)

    handles = [head.register_forward_pre_hook(pre), head.register_forward_hook(post)]
    try:
        return hf_logits(model)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_input_major_head_matches_transformers(make_tiny, tmp_path, arch, precision):
    """No rule: transformers' logits (Gemma's tied embedding read from the head's columns); the
    file has no screen and the head is [hidden, vocab]."""
    model = make_tiny(arch)
    path = pack(model, precision, head_layout="input", directory=tmp_path)
    header = read_header(path)
    assert header["config"]["head_layout"] == "input" and "screen" not in header["tensors"]
    assert header["tensors"]["head"]["shape"] == [model.config.hidden_size, model.config.vocab_size]
    got = engine_logits(path, kv_cache="fp32")
    torch.testing.assert_close(got, hf_logits(dequantised(model, precision)), atol=3e-5, rtol=1e-4)
    rows = engine_logits(pack(model, precision, directory=tmp_path), kv_cache="fp32")
    torch.testing.assert_close(got, rows, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_head_rule_matches_hooked_transformers(make_tiny, tmp_path, arch, precision):
    model = make_tiny(arch)
    rule = head_rule(model, seed=5)
    path = pack(model, precision, head_layout="input", directory=tmp_path)
    reference = dequantised(model, precision)
    kept: list = []
    want = hooked_head_logits(reference, rule, kept)
    got = engine_logits(path, rules=ChannelRules(head=rule), kv_cache="fp32")
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    assert (got - engine_logits(path, kv_cache="fp32")).abs().max() > 1e-2  # the rule changed something
    V, d = model.config.vocab_size, model.config.hidden_size
    assert 0 < sum(kept) < d * len(kept)
    elt = {"fp32": 4, "int8": 1}[precision]
    with Engine(path, threads=2, max_ctx=32, rules=ChannelRules(head=rule), kv_cache="fp32") as eng:
        gen = eng.generate(IDS, 1, mode="check")
    assert gen.head_bytes == [kept[-1] * V * elt] and gen.candidates == [V]
    assert gen.head_cost == pytest.approx(kept[-1] / d)
    assert gen.tokens[0] == int(want[-1].argmax())
    assert gen.checks[0] == int(engine_logits(path, kv_cache="fp32")[-1].argmax())


def test_check_mode_gives_both_argmaxes(make_tiny, tmp_path):
    """A rule strong enough to change the greedy tokens: ``check`` reports the full head's argmax,
    which differs from the sparse one on some token, and equals the rule-less run's token there."""
    model = make_tiny("llama")
    path = pack(model, "fp32", head_layout="input", directory=tmp_path)
    rules = ChannelRules(head=SiteRule(threshold=0.8))
    with Engine(path, threads=2, max_ctx=32, rules=rules) as eng:
        sparse, full = [], []
        for tok in IDS:
            a = eng.step(tok, mode="check")
            sparse.append(int(a.next))
            full.append(int(a.check))
    dense = engine_logits(path).argmax(-1).tolist()
    assert full == dense and sparse != full


def test_skipped_head_channels_are_never_read(make_tiny, tmp_path):
    """A fixed keep-mask and a threshold on the head (untied Llama): the head's weights of the
    masked channels hold NaN, yet the logits are finite and equal to the clean model's."""
    model = make_tiny("llama")
    rules = ChannelRules(head=head_rule(model, seed=7, keep=True))
    clean = engine_logits(pack(model, "bf16", head_layout="input", directory=tmp_path / "a"), rules=rules)
    poisoned = copy.deepcopy(model)
    masked = ~torch.tensor(rules.head.keep)
    with torch.no_grad():
        poisoned.lm_head.weight[:, masked] = math.nan
    path = pack(poisoned, "bf16", head_layout="input", directory=tmp_path / "b")
    got = engine_logits(path, rules=rules)
    assert torch.isfinite(got).all() and torch.equal(got, clean)
    assert not torch.isfinite(engine_logits(path)).all()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_sparse_head_threads_bit_identical(make_tiny, tmp_path, precision):
    model = make_tiny("gemma3_text")
    path = pack(model, precision, head_layout="input", directory=tmp_path)
    rules = ChannelRules(head=head_rule(model, seed=9))
    assert torch.equal(engine_logits(path, threads=1, rules=rules), engine_logits(path, threads=2, rules=rules))


def test_sparse_head_errors(make_tiny, tmp_path):
    model = make_tiny("llama")
    rows = pack(model, "fp32", directory=tmp_path)
    with pytest.raises(UserError, match="stores its head by vocabulary rows"):
        Engine(rows, rules=ChannelRules(head=SiteRule(threshold=0.1)))
    with pytest.raises(UserError, match="has no screen"):
        pack(model, "fp32", screen=True, head_layout="input", directory=tmp_path)
    with pytest.raises(UserError, match="head_layout must be one of"):
        pack(model, "fp32", head_layout="columns", directory=tmp_path)
    path = pack(model, "fp32", head_layout="input", directory=tmp_path)
    assert path != rows
    with pytest.raises(UserError, match="the head's channel rule: scale has 3 entries"):
        Engine(path, rules=ChannelRules(head=SiteRule(threshold=0.1, scale=[1.0, 2.0, 3.0])))
    with pytest.raises(UserError, match="bias for 'down'"):
        Engine(path, rules=ChannelRules(head=SiteRule(threshold=0.1, bias={"down": [0.0]})))


def test_head_calibration(make_tiny, tmp_path):
    """The attribution is the next-token loss's gradient at the head's input (hand-computed:
    (softmax(W h) - onehot(next)) W); the scale is its h^2-weighted RMS; the engine, run on the
    calibration tokens under each calibrated rule, reads the requested fraction of the head within
    0.01; ratio 1 is dense and a ratio outside (0, 1] is refused."""
    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, model.config.vocab_size, (24,), generator=gen) for _ in range(6)]
    h, g, targets = head_statistics(model, seqs, batch_size=4)
    assert h.shape == g.shape == (6 * 23, model.config.hidden_size)
    W = model.lm_head.weight.detach().double()
    assert torch.equal(targets, torch.cat([s[1:] for s in seqs]))
    want = torch.softmax(h @ W.T, -1) - torch.nn.functional.one_hot(targets, W.shape[0]).double()
    torch.testing.assert_close(g, want @ W, atol=1e-5, rtol=1e-4)
    a = head_scale(h, g)
    j = 3
    assert float(a[j]) == pytest.approx(math.sqrt(float((h[:, j] ** 2 * g[:, j] ** 2).sum() / (h[:, j] ** 2).sum())))
    rules = calibrate_head(model, seqs, [0.3, 0.6, 1.0], center=False)
    assert rules[0.3].center is None and not rules[0.3].bias
    assert rules[1.0].is_dense()
    path = pack(model, "fp32", head_layout="input", directory=tmp_path)
    d = model.config.hidden_size
    for ratio in (0.3, 0.6):
        with Engine(path, threads=2, max_ctx=32, rules=ChannelRules(head=rules[ratio]), kv_cache="fp32") as eng:
            kept = []
            for s in seqs:
                eng.reset()
                for tok in s[:-1].tolist():
                    kept.append(eng.step(tok, mode="full").head_bytes / (4 * model.config.vocab_size))
        assert sum(kept) / len(kept) / d == pytest.approx(ratio, abs=0.01)
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="head ratio must be in"):
            calibrate_head(model, seqs, [bad])


def test_centred_head_calibration_compensates(make_tiny, tmp_path):
    """``center=True``: the rule decides on h - E[h] and adds W E[h] (the head as stored, int8 here)
    as its bias, so a token whose every channel is dropped gets the logits of the mean hidden
    state; the engine still reads the requested fraction on the calibration tokens."""
    model = make_tiny("gemma3_text")
    gen = torch.Generator().manual_seed(6)
    seqs = [torch.randint(3, model.config.vocab_size, (20,), generator=gen) for _ in range(5)]
    rule = calibrate_head(model, seqs, [0.5], center=True, precision="int8")[0.5]
    mean = head_statistics(model, seqs)[0].mean(0).float()
    assert rule.center is not None
    torch.testing.assert_close(torch.tensor(rule.center), mean)
    stored = quantize(model.get_output_embeddings().weight, "int8", dim=0)[2]
    torch.testing.assert_close(torch.tensor(rule.bias["head"]), stored @ mean, atol=1e-5, rtol=1e-5)
    path = pack(model, "int8", head_layout="input", directory=tmp_path)
    kept = []
    with Engine(path, threads=2, max_ctx=32, rules=ChannelRules(head=rule), kv_cache="fp32") as eng:
        for s in seqs:
            eng.reset()
            for tok in s[:-1].tolist():
                kept.append(eng.step(tok, mode="full").head_bytes / model.config.vocab_size)
    assert sum(kept) / len(kept) / model.config.hidden_size == pytest.approx(0.5, abs=0.01)
    dropped = SiteRule(threshold=1e30, scale=rule.scale, center=rule.center, bias=rule.bias)
    got = engine_logits(path, rules=ChannelRules(head=dropped), kv_cache="fp32")
    torch.testing.assert_close(got, (stored @ mean).expand_as(got), atol=1e-5, rtol=1e-5)


def test_head_calibration_chooses_centring_on_held_out_calibration_text(make_tiny, tmp_path):
    """By default each ratio gets the centred or the plain rule, whichever has the lower next-token
    loss on the last quarter of the calibration sequences when fitted on the others (checked here
    with the engine's own logits), and is then fitted on every sequence."""
    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(3, model.config.vocab_size, (16,), generator=gen) for _ in range(8)]
    ratios = [0.3, 0.5, 0.7]
    path = pack(model, "fp32", head_layout="input", directory=tmp_path)
    auto = calibrate_head(model, seqs, ratios)
    for ratio in ratios:
        loss = {}
        for center in (False, True):
            rule = calibrate_head(model, seqs[:6], [ratio], center=center)[ratio]
            nll = []
            for s in seqs[6:]:
                logits = engine_logits(path, ids=s[:-1].tolist(), rules=ChannelRules(head=rule), kv_cache="fp32")
                nll.append(torch.nn.functional.cross_entropy(logits.double(), s[1:], reduction="none"))
            loss[center] = float(torch.cat(nll).mean())
        assert abs(loss[True] - loss[False]) > 1e-4  # a real choice
        want = calibrate_head(model, seqs, [ratio], center=loss[True] < loss[False])[ratio]
        assert auto[ratio] == want
