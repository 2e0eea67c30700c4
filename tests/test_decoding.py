"""Tests for attrsparse.core.decoding: batched masked greedy decoding and masked log-likelihoods.

The model is the tiny seeded Llama of the ``tiny_truthfulqa_lm`` fixture (stock attention, as
``load_model`` gives). Every comparison of generated ids is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attrsparse.core.decoding import left_pad, masked_greedy_decode, masked_loglik
from attrsparse.core.hooks import UnitHooks
from attrsparse.core.trace import position_multipliers
from attrsparse.core.units import UnitMasks, unit_map
from attrsparse.data.prompts import encode_prompt, greedy_continuation

PAD = 0
T = 7  # new tokens per row
LENGTHS = (3, 9, 1, 6)  # different prompt lengths -> left padding of 6, 0, 8 and 3 positions


@pytest.fixture
def lm(tiny_truthfulqa_lm):
    return tiny_truthfulqa_lm(seed=0)


@pytest.fixture
def prompts(lm):
    model, _ = lm
    gen = torch.Generator().manual_seed(123)
    # ids >= 3: no pad/unk/eos inside the prompts
    return [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in LENGTHS]


def random_schedule(model, rows: int, steps: int, seed: int, keep: float = 0.6) -> UnitMasks:
    """A random keep-mask per row and step ``[B, T, L, *]`` (fixed before decoding)."""
    units = unit_map(model)
    gen = torch.Generator().manual_seed(seed)
    return UnitMasks(torch.rand(rows, steps, units.num_layers, units.mlp_size, generator=gen) < keep,
                     torch.rand(rows, steps, units.num_layers, units.num_heads, generator=gen) < keep)


@torch.no_grad()
def reference_masked_decode(model, prompt, schedule: UnitMasks, steps: int, stop_ids=()) -> list[int]:
    """Greedy decoding without a cache: the whole sequence is re-run at every step, with the
    decoding protocol's per-position multipliers (prompt dense but its last position, which uses
    step 0; the position of generated token k uses step k + 1)."""
    out: list[int] = []
    for step in range(steps):
        ids = torch.cat([prompt, torch.tensor(out, dtype=torch.long)]).view(1, -1)
        rows = schedule[None, : step + 1] if schedule.mlp.dim() == 3 else schedule[:, : step + 1]
        with UnitHooks(model) as hooks:
            hooks.mlp_mult = position_multipliers(rows.mlp, prompt.numel())
            hooks.head_mult = position_multipliers(rows.heads, prompt.numel())
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(token)
        if token in stop_ids:
            break
    return out


def ids(tensors) -> list[list[int]]:
    return [t.tolist() for t in tensors]


def test_left_pad_right_aligns():
    ids_, attn = left_pad([torch.tensor([5, 6]), torch.tensor([7, 8, 9])], pad_id=PAD)
    assert ids_.tolist() == [[PAD, 5, 6], [7, 8, 9]]
    assert attn.tolist() == [[0, 1, 1], [1, 1, 1]]


def test_dense_decode_equals_greedy_continuation(lm, prompts):
    model, _ = lm
    alone = [greedy_continuation(model, p, T, set()) for p in prompts]
    assert all(a.numel() == T for a in alone)
    assert len({tuple(a.tolist()) for a in alone}) == len(prompts)  # rows really differ
    for p, a in zip(prompts, alone):  # one row at a time
        assert ids(masked_greedy_decode(model, [p], None, T, set(), PAD)) == [a.tolist()]
    # all rows in one batch, left-padded to the longest prompt
    assert ids(masked_greedy_decode(model, prompts, None, T, set(), PAD)) == ids(alone)


def test_dense_decode_of_real_prompts(lm):
    """Templated fixture questions (paper template) batched together, EOS as stop id."""
    model, tok = lm
    questions = ["Why do veins appear blue?", "Where did fortune cookies originate?",
                 "What happens to you if you eat watermelon seeds?"]
    prompts = [encode_prompt(tok, q, "paper") for q in questions]
    assert len({p.numel() for p in prompts}) > 1
    stop = {tok.eos_token_id}
    alone = [greedy_continuation(model, p, 10, stop) for p in prompts]
    assert ids(masked_greedy_decode(model, prompts, None, 10, stop, tok.pad_token_id)) == ids(alone)


def test_all_ones_masks_equal_dense(lm, prompts):
    model, _ = lm
    units = unit_map(model)
    dense = masked_greedy_decode(model, prompts, None, T, set(), PAD)
    ones = UnitMasks.dense(units, len(prompts), T)
    assert ids(masked_greedy_decode(model, prompts, ones, T, set(), PAD)) == ids(dense)
    shorter = UnitMasks.dense(units, len(prompts), 2)  # steps past the schedule run dense
    assert ids(masked_greedy_decode(model, prompts, shorter, T, set(), PAD)) == ids(dense)


def test_batched_rows_equal_rows_decoded_alone_with_masks(lm, prompts):
    model, _ = lm
    schedule = random_schedule(model, len(prompts), T, seed=7)
    batched = ids(masked_greedy_decode(model, prompts, schedule, T, set(), PAD))
    alone = [masked_greedy_decode(model, [p], schedule[b: b + 1], T, set(), PAD)[0].tolist()
             for b, p in enumerate(prompts)]
    assert batched == alone
    # mask_prefill (the whole prompt under step 0's masks) is per row as well
    prefill = ids(masked_greedy_decode(model, prompts, schedule, T, set(), PAD, mask_prefill=True))
    assert prefill == [masked_greedy_decode(model, [p], schedule[b: b + 1], T, set(), PAD,
                                            mask_prefill=True)[0].tolist()
                       for b, p in enumerate(prompts)]
    assert prefill != batched
    # the cached, left-padded decode follows the protocol of a cache-free re-run
    reference = [reference_masked_decode(model, p, schedule[b], T) for b, p in enumerate(prompts)]
    assert batched == reference
    dense = ids(masked_greedy_decode(model, prompts, None, T, set(), PAD))
    assert batched != dense  # the masks really changed something


def test_rows_with_other_schedules_do_not_leak(lm, prompts):
    """Row 0's output does not depend on what the other rows' masks are."""
    model, _ = lm
    a = random_schedule(model, len(prompts), T, seed=1)
    b = random_schedule(model, len(prompts), T, seed=2)
    b.mlp[0], b.heads[0] = a.mlp[0], a.heads[0]
    out_a = masked_greedy_decode(model, prompts, a, T, set(), PAD)
    out_b = masked_greedy_decode(model, prompts, b, T, set(), PAD)
    assert out_a[0].tolist() == out_b[0].tolist()
    assert ids(out_a[1:]) != ids(out_b[1:])


@pytest.mark.parametrize("masked", [False, True])
def test_per_row_stopping(lm, prompts, masked):
    model, _ = lm
    schedule = random_schedule(model, len(prompts), T, seed=11) if masked else None
    free = ids(masked_greedy_decode(model, prompts, schedule, T, set(), PAD))
    # a stop id that one row produces early (first at step >= 1), another row never produces
    stop, row, step, other = next(
        (tok, r, s, o) for r, full in enumerate(free) for s, tok in enumerate(full[1:T - 1], 1)
        if tok not in full[:s] for o, rest in enumerate(free) if tok not in rest)
    out = ids(masked_greedy_decode(model, prompts, schedule, T, {stop}, PAD))
    assert out[row] == free[row][: step + 1]  # stopped early, stop token kept
    assert out[other] == free[other]  # another row continues to max_new_tokens
    for got, full in zip(out, free):  # every row: its free run cut after its first stop id
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got == full[:cut]


def test_all_rows_stopping_ends_the_batch(lm, prompts):
    model, _ = lm
    free = ids(masked_greedy_decode(model, prompts, None, T, set(), PAD))
    firsts = {row[0] for row in free}
    out = ids(masked_greedy_decode(model, prompts, None, T, firsts, PAD))
    assert out == [[row[0]] for row in free]


def manual_loglik(model, prompt, target, mlp_mult=None, head_mult=None) -> float:
    ids_ = torch.cat([prompt, target]).view(1, -1)
    with torch.no_grad(), UnitHooks(model) as hooks:
        hooks.mlp_mult, hooks.head_mult = mlp_mult, head_mult
        logits = model(input_ids=ids_, use_cache=False).logits[0].double()
    logp = F.log_softmax(logits, dim=-1)
    p = prompt.numel()
    return float(sum(logp[p - 1 + t, int(target[t])] for t in range(target.numel())))


def test_masked_loglik_dense_and_all_ones(lm, prompts):
    model, _ = lm
    units = unit_map(model)
    prompt, target = prompts[1], prompts[3]
    dense = masked_loglik(model, prompt, target, None)
    assert dense.shape == (1,)
    assert float(dense[0]) < 0
    assert float(dense[0]) == pytest.approx(manual_loglik(model, prompt, target), rel=1e-5, abs=1e-4)
    ones = masked_loglik(model, prompt, target, UnitMasks.dense(units, 3, target.numel()))
    assert ones.shape == (3,)
    torch.testing.assert_close(ones, dense.expand(3), rtol=0, atol=0)


def test_masked_loglik_matches_manual_masked_computation(lm, prompts):
    model, _ = lm
    prompt, target = prompts[0], prompts[1]
    schedule = random_schedule(model, 2, target.numel(), seed=5)
    got = masked_loglik(model, prompt, target, schedule)
    for b in range(2):
        # the whole prompt+target is run; the last position's masks only affect logits not used
        full = UnitMasks(torch.cat([schedule.mlp[b: b + 1], schedule.mlp[b: b + 1, -1:]], dim=1),
                         torch.cat([schedule.heads[b: b + 1], schedule.heads[b: b + 1, -1:]], dim=1))
        want = manual_loglik(model, prompt, target,
                             position_multipliers(full.mlp, prompt.numel()),
                             position_multipliers(full.heads, prompt.numel()))
        assert float(got[b]) == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert not torch.allclose(got, masked_loglik(model, prompt, target, None).expand(2))


def test_masked_loglik_agrees_with_masked_decoding(lm, prompts):
    """The greedy tokens of a masked decode are the argmax under the same masks: their
    log-likelihood is at least that of any single-token change at the last step."""
    model, _ = lm
    prompt = prompts[2]
    schedule = random_schedule(model, 1, 4, seed=3)
    out = masked_greedy_decode(model, [prompt], schedule, 4, set(), PAD)[0]
    best = float(masked_loglik(model, prompt, out, schedule)[0])
    for other in range(3, 12):
        if other == int(out[-1]):
            continue
        alt = out.clone()
        alt[-1] = other
        assert float(masked_loglik(model, prompt, alt, schedule)[0]) <= best + 1e-6
