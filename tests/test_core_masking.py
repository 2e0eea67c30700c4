"""apply_masks: static masks equal zeroed weights; schedules equal a hand-written masked decoding
loop (paper-notes §5.6: prefill dense except its last position, step k uses row k); batched
schedules equal separate runs; the handle's accounting equals executed_ratio of the rows used."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS
from transformers import DynamicCache

from attrsparse import UnitMasks, apply_masks, executed_ratio, unit_map
from attrsparse.core.units import zero_head_, zero_mlp_unit_

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 40, 41]])
PROMPTS = torch.tensor([[1, 5, 9, 17, 33], [1, 60, 22, 3, 14]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_masks(units, *leading, p=0.5, seed=0) -> UnitMasks:
    gen = torch.Generator().manual_seed(seed)
    mlp = torch.rand(*leading, units.num_layers, units.mlp_size, generator=gen) < p
    heads = torch.rand(*leading, units.num_layers, units.num_heads, generator=gen) < p
    heads[..., 0] = True  # keep at least one head (not required; keeps outputs informative)
    return UnitMasks(mlp, heads)


# -- static masks --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ARCHS)
def test_static_mlp_mask_equals_zeroed_columns(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    masks = UnitMasks.dense(units)
    zeroed = copy.deepcopy(model)
    for layer in range(units.num_layers):
        for unit in (layer, 7 + 3 * layer, units.mlp_size - 1):
            masks.mlp[layer, unit] = False
            zero_mlp_unit_(zeroed, layer, unit)
    with apply_masks(model, masks):
        masked = logits(model)
    assert torch.equal(masked, logits(zeroed))
    assert (masked - logits(model)).abs().max() > 1e-4  # the mask does something


@pytest.mark.parametrize("name", ARCHS)
def test_static_head_mask_equals_zero_head(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    for layer, head in [(0, 1), (units.num_layers - 1, units.num_heads - 1)]:
        masks = UnitMasks.dense(units)
        masks.heads[layer, head] = False
        zeroed = copy.deepcopy(model)
        zero_head_(zeroed, layer, head)
        with apply_masks(model, masks):
            masked = logits(model)
        assert torch.equal(masked, logits(zeroed)), (layer, head)
        assert (masked - logits(model)).abs().max() > 1e-4


def test_static_accounting_counts_every_position(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    masks = random_masks(units)
    with apply_masks(model, masks) as handle:
        logits(model, IDS.expand(2, -1))
    want = executed_ratio(masks, units)
    assert handle.executed.tokens == 2 * IDS.shape[1]
    assert handle.executed.param == pytest.approx(want.param)
    assert handle.executed.mlp == pytest.approx(want.mlp)


# -- schedules -------------------------------------------------------------------------------------

class ManualMasks:
    """Hand-written pre-hooks: ``self.row`` = None (dense) or (mlp [B|1, L, N], heads [B|1, L, H])."""

    def __init__(self, model):
        self.units = unit_map(model)
        self.row = None
        self.handles = []
        for layer, (down, out) in enumerate(zip(self.units.down_modules, self.units.out_modules)):
            self.handles.append(down.register_forward_pre_hook(self._hook(layer, "mlp")))
            self.handles.append(out.register_forward_pre_hook(self._hook(layer, "heads")))

    def _hook(self, layer, kind):
        def hook(module, args):
            if self.row is None:
                return None
            x = args[0]  # [B, 1, K] (one new token per row); OPT's MLP input is [B*1, N]
            if kind == "mlp":
                m = self.row[0][:, layer].to(x.dtype)  # [B, N]
                return (x * (m if x.dim() == 2 else m.unsqueeze(1)),) + tuple(args[1:])
            m = self.row[1][:, layer].to(x.dtype)  # [B, H]
            shaped = x.view(*x.shape[:-1], self.units.num_heads, self.units.head_dim)
            return ((shaped * m[:, None, :, None]).reshape(x.shape),) + tuple(args[1:])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def greedy(model, prompts, steps, on_step=None, split_prefill=False):
    """Greedy decoding with a DynamicCache for exactly ``steps`` tokens (no stop); returns tokens
    ``[B, steps]`` and the logits ``[B, steps, V]`` that chose them. ``on_step(k)`` runs before the
    call that produces token k; with ``split_prefill`` the prompt minus its last token runs first
    (``on_step(-1)``), then the last prompt token alone."""
    cache = DynamicCache(config=model.config)
    ids, tokens, all_logits = prompts, [], []
    with torch.no_grad():
        if split_prefill:
            on_step(-1)
            model(input_ids=prompts[:, :-1], cache=cache, use_cache=True)
            ids = prompts[:, -1:]
        for k in range(steps):
            if on_step is not None:
                on_step(k)
            out = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            ids = out.argmax(-1, keepdim=True)
            tokens.append(ids)
            all_logits.append(out)
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


def manual_schedule_run(model, prompts, schedule: UnitMasks, steps, mask_prefill=False):
    """Reference masked decoding: row k of ``schedule`` ([T, L, *] or [B, T, L, *]) at step k."""
    manual = ManualMasks(model)
    batched = schedule.mlp.dim() == 4

    def row(k):
        if k < 0 or k >= schedule.mlp.shape[1 if batched else 0]:
            return None
        r = schedule[:, k] if batched else schedule[k]
        return (r.mlp, r.heads) if batched else (r.mlp.unsqueeze(0), r.heads.unsqueeze(0))

    def on_step(k):
        manual.row = row(k)

    try:
        if not mask_prefill:
            return greedy(model, prompts, steps, on_step, split_prefill=True)
        # mask_prefill: the whole prompt runs in one call, every position under row 0
        handles = apply_static_rows(model, row(0))
        cache = DynamicCache(config=model.config)
        try:
            with torch.no_grad():
                out = model(input_ids=prompts, cache=cache, use_cache=True).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        tokens, outs = [out.argmax(-1, keepdim=True)], [out]
        with torch.no_grad():
            for k in range(1, steps):
                on_step(k)
                out = model(input_ids=tokens[-1], cache=cache, use_cache=True).logits[:, -1]
                tokens.append(out.argmax(-1, keepdim=True))
                outs.append(out)
        return torch.cat(tokens, 1), torch.stack(outs, 1)
    finally:
        manual.remove()


def apply_static_rows(model, row):
    """Pre-hooks multiplying every position by ``row`` = (mlp [B, L, N], heads [B, L, H])."""
    units = unit_map(model)
    handles = []
    for layer, (down, out) in enumerate(zip(units.down_modules, units.out_modules)):
        def mlp_hook(module, args, layer=layer):
            return (args[0] * row[0][:, layer].unsqueeze(1).to(args[0].dtype),) + tuple(args[1:])

        def head_hook(module, args, layer=layer):
            x = args[0]
            shaped = x.view(*x.shape[:-1], units.num_heads, units.head_dim)
            m = row[1][:, layer].to(x.dtype)[:, None, :, None]
            return ((shaped * m).reshape(x.shape),) + tuple(args[1:])
        handles.append(down.register_forward_pre_hook(mlp_hook))
        handles.append(out.register_forward_pre_hook(head_hook))
    return handles


def expected_accounting(units, rows: list[UnitMasks]):
    return executed_ratio(UnitMasks.stack(rows), units)


def assert_accounting(handle, want):
    got = handle.executed
    assert got.tokens == want.tokens
    for key in ("param", "mlp", "heads", "kv_heads"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), abs=1e-12), key
    assert got.per_layer_param == pytest.approx(want.per_layer_param, abs=1e-9)


@pytest.mark.parametrize("name", ARCHS)
def test_schedule_equals_manual_masked_decoding(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    T, extra = 5, 2  # two calls past the end of the schedule run dense
    schedule = random_masks(units, T, seed=1)
    prompt = PROMPTS[:1]
    with apply_masks(model, schedule) as handle:
        tokens, outs = greedy(model, prompt, T + extra)
    ref_tokens, ref_outs = manual_schedule_run(model, prompt, schedule, T + extra)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(outs, ref_outs, atol=1e-5, rtol=1e-5)
    dense_tokens, dense_outs = greedy(model, prompt, T + extra)
    assert (dense_outs[:, :T] - outs[:, :T]).abs().max() > 1e-3  # the masks do something
    # accounting: the T schedule rows plus `extra` dense rows; dense prompt positions apart
    rows = [schedule[k] for k in range(T)] + [UnitMasks.dense(units)] * extra
    assert_accounting(handle, expected_accounting(units, rows))
    assert handle.prefill_dense_tokens == prompt.shape[1] - 1
    assert handle.step == T + extra


def test_schedule_with_mask_prefill(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    T = 4
    schedule = random_masks(units, T, seed=2)
    prompt = PROMPTS[:1]
    with apply_masks(model, schedule, mask_prefill=True) as handle:
        tokens, outs = greedy(model, prompt, T)
    ref_tokens, ref_outs = manual_schedule_run(model, prompt, schedule, T, mask_prefill=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(outs, ref_outs, atol=1e-5, rtol=1e-5)
    # every prompt position is an executed row under row 0
    rows = [schedule[0]] * prompt.shape[1] + [schedule[k] for k in range(1, T)]
    assert_accounting(handle, expected_accounting(units, rows))
    assert handle.prefill_dense_tokens == 0


def test_schedule_with_generate(make_tiny):
    """model.generate (greedy, no early stop) under a schedule gives the same tokens."""
    model = make_tiny("llama")
    units = unit_map(model)
    T = 5
    schedule = random_masks(units, T, seed=3)
    with apply_masks(model, schedule) as handle:
        out = model.generate(PROMPTS[:1], max_new_tokens=T, min_new_tokens=T, do_sample=False,
                             attention_mask=torch.ones_like(PROMPTS[:1]))
    ref_tokens, _ = manual_schedule_run(model, PROMPTS[:1], schedule, T)
    assert torch.equal(out[:, PROMPTS.shape[1]:], ref_tokens)
    assert handle.step == T  # one forward call per generated token


@pytest.mark.parametrize("name", ARCHS)
def test_batched_schedule_equals_separate_runs(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    T = 4
    batched = random_masks(units, 2, T, seed=4)  # [B, T, L, *]
    with apply_masks(model, batched) as handle:
        tokens, outs = greedy(model, PROMPTS, T)
    for b in range(2):
        with apply_masks(model, batched[b]) as single:
            tok_b, out_b = greedy(model, PROMPTS[b:b + 1], T)
        assert torch.equal(tokens[b], tok_b[0])
        torch.testing.assert_close(outs[b], out_b[0], atol=1e-5, rtol=1e-5)
        assert_accounting(single, expected_accounting(units, [batched[b, k] for k in range(T)]))
    ref_tokens, ref_outs = manual_schedule_run(model, PROMPTS, batched, T)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(outs, ref_outs, atol=1e-5, rtol=1e-5)
    want = executed_ratio(batched, units)  # every (b, t) row once
    assert want.tokens == 2 * T
    assert_accounting(handle, want)
    assert handle.prefill_dense_tokens == 2 * (PROMPTS.shape[1] - 1)


def test_bad_mask_shape_is_rejected(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    bad = UnitMasks(torch.ones(units.mlp_size, dtype=torch.bool), torch.ones(units.num_heads, dtype=torch.bool))
    with pytest.raises(ValueError):
        with apply_masks(model, bad):
            pass
