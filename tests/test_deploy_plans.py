"""One-token plans of the gathered runtime: the C library chooses a layer's units (a native
predictor, or fixed masks) and runs its gathered projections in the same call.

Checked against the Python :class:`PredictorChooser` on the same block inputs (the same units,
ties aside) and against masked dense computation with the masks the runtime recorded.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_tiny

from attrsparse import UnitMasks, unit_map
from attrsparse.core.decoding import left_pad
from attrsparse.core.hooks import UnitHooks
from attrsparse.deploy.gathered import GatheredIn, GatheredMLP
from attrsparse.deploy.kernels import CBackend, gather_backend
from attrsparse.deploy.runtime import SparseRuntime
from attrsparse.selectors.budget import BudgetRule
from attrsparse.selectors.chooser import StaticChooser
from attrsparse.selectors.predictor import Predictor
from attrsparse.selectors.topk import unit_ranks

C = gather_backend("auto")
needs_c = pytest.mark.skipif(not isinstance(C, CBackend), reason="C kernels unavailable")


@needs_c
@pytest.mark.parametrize("K", [1, 9, 48, 1536])
def test_select_top_k_is_the_stable_descending_rank(K):
    """Ties (integer-valued scores from a small range, signed zeros) go to the lower index, as
    ``unit_ranks``; infinities rank at their ends."""
    gen = torch.Generator().manual_seed(K)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), -1.0, 1.0])  # -0.0 ties with 0.0
    signed = special[torch.randint(0, 6, (K,), generator=gen)]
    for scores in (torch.randint(-3, 4, (K,), generator=gen).float(), torch.randn(K, generator=gen), signed):
        for k in sorted({0, 1, K // 3, K // 2, K - 1, K, K + 2}):
            assert torch.equal(C.top_k(scores, k), unit_ranks(scores) < k), (K, k)


def test_budget_table_is_mlp_count(make_tiny):
    """Every (heads, groups) entry of the C library's table is the rule's own count."""
    units = unit_map(make_tiny("llama"))  # 4 heads in 2 groups
    rule = BudgetRule(units, 0.4)
    table = rule.mlp_budget_table().view(units.num_heads + 1, units.num_kv_heads + 1)
    for bits in range(2 ** units.num_heads):
        heads = torch.tensor([bool(bits >> h & 1) for h in range(units.num_heads)])
        groups = int(heads.view(units.num_kv_heads, -1).any(-1).sum())
        assert table[int(heads.sum()), groups] == rule.mlp_count(heads, ())
    assert table[rule.head_keep, units.num_kv_heads] == rule.mlp_count(None, ())


def decode(model, chooser, prompt, steps, break_even):
    """Prefill + ``steps`` greedy steps with a cache under the runtime (C backend). Returns the
    logits ``[steps + 1, V]``, the tokens, the runtime and per call the block inputs each
    gathered module received: ``{("heads" | "mlp", layer): x [rows, d]}``."""
    from transformers import DynamicCache

    ids, attn = left_pad([prompt], 0)
    cache = DynamicCache(config=model.config)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    logits, tokens, inputs = [], [], []
    with torch.no_grad(), SparseRuntime(model, chooser, break_even=break_even, backend="c") as rt:
        planned = all(g.plan is not None and g.native for pair in rt.groups for g in pair)
        hooks = []
        for m in model.modules():
            if isinstance(m, (GatheredMLP, GatheredIn)):  # the first projection of each block
                key = (m.group.kind, m.group.layer)
                hooks.append(m.register_forward_pre_hook(
                    lambda _m, args, key=key: inputs[-1].__setitem__(key, args[0].reshape(-1, args[0].shape[-1]).clone())))
        for _ in range(steps + 1):
            inputs.append({})
            generated = torch.zeros_like(ids, dtype=torch.bool)
            generated[:, -1] = True
            rt.begin(attn[:, -ids.shape[1]:], generated)
            out = model(input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache).logits[0, -1]
            rt.end()
            logits.append(out)
            ids = out.argmax().view(1, 1)
            tokens.append(ids.view(1))
            attn = torch.cat([attn, torch.ones_like(ids)], 1)
            positions = positions[:, -1:] + 1
        for h in hooks:
            h.remove()
    return torch.stack(logits), torch.cat(tokens), rt, inputs, planned


def masked_replay(model, prompt, tokens, rt):
    """One dense pass with the masks the runtime recorded at every position: logits from the
    prompt's last position on ``[steps + 1, V]``."""
    p, gen = prompt.numel(), rt._gen_masks
    first = rt._prompt_masks[0] if rt._prompt_masks else UnitMasks(gen[0].mlp[:0], gen[0].heads[:0])
    mlp = torch.cat([first.mlp] + [m.mlp for m in gen]).unsqueeze(0)  # [1, S, L, N]
    heads = torch.cat([first.heads] + [m.heads for m in gen]).unsqueeze(0)
    full = torch.cat([prompt, tokens[:-1]]).unsqueeze(0)
    with torch.no_grad(), UnitHooks(model) as hooks:
        hooks.mlp_mult, hooks.head_mult = mlp, heads
        return model(input_ids=full).logits[0, p - 1:]


def assert_same_units(got: torch.Tensor, want: torch.Tensor, logits: torch.Tensor, what: str):
    """Equal keep-masks, except units swapped at a tie (logits within 1e-5 of each other)."""
    if torch.equal(got, want):
        return
    assert got.sum() == want.sum(), what
    only_got, only_want = logits[got & ~want], logits[want & ~got]
    assert (only_got.min() - only_want.max()).abs() < 1e-5 * (1 + logits.abs().max()), what


@needs_c
@pytest.mark.parametrize("allocation", ["uniform", "per-layer"])
@pytest.mark.parametrize("break_even", [1.0, 0.0], ids=["gathered", "dense-fallback"])
@pytest.mark.parametrize("name", ARCHS)
def test_native_predictor_picks_the_python_choosers_units(name, break_even, allocation):
    """Decoding under the predictor chosen in C: at every one-token call and layer the heads and
    MLP units are those the Python chooser picks from the same block inputs, and the logits equal
    masked dense computation with the recorded masks (both with the gathered kernels and with
    every call falling back to dense; one ratio everywhere, or a budget per layer)."""
    model = build_tiny(name)
    units = unit_map(model)
    torch.manual_seed(3)
    predictor = Predictor.for_units(units, model.config.get_text_config().hidden_size, rank=8, head_rank=4)
    prompt = torch.tensor([5, 9, 11, 7, 20, 3])
    layer_ratios = None if allocation == "uniform" else \
        [0.25 + 0.6 * l / max(1, units.num_layers - 1) for l in range(units.num_layers)]
    chooser = predictor.chooser(0.4, units, layer_ratios)
    logits, tokens, rt, inputs, planned = decode(model, chooser, prompt, 4, break_even)
    has_mlp_module = name != "opt"  # OPT's MLP is inlined in its decoder layer: no one-token plan
    assert planned == has_mlp_module
    python = predictor.chooser(0.4, units, layer_ratios)
    for call, (x, masks) in enumerate(zip(inputs[1:], rt._gen_masks[1:]), start=1):
        for l in range(units.num_layers):
            heads = python.choose_heads(l, x["heads", l])
            assert_same_units(masks.heads[0, l], heads[-1], predictor.head_logits(l, x["heads", l])[-1],
                              f"call {call} layer {l} heads")
            mlp = python.choose_mlp(l, x["mlp", l])
            assert_same_units(masks.mlp[0, l], mlp[-1], predictor.mlp_logits(l, x["mlp", l])[-1],
                              f"call {call} layer {l} mlp")
    torch.testing.assert_close(logits, masked_replay(model, prompt, tokens, rt), atol=1e-5, rtol=1e-5)
    assert rt.executed.tokens == 5
    if break_even == 0.0:
        assert rt.computed_fraction == pytest.approx(1.0)
    else:
        assert rt.computed_fraction < 1.0


@needs_c
@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3"])
def test_fixed_masks_run_in_the_plans(name):
    """Static masks live in the plans' keep buffers (no chooser call per token); decoding equals
    masked dense computation and the executed ratio is the masks' own."""
    model = build_tiny(name)
    units = unit_map(model)
    gen = torch.Generator().manual_seed(1)
    masks = UnitMasks(torch.rand(units.num_layers, units.mlp_size, generator=gen) < 0.5,
                      torch.rand(units.num_layers, units.num_heads, generator=gen) < 0.5)
    prompt = torch.tensor([4, 8, 15, 16, 23])
    logits, tokens, rt, _, planned = decode(model, StaticChooser(masks), prompt, 3, 1.0)
    assert planned
    torch.testing.assert_close(logits, masked_replay(model, prompt, tokens, rt), atol=1e-5, rtol=1e-5)
    for m in rt._gen_masks:
        assert torch.equal(m.mlp[0], masks.mlp) and torch.equal(m.heads[0], masks.heads)
