"""Deployment: calibrated static masks, allocation to a parameter budget, sliced stock exports,
gathered sparse kernels and the decoding runtime.

Hand-computed values use the tiny Llama of conftest: hidden 32, 48 MLP units, 4 heads in 2
key/value groups, head_dim 8, so one MLP unit costs 3 * 32 = 96 parameters, one query head
8 * 32 + 32 * 8 = 512, one key/value head 2 * 8 * 32 = 512; a layer has 4608 MLP and 3072
attention parameters (7680).
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from conftest import ARCHS, VOCAB, build_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM

from attrsparse import UnitMasks, UnitScores, UserError, executed_ratio, score, unit_map
from attrsparse.cli.main import main
from attrsparse.core.decoding import left_pad
from attrsparse.core.hooks import UnitHooks
from attrsparse.deploy.calibrate import run_calibration
from attrsparse.deploy.export import EXPORT_INFO, export_model, slice_model
from attrsparse.deploy.kernels import CBackend, TorchBackend, gather_backend
from attrsparse.deploy.runtime import SparseRuntime, generate
from attrsparse.policies import StaticPolicy, make_policy
from attrsparse.policies.static import JSON_NAME, TENSORS_NAME, load_static_policy
from attrsparse.selectors import allocation as A
from attrsparse.selectors.chooser import StaticChooser, UnitChooser
from attrsparse.selectors.static import calibrate, static_masks


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    gen = torch.Generator().manual_seed(7)
    words = [f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (600,), generator=gen)]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(words))
    return str(path)


def seqs(n=3, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=gen) for _ in range(n)]


def random_masks(units, p=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mlp = torch.rand(units.num_layers, units.mlp_size, generator=gen) < p
    heads = torch.rand(units.num_layers, units.num_heads, generator=gen) < p
    heads[:, 1] = True
    return UnitMasks(mlp, heads)


# -- allocation --------------------------------------------------------------------------------

def test_unit_costs_of_the_tiny_llama(make_tiny):
    u = unit_map(make_tiny("llama"))
    assert (u.mlp_unit_params, u.head_params, u.kv_group_params) == (96, 512, 512)
    assert (u.mlp_params_per_layer, u.attn_params_per_layer) == (4608, 3072)


def test_uniform_allocation_by_hand(make_tiny):
    u = unit_map(make_tiny("llama"))
    # ratio 0.5: budget 3840 per layer; heads target 4 * 0.5**0.5 = 2.83 -> 2 heads, as 1 group of 2
    # (1536 parameters) rather than 2 groups of 1 (2048); MLP fills (3840 - 1536) / 96 = 24 units
    assert A.power_structure(u, 0.5) == (1, 2)
    assert A.mlp_units_for(u, 0.5, 1, 2) == 24
    scores = UnitScores(torch.arange(48.0).repeat(2, 1), torch.tensor([[0.1, 0.9, 0.5, 0.6]] * 2))
    masks = A.uniform_masks(scores, 0.5, u)
    assert masks.mlp.sum(-1).tolist() == [24, 24] and bool(masks.mlp[:, 24:].all())
    assert masks.heads.tolist() == [[False, False, True, True]] * 2  # group {2,3}: 1.1 > 1.0
    assert executed_ratio(masks, u).param == pytest.approx(0.5)
    # ratio 0.3: budget 2304; targets 4 * 0.3**0.5 = 2.19 -> (1, 2); MLP (2304 - 1536) / 96 = 8
    assert A.power_structure(u, 0.3) == (1, 2) and A.mlp_units_for(u, 0.3, 1, 2) == 8


def test_structured_heads_pick_groups_by_their_best_heads(make_tiny):
    u = unit_map(make_tiny("llama"))
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.6], [3.0, -1.0, 2.0, 2.5]])
    assert A.structured_heads(scores, u, 1, 1).tolist() == [[False, True, False, False],
                                                           [True, False, False, False]]
    assert A.structured_heads(scores, u, 2, 1).tolist() == [[False, True, False, True],
                                                           [True, False, False, True]]
    assert A.structured_heads(scores, u, 1, 2).tolist() == [[False, False, True, True],
                                                           [False, False, True, True]]


def test_greedy_counts_take_budget_from_the_insensitive_layer():
    units = types.SimpleNamespace(mlp_size=48, num_layers=2)
    counts = [2, 5, 10, 20, 48]
    sens = A.Sensitivity(counts, torch.tensor([[0.0, 0, 0, 0, 0], [9.0, 5, 2, 1, 0]]))
    assert A.greedy_counts(sens, units, 60) == [12, 48]  # layer 0 costs nothing until its floor
    assert A.greedy_counts(sens, units, 40) == [2, 38]
    assert sum(A.greedy_counts(sens, units, 37)) == 37


def test_loss_probe_is_zero_for_dense_and_positive_when_masked(make_tiny):
    model = make_tiny("llama")
    u = unit_map(model)
    probe = A.LossProbe(model, seqs(2))
    assert probe.loss_of(UnitMasks.dense(u)) == pytest.approx(0.0, abs=1e-6)
    assert probe.loss_of(random_masks(u)) > 1e-3


def test_greedy_allocation_respects_the_budget(make_tiny):
    model = make_tiny("llama")
    u = unit_map(model)
    cal = calibrate(model, seqs(3), "corrected_gxo")
    chosen = static_masks(model, cal.scores, [0.3, 0.6], "greedy", search_sequences=seqs(2, seed=1))
    for ratio, (masks, record) in chosen.items():
        executed = executed_ratio(masks, u).param
        # within half an MLP unit per layer of the requested ratio
        assert abs(executed - ratio) <= 0.5 * 96 / 7680 + 1e-9
        assert record["greedy_loss"] >= 0 and record["uniform_loss"] >= 0
        kv, g = record["heads"]["kv_groups"], record["heads"]["heads_per_group"]
        groups = masks.heads.reshape(2, 2, 2)
        assert (groups.any(-1).sum(-1) == kv).all() and (groups.sum(-1).max(-1).values == g).all()
        if record["chosen"] == "greedy":
            assert masks.mlp.sum(-1).tolist() == record["kept_mlp_per_layer_greedy"]


# -- calibration scores --------------------------------------------------------------------------

def test_calibrated_scores_are_the_token_mean_of_the_metric(make_tiny):
    model = make_tiny("llama")
    data = seqs(2, 10)
    cal = calibrate(model, data, "gxo", labels="text")
    per_seq = [score(model, s[:1], s[1:], metrics=["gxo"])["gxo"] for s in data]
    mlp = torch.cat([s.mlp for s in per_seq]).mean(0)
    heads = torch.cat([s.heads for s in per_seq]).mean(0)
    assert cal.tokens == 18
    assert cal.scores.mlp.shape == (2, 48) and cal.scores.heads.shape == (2, 4)
    torch.testing.assert_close(cal.scores.mlp, mlp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cal.scores.heads, heads, atol=1e-6, rtol=1e-5)
    again = calibrate(model, data, "gxo", labels="text")
    assert torch.equal(again.scores.mlp, cal.scores.mlp)
    dense = calibrate(model, data, "gxo", labels="dense")  # the model's own predictions differ
    assert not torch.allclose(dense.scores.mlp, cal.scores.mlp)


def test_calibrate_refuses_selectors_and_bad_labels(make_tiny):
    model = make_tiny("llama")
    with pytest.raises(UserError, match="selector"):
        calibrate(model, seqs(1), "progressive_gxo")
    with pytest.raises(UserError, match="labels"):
        calibrate(model, seqs(1), labels="gold")


# -- the sparsity file ------------------------------------------------------------------------------

def test_sparsity_file_round_trip_and_policy(tmp_path, calib_text):
    model = build_tiny("llama")
    doc = run_calibration(model, tiny_tokenizer(), tmp_path, ratios=[0.3, 0.5], calib=calib_text,
                          n_sequences=3, seq_len=16, progress=False)
    assert (tmp_path / JSON_NAME).exists() and (tmp_path / TENSORS_NAME).exists()
    assert set(doc["ratios"]) == {"0.3", "0.5"} and doc["calibration"]["n_sequences"] == 3
    assert doc["ratios"]["0.5"]["executed_ratio"] == pytest.approx(0.5)
    policy = make_policy(f"static:{tmp_path}", 0.5)
    assert policy.mode == "static" and policy.masks.mlp.sum(-1).tolist() == [24, 24]
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    expected = StaticPolicy("s", 0.5, policy.masks).forward(model, ids).logits
    torch.testing.assert_close(policy.forward(model, ids).logits, expected)
    derived = load_static_policy(tmp_path, 0.4)  # uniform: derived from the stored scores
    assert executed_ratio(derived.masks, unit_map(model)).param == pytest.approx(0.4, abs=0.01)
    # a rerun with another ratio reuses the stored scores and keeps the earlier ratios
    doc2 = run_calibration(model, tiny_tokenizer(), tmp_path, ratios=[0.7], calib=calib_text,
                           n_sequences=3, seq_len=16, progress=False)
    assert set(doc2["ratios"]) == {"0.3", "0.5", "0.7"}


def test_bad_sparsity_files_are_user_errors(tmp_path, calib_text):
    model = build_tiny("llama")
    with pytest.raises(UserError, match="no sparsity file"):
        load_static_policy(tmp_path / "missing", 0.5)
    run_calibration(model, tiny_tokenizer(), tmp_path / "ok", ratios=[0.5], calib=calib_text,
                    n_sequences=2, seq_len=16, progress=False)
    with pytest.raises(UserError, match="no masks at ratio 0.3|ratio"):
        doc = json.loads((tmp_path / "ok" / JSON_NAME).read_text())
        doc["ratios"]["0.5"]["allocation"] = "greedy"
        (tmp_path / "greedy").mkdir()
        (tmp_path / "greedy" / JSON_NAME).write_text(json.dumps(doc))
        (tmp_path / "greedy" / TENSORS_NAME).write_bytes((tmp_path / "ok" / TENSORS_NAME).read_bytes())
        load_static_policy(tmp_path / "greedy", 0.3)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / JSON_NAME).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_static_policy(corrupt, 0.5)
    (corrupt / JSON_NAME).write_text((tmp_path / "ok" / JSON_NAME).read_text())
    with pytest.raises(UserError, match="lacks static.safetensors"):
        load_static_policy(corrupt, 0.5)
    (corrupt / TENSORS_NAME).write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_static_policy(corrupt, 0.5)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "ok" / TENSORS_NAME))
    tensors["masks.0.5.mlp"] = ~tensors["masks.0.5.mlp"]  # well-formed, but not what was calibrated
    save_file(tensors, str(corrupt / TENSORS_NAME))
    with pytest.raises(UserError, match="does not belong"):
        load_static_policy(corrupt, 0.5)
    other = build_tiny("llama", seed=5)  # same structure, other weights
    policy = load_static_policy(tmp_path / "ok", 0.5)
    with pytest.raises(UserError, match="different weights"):
        policy.forward(other, torch.tensor([[1, 2, 3]]))
    with pytest.raises(UserError, match="another model"):
        policy.forward(build_tiny("qwen2"), torch.tensor([[1, 2, 3]]))


def test_cli_reports_a_bad_sparsity_file_in_one_line(capsys, llama_dir, tmp_path):
    (tmp_path / JSON_NAME).write_text("[]")
    code = main(["generate", "--model", llama_dir, "--sparsity-from", str(tmp_path), "--prompt", "w1 w2",
                 "--max-new-tokens", "8"])  # within the tiny model's context of 64
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not an attrsparse sparsity file" in err[0]


# -- export ---------------------------------------------------------------------------------------

def masked_logits(model, masks, ids):
    return StaticPolicy("s", 0.5, masks).forward(model, ids).logits


def masked_greedy(model, masks, ids, n):
    with torch.no_grad(), UnitHooks(model) as hooks:
        hooks.mlp_mult, hooks.head_mult = masks.mlp, masks.heads
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "gpt2"])
def test_export_round_trip_with_plain_from_pretrained(tmp_path, name):
    model = build_tiny(name)
    units = unit_map(model)
    cal = calibrate(model, seqs(2))
    masks = A.uniform_masks(cal.scores, 0.5, units)
    info = export_model(model, None, masks, tmp_path / "export", info={"note": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 40, 41], [3, 8, 8, 12, 60, 7, 7, 1]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, masked_logits(model, masks, ids),
                               atol=1e-5, rtol=1e-5)
    prompt = ids[:1, :4]
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       masked_greedy(model, masks, prompt, 6))
    saved = json.loads((tmp_path / "export" / EXPORT_INFO).read_text())
    assert saved["note"] == "test" and saved["size_on_disk_bytes"] > 0
    assert info["params_after"] < info["params_before"]
    assert info["padding_units"]["mlp"] == info["padding_units"]["heads"] == 0  # calibrated: no padding
    config = reloaded.config
    if name == "gpt2":  # head size = hidden / heads: heads stay, dropped heads' columns are zero
        assert not info["heads_sliced"] and config.n_head == 4
    else:
        assert info["heads_sliced"] and config.num_attention_heads == int(masks.heads[0].sum())
        assert config.head_dim == units.head_dim
        expected = (info["maskable_params_after"] / units.maskable_params)
        assert expected == pytest.approx(executed_ratio(masks, units).param)


@pytest.mark.parametrize("name", ARCHS)
def test_slicing_arbitrary_masks_pads_and_stays_exact(name):
    model = build_tiny(name)
    masks = random_masks(unit_map(model), seed=3)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 40, 41]])
    expected = masked_logits(model, masks, ids)
    for exact in (False, True):
        sliced = slice_model(model, masks, exact_mlp=exact)
        torch.testing.assert_close(sliced(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


# -- gathered kernels ---------------------------------------------------------------------------------

def backends():
    out = [TorchBackend()]
    c = gather_backend("auto")
    if isinstance(c, CBackend):
        out.append(c)
    return out


@pytest.mark.parametrize("backend", backends(), ids=lambda b: b.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_products_by_hand(backend, dtype):
    W = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]).to(dtype)
    idx = torch.tensor([1, 3])
    X = torch.tensor([[1.0, 0, -1], [2, 1, 0]])
    # rows: X @ W[[1, 3]].T = [[4 - 6, 10 - 12], [8 + 5, 20 + 11]]
    assert backend.rows(W, idx, X).tolist() == [[-2.0, -2.0], [13.0, 31.0]]
    A_ = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    # cols: A @ W[[1, 3]] = [[4 - 10, 5 - 11, 6 - 12], [2 + 20, 2.5 + 22, 3 + 24]]
    assert backend.cols(W, idx, A_).tolist() == [[-6.0, -6.0, -6.0], [22.0, 24.5, 27.0]]


class RandomChooser(UnitChooser):
    """Seeded random keep-masks per call, recorded for the masked replay."""

    def __init__(self, units, seed=0):
        self.gen, self.units, self.log = torch.Generator().manual_seed(seed), units, []

    def choose_mlp(self, layer, hidden):
        keep = torch.rand(*hidden.shape[:-1], self.units.mlp_size, generator=self.gen) < 0.4
        self.log.append(("mlp", keep))
        return keep

    def choose_heads(self, layer, hidden):
        keep = torch.rand(*hidden.shape[:-1], self.units.num_heads, generator=self.gen) < 0.5
        self.log.append(("heads", keep))
        return keep


def run_runtime_steps(model, chooser, prompts, steps, break_even, backend):
    """Prefill + ``steps`` greedy steps under the runtime; logits of every step ``[B, steps+1, V]``."""
    from transformers import DynamicCache

    ids, attn = left_pad(prompts, 0)
    cache = DynamicCache(config=model.config)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    out, tokens = [], []
    with torch.no_grad(), SparseRuntime(model, chooser, break_even=break_even, backend=backend) as rt:
        for _ in range(steps + 1):
            generated = torch.zeros_like(ids, dtype=torch.bool)
            generated[:, -1] = True  # the last position of each call produces a generated token
            rt.begin(attn[:, -ids.shape[1]:], generated)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache).logits[:, -1]
            rt.end()
            out.append(logits)
            ids = logits.argmax(-1, keepdim=True)
            tokens.append(ids)
            attn = torch.cat([attn, torch.ones_like(ids)], 1)
            positions = positions[:, -1:] + 1
    return torch.stack(out, 1), torch.cat(tokens, 1), rt


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("break_even", [1.0, 0.0], ids=["gathered", "dense-fallback"])
@pytest.mark.parametrize("backend", [b.name for b in backends()])
@pytest.mark.parametrize("name", ARCHS)
def test_gathered_runtime_equals_masked_dense(name, backend, break_even, batch):
    """Batch 1 decoding takes the fused one-token MLP kernel; batch 2 the union of the rows."""
    model = build_tiny(name)
    units = unit_map(model)
    chooser = RandomChooser(units)
    prompts = [torch.tensor([5, 9, 11, 7, 20]), torch.tensor([3, 4, 50])][:batch]
    logits, tokens, rt = run_runtime_steps(model, chooser, prompts, 3, break_even, backend)
    # replay: one dense pass over prompt + generated tokens with the recorded per-position masks
    ids, attn = left_pad(prompts, 0)
    b, p, L = batch, ids.shape[1], units.num_layers
    mlp, heads = [], []
    per_call = 2 * L
    for c in range(len(chooser.log) // per_call):
        entries = chooser.log[c * per_call:(c + 1) * per_call]
        q = p if c == 0 else 1
        mlp.append(torch.stack([k.reshape(b, q, -1) for kind, k in entries if kind == "mlp"], 2))
        heads.append(torch.stack([k.reshape(b, q, -1) for kind, k in entries if kind == "heads"], 2))
    full = torch.cat([ids, tokens[:, :-1]], 1)
    full_attn = torch.cat([attn, torch.ones(b, tokens.shape[1] - 1, dtype=attn.dtype)], 1)
    with torch.no_grad(), UnitHooks(model) as hooks:
        hooks.mlp_mult, hooks.head_mult = torch.cat(mlp, 1), torch.cat(heads, 1)
        ref = model(input_ids=full, attention_mask=full_attn,
                    position_ids=(full_attn.cumsum(-1) - 1).clamp(min=0)).logits[:, p - 1:]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert rt.executed.tokens == batch * 4  # one generated-token position per row and call
    assert rt.prompt_executed.tokens == [4, 4 + 2][batch - 1]  # the other real prompt positions
    if break_even == 0.0:
        assert rt.computed_fraction == pytest.approx(1.0)
    else:
        assert rt.computed_fraction < 1.0


def test_runtime_restores_the_model(make_tiny):
    model = make_tiny("llama")
    before = [type(m) for m in model.modules()]
    ids = torch.tensor([[1, 5, 9]])
    ref = model(input_ids=ids).logits
    with SparseRuntime(model, StaticChooser(UnitMasks.dense(unit_map(model))), break_even=1.0):
        pass
    assert [type(m) for m in model.modules()] == before
    torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_gathered_runtime_in_bfloat16(make_tiny):
    """bf16 weights: the C kernels read bf16 and accumulate in fp32; compared with fp32 masked dense
    computation on the same (bf16-rounded) weights, to bf16 precision."""
    model = make_tiny("llama", dtype=torch.bfloat16)
    reference = make_tiny("llama", dtype=torch.bfloat16).float()
    units = unit_map(model)
    masks = random_masks(units, seed=4)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 40, 41]])
    with torch.no_grad(), SparseRuntime(model, StaticChooser(masks), break_even=1.0) as rt:
        rt.begin(torch.ones_like(ids, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool))
        out = [model(input_ids=ids[:, :t + 1]).logits[:, -1] for t in range(ids.shape[1])]
        got = torch.stack(out, 1).float()
    expected = masked_logits(reference, masks, ids)
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.05 * scale
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_static_gxo_selector_calibrates_when_prepared(make_tiny):
    model = make_tiny("llama")
    policy = make_policy("static_gxo", 0.5)
    assert policy.mode == "static" and policy.needs_calibration
    policy.prepare(model, seqs(2))
    assert executed_ratio(policy.masks, unit_map(model)).param == pytest.approx(0.5)
    ids = torch.tensor([[1, 5, 9, 17]])
    torch.testing.assert_close(policy.forward(model, ids).logits, masked_logits(model, policy.masks, ids))
    # in the oracle sweep: the same static masks repeated at every target token
    from attrsparse import get_metric, trace_gradients

    trace = trace_gradients(model, ids[0, :2], ids[0, 2:]).row(0)
    (masks,) = get_metric("static_gxo").masks_for_many(None, [0.5], model=model, trace=trace,
                                                       units=unit_map(model), calibration=seqs(2))
    assert masks.mlp.shape == (2, 2, 48) and torch.equal(masks.mlp[1], policy.masks.mlp)


# -- generate ----------------------------------------------------------------------------------------

def test_generate_static_dynamic_and_masked_agree(tmp_path, calib_text, llama_dir):
    model, tok = AutoModelForCausalLM.from_pretrained(llama_dir).eval(), tiny_tokenizer()
    run_calibration(model, tok, tmp_path, ratios=[0.5], calib=calib_text, n_sequences=2, seq_len=16,
                    progress=False)
    prompts = ["w1 w2 w3 w4", "w9 w10"]
    static = generate((model, tok), prompts, str(tmp_path), max_new_tokens=6, template="raw",
                      stop_at_eos=False)
    policy = load_static_policy(tmp_path, 0.5)
    dynamic = generate((model, tok), prompts, StaticChooser(policy.masks), max_new_tokens=6,
                       template="raw", stop_at_eos=False, break_even=1.0)
    assert static.mode == "static" and dynamic.mode == "dynamic"
    for row, text in enumerate(prompts):
        ids = tok(text, return_tensors="pt").input_ids
        expected = masked_greedy(model, policy.masks, ids, 6)[0, ids.shape[1]:]
        assert torch.equal(static.tokens[row], expected)
        assert torch.equal(dynamic.tokens[row], expected)
    assert static.executed.param == pytest.approx(0.5) and static.computed_fraction == pytest.approx(0.5)
    assert dynamic.executed.param == pytest.approx(0.5)
    assert dynamic.computed_fraction > 0.5  # keys/values of every group are computed
    assert static.decode_tokens == 2 * 5 and static.tokens_per_s > 0
    dense = generate((model, tok), prompts[:1], None, max_new_tokens=6, template="raw", stop_at_eos=False)
    ids = tok(prompts[0], return_tensors="pt").input_ids
    assert torch.equal(dense.tokens[0], model.generate(ids, max_new_tokens=6, do_sample=False,
                                                        pad_token_id=0)[0, ids.shape[1]:])
    assert dense.executed.param == pytest.approx(1.0)


# -- command line --------------------------------------------------------------------------------------

def test_cli_calibrate_export_generate(capsys, tmp_path, llama_dir, calib_text):
    sparsity, export = tmp_path / "sparsity", tmp_path / "export"
    assert main(["calibrate", "--model", llama_dir, "--ratios", "0.5", "--calib", calib_text,
                 "--n-seq", "2", "--seq-len", "16", "--out", str(sparsity)]) == 0
    assert main(["export", "--model", llama_dir, "--ratio", "0.5", "--sparsity-from", str(sparsity),
                 "--eval-seqs", "2", "--data-eval", calib_text, "--seq-len", "16", "--out", str(export)]) == 0
    info = json.loads((export / EXPORT_INFO).read_text())
    assert info["quality"]["ppl_export"] > 0 and info["executed_ratio"] == pytest.approx(0.5)
    capsys.readouterr()
    assert main(["generate", "--model", str(export), "--prompt", "w1 w2", "--template", "raw",
                 "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "dense" and out["new_tokens"] == [3]
    assert main(["calibrate", "--model", llama_dir, "--ratios", "0.5,2", "--out", str(sparsity)]) == 2
    assert main(["calibrate", "--model", llama_dir, "--allocation", "best", "--calib", calib_text,
                 "--n-seq", "2", "--seq-len", "16", "--out", str(tmp_path / "x")]) == 2


# -- the packaged model -----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_export_loads_stock_and_matches_masks(tmp_path):
    from attrsparse import load_model

    model, tok = load_model("smollm2-135m")
    cal = calibrate(model, [tok("The history of the city begins in the year", return_tensors="pt").input_ids[0]])
    masks = A.uniform_masks(cal.scores, 0.5, unit_map(model))
    info = export_model(model, tok, masks, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = tok("Why is the sky blue?", return_tensors="pt").input_ids
    torch.testing.assert_close(reloaded(input_ids=ids).logits, masked_logits(model, masks, ids),
                               atol=1e-4, rtol=1e-4)
    assert info["params_after"] < info["params_before"] and info["padding_units"]["mlp"] == 0
