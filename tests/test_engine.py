"""The native engine against transformers on tiny in-code models (Llama, Qwen2, Gemma 3 text).

Logits of every position of a 10-token sequence (KV cache, RoPE, Gemma's sliding window of 3 and
its two RoPE bases) within tolerance of transformers' full forward; bf16/int8 against the same
model with its weights replaced by their dequantised values; channel rules against transformers
with hooks applying the same rules (shared and per-projection decisions); 1 and 2 threads
bit-identical.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from attrsparse.core.errors import UnsupportedArchitectureError, UserError
from attrsparse.deploy.engine import ChannelRules, Engine, SiteRule, pack, unsupported_reason
from attrsparse.deploy.engine.fmt import FORMAT_VERSION, read_header
from attrsparse.deploy.engine.pack import input_major, quantize
from attrsparse.deploy.engine.runner import KV_CACHES, default_kv_cache
from attrsparse.deploy.engine.sites import PROJECTIONS, SITE_PROJECTIONS

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


def engine_logits(path, ids=IDS, threads=1, rules=None, kept=None, kv_cache=None) -> torch.Tensor:
    rows = []
    with Engine(path, threads=threads, max_ctx=32, rules=rules, kv_cache=kv_cache) as eng:
        for tok in ids:
            eng.step(tok, logits=True)
            rows.append(torch.frombuffer(bytearray(eng.last_logits), dtype=torch.float32))
            if kept is not None:
                kept.append(eng.kept())
    return torch.stack(rows)


def hf_logits(model, ids=IDS, kv_cache="fp32") -> torch.Tensor:
    """transformers' logits at every position; ``kv_cache="bf16"``: one token at a time, the cache
    rounded to bf16 after each step (so each position attends to its own fp32 key and value and to
    the earlier ones rounded, as the engine's bf16 cache does)."""
    with torch.no_grad():
        if kv_cache == "fp32":
            return model(torch.tensor([ids])).logits[0].float()
        rows, cache = [], None
        for tok in ids:
            out = model(torch.tensor([[tok]]), cache=cache, use_cache=True)
            cache = out.cache
            for layer in cache.layers:
                layer.keys.copy_(layer.keys.to(torch.bfloat16))
                layer.values.copy_(layer.values.to(torch.bfloat16))
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)


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
    """Every precision with either KV cache against transformers on the dequantised weights (with
    the bf16 cache: its cache rounded after each step); the default cache is the precision's."""
    model = make_tiny(arch)
    path = pack(model, precision, directory=tmp_path)
    reference = dequantised(model, precision)
    got = {}
    for kv in KV_CACHES:
        got[kv], ref = engine_logits(path, kv_cache=kv), hf_logits(reference, kv_cache=kv)
        assert got[kv].shape == ref.shape
        if kv == "fp32":
            torch.testing.assert_close(got[kv], ref, atol=3e-5, rtol=1e-4)
        else:  # a key computed 1 fp32 ulp apart can round to the neighbouring bf16 value: measured
            # up to 4.6e-4 (Gemma, bf16 weights), 1e-6 elsewhere; the two caches differ by >= 1.9e-3
            assert float((got[kv] - ref).abs().median()) < 3e-5
            torch.testing.assert_close(got[kv], ref, atol=6e-4, rtol=0)
    assert (got["fp32"] - got["bf16"]).abs().max() > 1.5e-3  # the bf16 cache is really rounded
    assert torch.equal(engine_logits(path), got[default_kv_cache(precision)])
    if precision != "fp32":  # the quantisation is really applied: plain fp32 logits differ
        assert (got["fp32"] - hf_logits(model)).abs().max() > 1e-3


def test_quantisation_rules():
    w = torch.randn(37, 21)
    q, s, deq = quantize(w, "int8", dim=1)
    assert q.dtype == torch.int8 and s.shape == (21,)
    assert ((deq - w).abs() <= s / 2 * (1 + 1e-6)).all()  # round to nearest, per output column
    assert q.abs().amax(0).eq(127).all()
    _, _, b = quantize(w, "bf16", dim=1)
    assert torch.equal(b, w.to(torch.bfloat16).float())


def random_rules(model, seed, keep_masks=False, per_projection=False) -> ChannelRules:
    """A rule on every site of every layer: threshold near the median of |x - m| * a, random
    scale, center, compensation biases (and keep-masks). ``per_projection``: attn_in and mlp_in
    get a threshold and a scale per projection instead (q, k, v and gate, up decide on their own)."""
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
            rule = SiteRule(
                threshold=float(torch.rand(1, generator=gen)) * 0.5, scale=torch.rand(n, generator=gen) * 2,
                center=torch.randn(n, generator=gen) * 0.1, bias=bias,
                keep=(torch.rand(n, generator=gen) > 0.2).tolist() if keep_masks else None)
            if per_projection and len(mods) > 1:
                rule.threshold = rule.scale = None
                rule.thresholds = {PROJ[m]: float(torch.rand(1, generator=gen)) * 0.8 for m in mods}
                rule.scales = {PROJ[m]: torch.rand(n, generator=gen) * 2 for m in mods}
            sites[(layer_idx, site)] = rule
    return ChannelRules(sites)


def hooked(model, rules: ChannelRules, counts: list):
    """Hooks applying ``rules`` the slow way: x -> (x - m) * kept before each projection (its own
    test), the compensation bias after it. ``counts`` gets (layer, projection, kept channels of the
    last token)."""
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        for site, mods in SITE_MODULES.items():
            rule = rules.get(layer_idx, site)
            for path in mods:
                lin = _get(layer, path)

                def pre(module, args, rule=rule, proj=PROJ[path], layer_idx=layer_idx):
                    x = args[0]
                    v = x - torch.as_tensor(rule.center, dtype=x.dtype)
                    threshold, scale = rule.projection_test(proj)
                    kept = v.abs() * torch.as_tensor(scale, dtype=x.dtype) > threshold
                    if rule.keep is not None:
                        kept &= torch.as_tensor(rule.keep)
                    counts.append(((layer_idx, proj), int(kept[0, -1].sum())))
                    return (torch.where(kept, v, torch.zeros_like(v)),)

                def post(module, args, out, bias=rule.bias[PROJ[path]]):
                    return out + torch.as_tensor(bias, dtype=out.dtype)

                handles.append(lin.register_forward_pre_hook(pre))
                handles.append(lin.register_forward_hook(post))
    return handles


@pytest.mark.parametrize("per_projection", [False, True])
@pytest.mark.parametrize("keep_masks", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_channel_rules_match_hooked_transformers(make_tiny, tmp_path, arch, keep_masks, per_projection):
    model = make_tiny(arch)
    rules = random_rules(model, seed=3, keep_masks=keep_masks, per_projection=per_projection)
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
    for (layer, proj), n in counts:  # the engine's accounting: channels each projection kept at the last token
        assert kept[-1][layer][PROJECTIONS.index(proj)] == n
    assert 0 < sum(n for _, n in counts) < sum(len(r.center) * len(SITE_PROJECTIONS[s])
                                               for (_, s), r in rules.sites.items())
    last = kept[-1]
    qkv = {tuple(row[:3]) for row in last} | {tuple(row[4:6]) for row in last}
    if per_projection:  # the projections of a site really decided differently
        assert any(len(set(t)) > 1 for t in qkv)
    else:
        assert all(len(set(t)) == 1 for t in qkv)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_one_and_two_threads_are_bit_identical(make_tiny, tmp_path, arch, precision):
    model = make_tiny(arch)
    path = pack(model, precision, directory=tmp_path)
    rules = random_rules(model, seed=5)
    per_projection = random_rules(model, seed=5, per_projection=True)
    for r in (None, rules, per_projection):
        one, two = engine_logits(path, rules=r, threads=1), engine_logits(path, rules=r, threads=2)
        assert torch.equal(one, two)
        assert torch.equal(engine_logits(path, rules=r, threads=3), one)
    with Engine(path, threads=2, max_ctx=40) as eng:
        for r in (None, per_projection):
            eng.set_rules(r)
            a = eng.generate(IDS[:3], 20, threads=1)
            b = eng.generate(IDS[:3], 20, threads=2)
            assert a.tokens == b.tokens and a.linear_reads == b.linear_reads


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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_per_projection_skipped_columns_are_never_read(make_tiny, tmp_path, precision):
    """A per-projection rule whose scale is 0 on a different channel set for each of q, k, v and
    gate, up (so that projection never keeps them, at any token): only that projection's weight
    columns of those channels hold NaN, yet the logits are finite and equal to the clean model's.
    A channel q skips is kept by k, so a shared decision or a read of the whole q|k|v (gate|up)
    row would meet the NaN."""
    model = make_tiny("qwen2")
    gen = torch.Generator().manual_seed(11)
    d = model.config.hidden_size
    sites, skip = {}, {}
    for l, layer in enumerate(model.model.layers):
        for site in ("attn_in", "mlp_in"):
            rule = SiteRule()
            for path in SITE_MODULES[site]:
                z = torch.rand(d, generator=gen) < 0.4
                skip[(l, path)] = z
                rule.scales[PROJ[path]] = torch.where(z, 0.0, torch.rand(d, generator=gen) + 0.5)
                rule.thresholds[PROJ[path]] = float(torch.rand(1, generator=gen)) * 0.3
            sites[(l, site)] = rule
    rules = ChannelRules(sites)
    assert bool((skip[(0, "self_attn.q_proj")] & ~skip[(0, "self_attn.k_proj")]).any())
    assert bool((skip[(0, "mlp.gate_proj")] & ~skip[(0, "mlp.up_proj")]).any())
    kept: list = []
    clean = engine_logits(pack(model, precision, directory=tmp_path / "a"), rules=rules, kept=kept)
    assert all(k[PROJECTIONS.index("q")] < d and k[PROJECTIONS.index("up")] < d for k in kept[-1])
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        for (l, path), z in skip.items():
            _get(poisoned.model.layers[l], path).weight[:, z] = math.nan
    path = pack(poisoned, precision, directory=tmp_path / "b")
    got = engine_logits(path, rules=rules)
    assert torch.isfinite(got).all()
    assert torch.equal(got, clean)
    assert not torch.isfinite(engine_logits(path)).all()  # dense reads the poison
    shared = ChannelRules({key: SiteRule(threshold=0.0) for key in sites})  # one decision: reads it too
    assert not torch.isfinite(engine_logits(path, rules=shared)).all()


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
    with open(path, "r+b") as fh:  # a file of another format version (1: gate/up interleaved) is refused
        fh.seek(8)
        fh.write((1).to_bytes(4, "little"))
    with pytest.raises(UserError, match=f"engine format 1, this attrsparse reads {FORMAT_VERSION}; pack the model again"):
        Engine(path)
    assert FORMAT_VERSION == 2 and pack(model, "int8", directory=tmp_path) == path  # and rewritten
    assert read_header(path)["format"] == FORMAT_VERSION
    with pytest.raises(UnsupportedArchitectureError, match="transformers"):
        pack(make_tiny("gpt2"), "fp32", directory=tmp_path)
    assert "transformers" in unsupported_reason(make_tiny("phi3")) and unsupported_reason(model) is None
    with pytest.raises(UserError, match="precision"):
        pack(model, "fp8", directory=tmp_path)


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc/self/status")
def test_unused_context_is_not_resident(make_tiny, tmp_path):
    """A KV cache of a million positions (256 MB on this model, fp32) costs only the positions used:
    the cache and the per-thread score rows are zero pages until written."""
    path = pack(make_tiny("llama"), "fp32", directory=tmp_path)
    before = _rss_kb()
    with Engine(path, threads=2, max_ctx=1_000_000, kv_cache="fp32") as eng:
        first = eng.generate(IDS[:3], 8).tokens
        assert _rss_kb() - before < 16_000
    with Engine(path, threads=2, max_ctx=32, kv_cache="fp32") as eng:
        assert eng.generate(IDS[:3], 8).tokens == first


def test_runner_errors(make_tiny, tmp_path):
    model = make_tiny("llama")
    path = pack(model, "fp32", directory=tmp_path)
    with pytest.raises(UserError, match="kv_cache must be one of fp32, bf16, got 'fp16'"):
        Engine(path, threads=1, max_ctx=8, kv_cache="fp16")
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
        with pytest.raises(UserError, match="thresholds for 'down'; this site feeds gate, up"):
            eng.set_rules(ChannelRules({(0, "mlp_in"): SiteRule(thresholds={"down": 0.1})}))
        with pytest.raises(UserError, match=r"scales\['k'\] has 3 entries"):
            eng.set_rules(ChannelRules({(0, "attn_in"): SiteRule(thresholds={"k": 0.1}, scales={"k": [1.0] * 3})}))
