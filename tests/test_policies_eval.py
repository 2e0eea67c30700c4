"""Policies (dense, oracle, static) and task evaluation, checked against direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attrsparse import get_metric, select, trace_gradients, unit_map
from attrsparse.core.errors import UserError
from attrsparse.core.trace import model_logits
from attrsparse.core.units import UnitMasks, zero_mlp_unit_
from attrsparse.evaluation import Evaluator, right_pad
from attrsparse.policies import DensePolicy, OraclePolicy, StaticPolicy, account, make_policy

FIXTURES = Path(__file__).parent / "fixtures"


def _ids(seed=0, shape=(2, 9)):
    return torch.randint(3, 64, shape, generator=torch.Generator().manual_seed(seed))


def test_trace_labels_default_and_override(make_tiny):
    model = make_tiny("llama")
    ids = _ids(shape=(8,))
    prompt, target = ids[:3], ids[3:]
    base = trace_gradients(model, prompt, target)
    same = trace_gradients(model, prompt, target, labels=target)
    assert torch.equal(base.mlp_g, same.mlp_g)
    labels = torch.roll(target, 1)
    other = trace_gradients(model, prompt, target, labels=labels)
    logits = model(input_ids=ids[:-1].unsqueeze(0)).logits[0, 2:]
    assert torch.allclose(other.losses[0], F.cross_entropy(logits, labels, reduction="none"), atol=1e-5)
    assert not torch.allclose(other.mlp_g, base.mlp_g)


def test_dense_policy_equals_model(make_tiny):
    model = make_tiny("qwen2")
    ids = _ids()
    out = DensePolicy().forward(model, ids)
    assert torch.equal(out.logits, model(input_ids=ids).logits.float())
    assert out.masks.mlp.all() and out.masks.heads.all()
    assert make_policy("corrected_gxo", 1.0).mode == "dense"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_policy_equals_zeroed_weights(make_tiny, arch):
    model = make_tiny(arch)
    units = unit_map(model)
    gen = torch.Generator().manual_seed(3)
    masks = UnitMasks(torch.rand(units.num_layers, units.mlp_size, generator=gen) > 0.5,
                      torch.ones(units.num_layers, units.num_heads, dtype=torch.bool))
    ids = _ids()
    got = StaticPolicy("s", 0.5, masks).forward(model, ids).logits
    ref = make_tiny(arch)
    for layer in range(units.num_layers):
        for unit in (~masks.mlp[layer]).nonzero().flatten().tolist():
            zero_mlp_unit_(ref, layer, unit)
    assert torch.allclose(got, ref(input_ids=ids).logits.float(), atol=1e-5)


def test_oracle_masks_follow_dense_predictions_not_ground_truth(make_tiny):
    model = make_tiny("llama")
    ids = _ids(shape=(10,))
    metric = get_metric("corrected_gxo")
    policy = OraclePolicy(metric, 0.5)
    masks = policy.row_masks(model, ids)
    # slow reference: label = dense argmax at each position, scores from a per-position loop
    labels = model(input_ids=ids.unsqueeze(0)).logits[0].argmax(-1)
    for t in [0, 4, 9]:
        tr = trace_gradients(model, ids[:t + 1], torch.cat([ids[t + 1:t + 2], labels[t:t + 1]])[:1],
                             labels=labels[t:t + 1]).row(0)
        want = select(metric.score.from_trace(tr), 0.5)
        assert torch.equal(masks.mlp[t], want.mlp[0]) and torch.equal(masks.heads[t], want.heads[0])


def test_oracle_forward_masks_every_position_and_accounts_real_tokens(make_tiny):
    model = make_tiny("llama")
    units = unit_map(model)
    ids = _ids(shape=(2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    out = OraclePolicy(get_metric("magnitude"), 0.25).forward(model, ids, mask)
    assert out.masks.mlp.shape == (2, 8, units.num_layers, units.mlp_size)
    row1 = OraclePolicy(get_metric("magnitude"), 0.25).forward(model, ids[1:, :5])
    assert torch.allclose(out.logits[1, :5], row1.logits[0], atol=1e-5)
    acc = account(out.masks, mask, units)
    assert acc.tokens == 13
    assert acc.mlp == pytest.approx(math.ceil(0.25 * units.mlp_size) / units.mlp_size)
    with torch.no_grad(), __import__("attrsparse.core.hooks").core.hooks.UnitHooks(model) as hooks:
        hooks.mlp_mult, hooks.head_mult = out.masks.mlp[:1], out.masks.heads[:1]
        direct = model_logits(model, ids[:1], None)
    assert torch.allclose(out.logits[0], direct[0], atol=1e-6)


def test_oracle_refuses_ig():
    with pytest.raises(UserError, match="Integrated Gradients"):
        make_policy("ig", 0.5)


def test_choice_logprobs_match_direct_sum(tiny_truthfulqa_lm):
    model, tok = tiny_truthfulqa_lm()
    ev = Evaluator(model, tok, DensePolicy())
    context, choices = "Q: What happens ?", [" Nothing happens", " You die"]
    got = ev.choice_logprobs(context, choices)
    for choice, value in zip(choices, got):
        ctx = tok(context, return_tensors="pt").input_ids[0]
        cont = tok(choice, add_special_tokens=False, return_tensors="pt").input_ids[0]
        seq = torch.cat([ctx, cont])
        logp = torch.log_softmax(model(input_ids=seq.unsqueeze(0)).logits[0].float(), -1)
        want = sum(float(logp[ctx.numel() - 1 + i, cont[i]]) for i in range(cont.numel()))
        assert value == pytest.approx(want, abs=1e-4)
    # the shared context runs once, then each choice's tokens; padding is not counted
    real = len(tok(context).input_ids) + sum(len(tok(c, add_special_tokens=False).input_ids) for c in choices)
    assert ev.executed.tokens == real
    full = Evaluator(model, tok, OraclePolicy(get_metric("magnitude"), 1.0))  # no prefix cache
    assert full.choice_logprobs(context, choices) == pytest.approx(got, abs=1e-4)
    assert full.executed.tokens == sum(len(tok(context).input_ids) + len(tok(c, add_special_tokens=False).input_ids)
                                       for c in choices)


@pytest.mark.parametrize("window,stride", [(64, 64), (16, 8), (16, 16), (10, 3)])
def test_perplexity_strided_windows(make_tiny, window, stride):
    model = make_tiny("llama")
    ids = _ids(shape=(40,))
    ev = Evaluator(model, _DigitTok(), DensePolicy())
    got = ev.perplexity(" ".join(map(str, ids.tolist())), window=window, stride=stride)
    assert got["n_tokens"] == 39
    if window >= 40:  # one window: the plain full-sequence perplexity
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1]
        assert got["ppl"] == pytest.approx(math.exp(float(F.cross_entropy(logits, ids[1:]))), rel=1e-5)
    # every token after the first is scored exactly once, with at least one token of context
    assert math.isfinite(got["ppl"]) and got["ppl"] > 1


def test_right_pad_and_batch_invariance(tiny_truthfulqa_lm):
    model, tok = tiny_truthfulqa_lm()
    ids, mask = right_pad([torch.tensor([3, 4, 5]), torch.tensor([6])], 0)
    assert ids.tolist() == [[3, 4, 5], [6, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ev = Evaluator(model, tok, DensePolicy())
    both = ev.choice_logprobs("Q: What happens ?", [" Nothing happens", " You"])
    one = ev.choice_logprobs("Q: What happens ?", [" You"])
    assert both[1] == pytest.approx(one[0], abs=1e-4)


class _DigitTok:
    """Token ids written as space-separated numbers (no special tokens)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return type("E", (), {"input_ids": torch.tensor([[int(x) for x in text.split()]])})()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2", "opt", "phi3"])
def test_shared_context_cache_equals_full_sequences(make_tiny, arch):
    model = make_tiny(arch)
    context = "5 9 13 22 7 31"
    choices = [" 4 8", " 17", " 40 41 42 43"]
    cached = Evaluator(model, _DigitTok(), DensePolicy()).choice_logprobs(context, choices)
    full = Evaluator(model, _DigitTok(), OraclePolicy(get_metric("magnitude"), 1.0)).choice_logprobs(context, choices)
    assert cached == pytest.approx(full, abs=1e-4)


def test_generation_dense_oracle_and_cached_static(tiny_truthfulqa_lm):
    from attrsparse.evaluation import evaluate_task

    model, tok = tiny_truthfulqa_lm()
    data = str(FIXTURES / "truthfulqa_3.csv")
    dense = evaluate_task(model, tok, "truthfulqa_gen", DensePolicy(), data=data, max_new_tokens=6)
    assert dense["bleu_vs_dense"] == 100.0 and dense["exact_vs_dense"] == 1.0 and dense["n"] == 3
    full = OraclePolicy(get_metric("corrected_gxo"), 1.0)
    assert evaluate_task(model, tok, "truthfulqa_gen", full, data=data, max_new_tokens=6)["exact_vs_dense"] == 1.0
    oracle = evaluate_task(model, tok, "truthfulqa_gen", OraclePolicy(get_metric("corrected_gxo"), 0.5),
                           data=data, max_new_tokens=6)
    assert 0.5 <= oracle["executed_ratio"] < 0.6 and oracle["executed_tokens"] > 0

    units = unit_map(model)
    masks = UnitMasks(torch.rand(units.num_layers, units.mlp_size, generator=torch.Generator().manual_seed(0)) > 0.4,
                      torch.ones(units.num_layers, units.num_heads, dtype=torch.bool))

    class Uncached(StaticPolicy):
        prefix_cache = False

    items = __import__("attrsparse.data.tasks").data.tasks.load_truthfulqa(data)
    cached_ev = Evaluator(model, tok, StaticPolicy("s", 0.6, masks))
    plain_ev = Evaluator(model, tok, Uncached("s", 0.6, masks))
    for item in items:
        prompt = tok(f"Instruct: {item.question}\nOutput:", return_tensors="pt").input_ids[0]
        assert cached_ev.greedy(prompt, 6, {2}) == plain_ev.greedy(prompt, 6, {2})


def test_decision_cost_from_mean_ratios_equals_per_row_sum(make_tiny):
    """The analytic read ratio (from mean unit ratios) equals the per-row decision cost summed."""
    from attrsparse.policies.base import with_decision_cost
    from attrsparse.selectors.thresholds import decision_cost_fraction

    model = make_tiny("llama")
    units = unit_map(model)
    policy = make_policy("teal_units", 0.5)
    policy.prepare(model, [_ids(seed=s, shape=(12,)) for s in range(3)])
    out = policy.forward(model, _ids(shape=(2, 9)))
    acc = account(out.masks, None, units)
    per_row = float(decision_cost_fraction(UnitMasks(out.masks.mlp.flatten(0, 1), out.masks.heads.flatten(0, 1)),
                                           units, *policy.prepaid_params(units)).mean())
    read = with_decision_cost(acc.as_dict(), units, policy.prepaid_params(units))
    assert read == pytest.approx(acc.param + per_row, rel=1e-9)
    assert read > acc.param and DensePolicy().prepaid_params(units) is None


@pytest.mark.parametrize("selector", ["teal_units", "cats_units", "wina_units", "wanda", "random"])
def test_baselines_score_choices_on_the_shared_context_cache(make_tiny, selector):
    model = make_tiny("llama")
    policy = make_policy(selector, 0.5)
    policy.prepare(model, [_ids(seed=s, shape=(12,)) for s in range(3)])
    context, choices = "5 9 13 22 7 31", [" 4 8", " 17", " 40 41 42 43"]
    cached = Evaluator(model, _DigitTok(), policy)
    assert cached.prefix_cache
    full = Evaluator(model, _DigitTok(), policy)
    full.prefix_cache = False  # every context + choice sequence in full
    assert cached.choice_logprobs(context, choices) == pytest.approx(full.choice_logprobs(context, choices), abs=1e-4)
