"""The native engine against transformers on tiny in-code models (Llama, Qwen2, Gemma 3 text).

Logits of every position of a 10-token sequence (KV cache, RoPE, Gemma's sliding window of 3 and
its two RoPE bases) within tolerance of transformers' full forward; bf16/int8 against the same
model with its weights replaced by their dequantised values; channel rules against transformers
with hooks applying the same rules; 1 and 2 threads bit-identical.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from attrsparse.core.errors import UnsupportedArchitectureError, UserError
from attrsparse.deploy.engine import ChannelRules, Engine, SiteRule, pack, unsupported_reason
from attrsparse.deploy.engine.fmt import read_header
from attrsparse.deploy.engine.pack import input_major, quantize

ARCHS = ["llama", "qwen2", "gemma3_text"]
IDS = [1, 5, 9, 3, 7, 11, 2, 4, 8, 6]
SITE_MODULES = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "attn_out": ("self_attn.o_proj",), "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
                "mlp_out": ("mlp.down_proj",)}
PROJ = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
        "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def engine_logits(path, ids=IDS, threads=1, rules=None, kept=None) -> torch.Tensor:
    rows = []
    with Engine(path, threads=threads, max_ctx=32, rules=rules) as eng:
        for tok in ids:
            eng.step(tok, logits=True)
            rows.append(torch.frombuffer(bytearray(eng.last_logits), dtype=torch.float32))
            if kept is not None:
                kept.append(eng.kept())
    return torch.stack(rows)


def hf_logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def dequantised(model, precision):
    """A copy of ``model`` whose linears, head and embedding hold the engine's dequantised weights."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            for path in PROJ:
                lin = _get(layer, path)
                lin.weight.copy_(quantize(input_major([lin.weight]), precision, dim=1)[2].t())
        head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        tied = head.data_ptr() == emb.data_ptr()
        head.copy_(quantize(head, precision, dim=0)[2])
        if not tied:
            emb.copy_(quantize(emb, precision, dim=0)[2])
    return model


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(make_tiny, tmp_path, arch, precision):
    model = make_tiny(arch)
    path = pack(model, precision, directory=tmp_path)
    got, ref = engine_logits(path), hf_logits(dequantised(model, precision))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    if precision != "fp32":  # the quantisation is really applied: plain fp32 logits differ
        assert (got - hf_logits(model)).abs().max() > 1e-3


def test_quantisation_rules():
    w = torch.randn(37, 21)
    q, s, deq = quantize(w, "int8", dim=1)
    assert q.dtype == torch.int8 and s.shape == (21,)
    assert ((deq - w).abs() <= s / 2 * (1 + 1e-6)).all()  # round to nearest, per output column
    assert q.abs().amax(0).eq(127).all()
    _, _, b = quantize(w, "bf16", dim=1)
    assert torch.equal(b, w.to(torch.bfloat16).float())


def random_rules(model, seed, keep_masks=False) -> ChannelRules:
    """A rule on every site of every layer: threshold near the median of |x - m| * a, random
    scale, center, compensation biases (and keep-masks)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dims = {"attn_in": cfg.hidden_size, "attn_out": cfg.num_attention_heads * hd, "mlp_in": cfg.hidden_size,
            "mlp_out": cfg.intermediate_size}
    sites = {}
    for layer_idx, layer in enumerate(model.model.layers):
        for site, mods in SITE_MODULES.items():
            n = dims[site]
            bias = {PROJ[m]: torch.randn(_get(layer, m).weight.shape[0], generator=gen) * 0.1 for m in mods}
            sites[(layer_idx, site)] = SiteRule(
                threshold=float(torch.rand(1, generator=gen)) * 0.5, scale=torch.rand(n, generator=gen) * 2,
                center=torch.randn(n, generator=gen) * 0.1, bias=bias,
                keep=(torch.rand(n, generator=gen) > 0.2).tolist() if keep_masks else None)
    return ChannelRules(sites)


def hooked(model, rules: ChannelRules, counts: list):
    """Hooks applying ``rules`` the slow way: x -> (x - m) * kept before each projection, the
    compensation bias after it. ``counts`` gets (layer, site, kept channels of the last token)."""
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        for site, mods in SITE_MODULES.items():
            rule = rules.get(layer_idx, site)
            for k, path in enumerate(mods):
                lin = _get(layer, path)

                def pre(module, args, rule=rule, record=k == 0, key=(layer_idx, site)):
                    x = args[0]
                    v = x - torch.as_tensor(rule.center, dtype=x.dtype)
                    kept = v.abs() * torch.as_tensor(rule.scale, dtype=x.dtype) > rule.threshold
                    if rule.keep is not None:
                        kept &= torch.as_tensor(rule.keep)
                    if record:
                        counts.append((key, int(kept[0, -1].sum())))
                    return (torch.where(kept, v, torch.zeros_like(v)),)

                def post(module, args, out, bias=rule.bias[PROJ[path]]):
                    return out + torch.as_tensor(bias, dtype=out.dtype)

                handles.append(lin.register_forward_pre_hook(pre))
                handles.append(lin.register_forward_hook(post))
    return handles


@pytest.mark.parametrize("keep_masks", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_channel_rules_match_hooked_transformers(make_tiny, tmp_path, arch, keep_masks):
    model = make_tiny(arch)
    rules = random_rules(model, seed=3, keep_masks=keep_masks)
    path = pack(model, "fp32", directory=tmp_path)
    kept: list = []
    got = engine_logits(path, rules=rules, kept=kept)
    counts: list = []
    handles = hooked(model, rules, counts)
    try:
        ref = hf_logits(model)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    assert (got - hf_logits(model)).abs().max() > 1e-2  # the rules changed something
    sites = list(SITE_MODULES)
    for (layer, site), n in counts:  # the engine's accounting: channels kept at the last token
        assert kept[-1][layer][sites.index(site)] == n
    assert 0 < sum(n for _, n in counts) < sum(len(r.scale) for r in rules.sites.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_and_two_threads_are_bit_identical(make_tiny, tmp_path, arch, precision):
    model = make_tiny(arch)
    path = pack(model, precision, directory=tmp_path)
    rules = random_rules(model, seed=5)
    for r in (None, rules):
        one, two = engine_logits(path, rules=r, threads=1), engine_logits(path, rules=r, threads=2)
        assert torch.equal(one, two)
    with Engine(path, threads=2, max_ctx=40) as eng:
        a = eng.generate(IDS[:3], 20, threads=1).tokens
        b = eng.generate(IDS[:3], 20, threads=2).tokens
    assert a == b


def test_masked_units_are_never_read(make_tiny, tmp_path):
    """Static unit masks: the masked neurons' down-projection columns and the masked heads'
    output columns hold NaN, yet the logits are finite and equal to those of the clean model."""
    model = make_tiny("llama")
    hd = model.config.hidden_size // model.config.num_attention_heads
    mlp = [[i % 3 != 0 for i in range(model.config.intermediate_size)] for _ in model.model.layers]
    heads = [[h != 1 for h in range(model.config.num_attention_heads)] for _ in model.model.layers]
    rules = ChannelRules.from_unit_masks(mlp, heads, head_dim=hd)
    clean = engine_logits(pack(model, "fp32", directory=tmp_path / "a"), rules=rules)
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        for layer, m, h in zip(poisoned.model.layers, mlp, heads):
            layer.mlp.down_proj.weight[:, ~torch.tensor(m)] = math.nan
            cols = ~torch.tensor(h).repeat_interleave(hd)
            layer.self_attn.o_proj.weight[:, cols] = math.nan
    got = engine_logits(pack(poisoned, "fp32", directory=tmp_path / "b"), rules=rules)
    assert torch.isfinite(got).all()
    assert torch.equal(got, clean)
    assert not torch.isfinite(engine_logits(pack(poisoned, "fp32", directory=tmp_path / "b"))).all()


def test_sampling(make_tiny, tmp_path):
    model = make_tiny("qwen2")
    path = pack(model, "fp32", directory=tmp_path)
    with Engine(path, threads=2, max_ctx=64) as eng:
        greedy = eng.generate(IDS[:4], 12).tokens
        assert eng.generate(IDS[:4], 12, mode="full").tokens == greedy
        assert eng.generate(IDS[:4], 12, mode="sample", temperature=0.0).tokens == greedy
        assert eng.generate(IDS[:4], 12, mode="sample", top_p=1e-6, seed=9).tokens == greedy
        runs = [eng.generate(IDS[:4], 12, mode="sample", seed=s).tokens for s in (1, 1, 2)]
        assert runs[0] == runs[1] and runs[0] != runs[2]
        # top-p: every draw lies in the nucleus computed from the logits
        eng.reset()
        for tok in IDS[:3]:
            eng.step(tok, mode=None)
        eng.step(IDS[3], logits=True)
        probs = torch.softmax(torch.frombuffer(bytearray(eng.last_logits), dtype=torch.float32) / 0.7, 0)
        order = probs.argsort(descending=True)
        n = int((probs[order].cumsum(0) < 0.6).sum()) + 1
        nucleus = set(order[:n].tolist())
        draws = set()
        for seed in range(40):
            eng.reset(seed)
            for tok in IDS[:3]:
                eng.step(tok, mode=None)
            draws.add(int(eng.step(IDS[3], mode="sample", temperature=0.7, top_p=0.6).next))
        assert draws <= nucleus and len(draws) > 1


def test_pack_reuses_checks_and_refuses(make_tiny, tmp_path):
    model = make_tiny("llama")
    path = pack(model, "int8", directory=tmp_path)
    stamp = path.stat().st_mtime_ns
    assert pack(model, "int8", directory=tmp_path) == path and path.stat().st_mtime_ns == stamp
    other = make_tiny("llama", seed=1)
    assert pack(other, "int8", directory=tmp_path) != path  # other weights, other file
    assert pack(model, "bf16", directory=tmp_path) != path
    header = read_header(path)
    assert header["config"]["precision"] == "int8" and header["weight_bytes"] < path.stat().st_size
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    with open(path, "r+b") as fh:  # a truncated file is refused, and pack rewrites it
        fh.truncate(path.stat().st_size - 64)
    with pytest.raises(UserError, match="truncated"):
        read_header(path)
    assert pack(model, "int8", directory=tmp_path) == path
    read_header(path)
    with pytest.raises(UnsupportedArchitectureError, match="transformers"):
        pack(make_tiny("gpt2"), "fp32", directory=tmp_path)
    assert "transformers" in unsupported_reason(make_tiny("phi3")) and unsupported_reason(model) is None
    with pytest.raises(UserError, match="precision"):
        pack(model, "fp8", directory=tmp_path)


def test_runner_errors(make_tiny, tmp_path):
    model = make_tiny("llama")
    path = pack(model, "fp32", directory=tmp_path)
    with Engine(path, threads=1, max_ctx=8) as eng:
        with pytest.raises(UserError, match="context"):
            eng.generate(IDS[:4], 6)
        with pytest.raises(UserError, match="vocabulary"):
            eng.step(10_000)
        stop = eng.generate(IDS[:2], 5).tokens[1]
        assert eng.generate(IDS[:2], 5, stop_ids=[stop]).tokens[-1] == stop
        with pytest.raises(UserError, match="entries"):
            eng.set_rules(ChannelRules({(0, "mlp_out"): SiteRule(threshold=0.1, scale=[1.0] * 3)}))
        with pytest.raises(UserError, match="site"):
            eng.set_rules(ChannelRules({(0, "mlp"): SiteRule(threshold=0.1)}))
        with pytest.raises(UserError, match="feeds"):
            eng.set_rules(ChannelRules({(0, "attn_in"): SiteRule(bias={"o": [0.0] * 32})}))
