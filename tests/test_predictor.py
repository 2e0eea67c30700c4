"""Contextual predictors (attrsparse.deploy.predictor) on tiny in-code models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import build_tiny

from attrsparse import unit_map
from attrsparse.cli.main import main
from attrsparse.core.errors import UserError
from attrsparse.core.hooks import UnitHooks
from attrsparse.core.trace import model_logits
from attrsparse.core.units import UnitMasks, UnitScores, executed_ratio, layer_param_fractions
from attrsparse.deploy.predictor import (
    PredictorConfig,
    collect_training_data,
    evaluate_predictor,
    train_predictor,
)
from attrsparse.policies import OraclePolicy, account, make_policy
from attrsparse.policies.predictor import (
    PredictorPolicy,
    load_predictor,
    load_predictor_policy,
    save_predictor,
)
from attrsparse.selectors import get_metric
from attrsparse.selectors.budget import BudgetRule
from attrsparse.selectors.predictor import Predictor, layer_ratios_from_masks
from attrsparse.selectors.progressive import budget_masks

RATIOS = [0.3, 0.5, 0.7]
FAST = PredictorConfig(rank=16, head_rank=8, epochs=30, lr=1e-2, batch_size=32, seed=0)


def sequences(n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (length,), generator=gen) for _ in range(n)]


def untrained(model, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    return Predictor.for_units(unit_map(model), model.config.hidden_size, rank=8, head_rank=4)


@pytest.fixture(scope="module")
def trained_llama():
    """(model, training data, held-out data, predictor) of the tiny Llama."""
    model = build_tiny("llama")
    torch.set_num_threads(1)
    data = collect_training_data(model, sequences(12, 16))
    held = collect_training_data(model, sequences(3, 16, seed=1))
    predictor = train_predictor(data, unit_map(model), RATIOS, FAST)
    return model, data, held, predictor


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8, 1.0])
def test_budget_rule_is_the_labels_allocation(make_tiny, ratio):
    model = make_tiny("llama")
    units = unit_map(model)
    gen = torch.Generator().manual_seed(3)
    scores = UnitScores(torch.randn(7, units.num_layers, units.mlp_size, generator=gen),
                        torch.randn(7, units.num_layers, units.num_heads, generator=gen))
    ours = BudgetRule(units, ratio).masks(scores)
    theirs = budget_masks(scores, ratio, units, head_power=0.5)
    assert torch.equal(ours.mlp, theirs.mlp) and torch.equal(ours.heads, theirs.heads)


def test_layer_ratios_give_each_layer_its_own_budget(make_tiny):
    """A chooser with one ratio per layer picks in layer l exactly what the uniform chooser at
    that layer's ratio picks; the wrong number of ratios or a ratio outside (0, 1] is refused."""
    model = make_tiny("llama")
    units = unit_map(model)
    predictor = untrained(model)
    ratios = [0.4 + 0.5 * l / (units.num_layers - 1) for l in range(units.num_layers)]
    per_layer = predictor.chooser(0.5, units, ratios)
    h = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    counts = set()
    for l, r in enumerate(ratios):
        uniform = predictor.chooser(r, units)
        heads = per_layer.choose_heads(l, h)
        assert torch.equal(heads, uniform.choose_heads(l, h))
        mlp = per_layer.choose_mlp(l, h)
        assert torch.equal(mlp, uniform.choose_mlp(l, h))
        counts.add(int(mlp.sum()))
    assert len(counts) == units.num_layers  # the budgets really differ between layers
    policy = PredictorPolicy("p", 0.5, predictor, ratios)  # the policy runs them, layer by layer
    out = policy.forward(model, torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2)))
    executed = layer_param_fractions(out.masks.mlp, out.masks.heads, units).mean((0, 1))
    assert executed.tolist() == pytest.approx(ratios, abs=0.06)
    assert policy.describe()["layer_ratios"] == ratios
    with pytest.raises(UserError, match="layer ratios"):
        predictor.chooser(0.5, units, ratios[:-1])
    with pytest.raises(UserError):
        predictor.chooser(0.5, units, [1.5] * units.num_layers)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0])
def test_head_power_sets_the_heads_and_the_mlp_fills_the_rest(make_tiny, power):
    """Heads keep round(H * ratio ** power) (at least 1) and the MLP units fill the same layer
    budget as the labels' rule with that exponent; a negative exponent is refused."""
    model = make_tiny("llama")
    units = unit_map(model)
    predictor = untrained(model)
    h = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    chooser = predictor.chooser(0.6, units, head_power=power)
    heads = chooser.choose_heads(0, h)
    assert (heads.sum(-1) == max(1, round(units.num_heads * 0.6 ** power))).all()
    assert torch.equal(chooser.choose_mlp(0, h), BudgetRule(units, 0.6, power).mlp(predictor.mlp_logits(0, h), heads))
    with pytest.raises(UserError, match="head power"):
        predictor.chooser(0.6, units, head_power=-1)


def test_layer_ratios_from_masks_count_parameters_by_hand(make_tiny):
    """Per-layer fractions of static masks, counted by hand; their mean is the masks' executed
    ratio (so a predictor given them executes the allocation's ratio)."""
    model = make_tiny("llama")
    u = unit_map(model)
    masks = UnitMasks.dense(u)
    masks.mlp[1, u.mlp_size // 2:] = False  # layer 1: half the MLP
    masks.heads[1, :u.group_size] = False  # and the whole first key/value group
    ratios = layer_ratios_from_masks(masks, u)
    layer = u.mlp_params_per_layer + u.attn_params_per_layer
    dropped = (u.mlp_size - u.mlp_size // 2) * u.mlp_unit_params + u.group_size * u.head_params + u.kv_group_params
    assert ratios[0] == pytest.approx(1.0)
    assert ratios[1] == pytest.approx((layer - dropped) / layer)
    assert sum(ratios) / len(ratios) == pytest.approx(executed_ratio(masks, u).param)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_labels_are_the_oracle_policy_masks(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    ids = sequences(1, 9, seed=5)[0]
    data = collect_training_data(model, [ids])
    assert data.attn_in.shape == (units.num_layers, 9, 32) and data.mlp_in.shape == (units.num_layers, 9, 32)
    assert data.mlp_rank.shape == (units.num_layers, 9, units.mlp_size)
    assert data.head_rank.dtype == torch.int16
    for ratio in (0.3, 0.6):
        oracle = OraclePolicy(get_metric("budget_gxo"), ratio).row_masks(model, ids)  # [S, L, *]
        for layer in range(units.num_layers):
            ours = data.labels(layer, ratio, units)
            assert torch.equal(ours.mlp, oracle.mlp[:, layer])
            assert torch.equal(ours.heads, oracle.heads[:, layer])


def test_block_inputs_are_the_normed_hidden_states(make_tiny):
    model = make_tiny("llama")
    ids = sequences(1, 6)[0]
    data = collect_training_data(model, [ids])
    layer0 = model.model.layers[0]
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids.unsqueeze(0))
        expected = layer0.input_layernorm(embeds)[0]
    torch.testing.assert_close(data.attn_in[0], expected, rtol=0, atol=1e-6)


def test_training_is_deterministic_with_a_seed(make_tiny):
    model = make_tiny("qwen2")
    units = unit_map(model)
    data = collect_training_data(model, sequences(3, 8))
    config = PredictorConfig(rank=8, head_rank=4, epochs=3, batch_size=8, seed=7)
    first = train_predictor(data, units, RATIOS, config).state_dict()
    state = torch.random.get_rng_state()
    second = train_predictor(data, units, RATIOS, config).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = train_predictor(data, units, RATIOS, dataclasses.replace(config, seed=8)).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_recall_beats_random_and_executed_ratio_is_requested(trained_llama):
    model, data, held, predictor = trained_llama
    units = unit_map(model)
    half_unit = 0.5 * units.mlp_unit_params / (units.mlp_params_per_layer + units.attn_params_per_layer)
    for ratio in RATIOS:
        fit = evaluate_predictor(predictor, data, units, ratio)
        assert abs(fit["executed_ratio_predicted"] - ratio) <= half_unit + 1e-9
        assert abs(fit["executed_ratio_oracle"] - ratio) <= half_unit + 1e-9
        chance = fit["random_recall_mlp"]  # kept fraction: a random choice's expected recall
        assert (fit["recall_mlp"] - chance) / (1 - chance) > 0.25
        assert fit["recall_heads"] > fit["random_recall_heads"] + 0.05
        before = evaluate_predictor(untrained(model), data, units, ratio)
        assert fit["recall_param"] > before["recall_param"] + 0.1
    held_out = evaluate_predictor(predictor, held, units, 0.5)
    assert held_out["recall_mlp"] > held_out["random_recall_mlp"] + 0.1


def test_evaluation_counts_by_hand(make_tiny):
    """A predictor whose logits are the oracle's own scores has recall and precision 1."""
    model = make_tiny("llama")
    units = unit_map(model)
    data = collect_training_data(model, sequences(2, 6))
    predictor = untrained(model)

    class Oracle(torch.nn.Module):  # logits = -rank of the stored oracle order for the data rows
        def __init__(self, ranks):
            super().__init__()
            self.ranks = ranks

        def forward(self, h):
            return -self.ranks.float()

    predictor.mlp = torch.nn.ModuleList(Oracle(data.mlp_rank[l]) for l in range(units.num_layers))
    predictor.heads = torch.nn.ModuleList(Oracle(data.head_rank[l]) for l in range(units.num_layers))
    result = evaluate_predictor(predictor, data, units, 0.5)
    assert result["recall_mlp"] == result["precision_mlp"] == result["recall_heads"] == 1.0
    assert result["executed_ratio_predicted"] == result["executed_ratio_oracle"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "phi", "phi3", "gemma3_text"])
def test_policy_masks_are_the_masked_dense_computation(make_tiny, name):
    model = make_tiny(name)
    units = unit_map(model)
    policy = PredictorPolicy("p", 0.5, untrained(model))
    ids = torch.stack(sequences(2, 7, seed=2))
    out = policy.forward(model, ids)
    assert out.masks.mlp.shape == (2, 7, units.num_layers, units.mlp_size)
    assert torch.all(out.masks.heads.sum(-1) == BudgetRule(units, 0.5).head_keep)
    # the same masks applied as fixed multipliers give the same logits ...
    captured: dict = {}
    handles = [m.register_forward_pre_hook(lambda _m, a, l=l: captured.__setitem__(l, a[0].reshape(2, 7, -1)))
               for l, m in enumerate(units.attn_in_modules)]
    with torch.no_grad(), UnitHooks(model) as hooks:
        hooks.mlp_mult, hooks.head_mult = out.masks.mlp, out.masks.heads
        logits = model_logits(model, ids, None)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    # ... and each layer's heads were predicted from the *sparse* upstream state
    chooser = policy.predictor.chooser(0.5, units)
    for layer in range(units.num_layers):
        assert torch.equal(chooser.choose_heads(layer, captured[layer]), out.masks.heads[:, :, layer])
    dense = model_logits(model, ids, None)
    assert not torch.allclose(dense, out.logits, atol=1e-3)  # the masks really changed the output


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_policy_at_ratio_one_is_dense(make_tiny, name):
    model = make_tiny(name)
    ids = torch.stack(sequences(2, 6, seed=4))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = PredictorPolicy("p", 1.0, untrained(model)).forward(model, ids, mask)
    assert out.masks.mlp.all() and out.masks.heads.all()
    torch.testing.assert_close(out.logits, model_logits(model, ids, mask), rtol=0, atol=0)
    assert account(out.masks, mask, unit_map(model)).param == 1.0


def test_save_load_round_trip_and_make_policy(trained_llama, tmp_path):
    model, _, held, predictor = trained_llama
    save_predictor(predictor, tmp_path)
    loaded = load_predictor(tmp_path)
    state = predictor.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    assert loaded.meta["ratios"] == RATIOS and loaded.rank == FAST.rank
    policy = make_policy(f"predictor:{tmp_path}", 0.5)
    assert isinstance(policy, PredictorPolicy) and policy.mode == "predictor" and policy.deployable
    ids = torch.stack(sequences(2, 8, seed=9))
    a = PredictorPolicy("a", 0.5, predictor).forward(model, ids)
    b = policy.forward(model, ids)
    assert torch.equal(a.masks.mlp, b.masks.mlp) and torch.equal(a.logits, b.logits)


def _expect_user_error(fn, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_predictor_files_give_one_line_errors(trained_llama, make_tiny, tmp_path):
    from safetensors.torch import save_file

    model, _, _, predictor = trained_llama
    _expect_user_error(lambda: load_predictor(tmp_path / "nowhere"), "no predictor at")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "predictor.safetensors").write_bytes(b"\x00garbage" * 10)
    _expect_user_error(lambda: load_predictor(tmp_path / "corrupt"), "not a readable predictor")
    (tmp_path / "bare").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "bare" / "predictor.safetensors"))
    _expect_user_error(lambda: load_predictor(tmp_path / "bare"), "lacks valid predictor metadata")
    path = save_predictor(predictor, tmp_path / "good")
    raw = path.read_bytes()
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "predictor.safetensors").write_bytes(raw[: len(raw) // 2])
    _expect_user_error(lambda: load_predictor(tmp_path / "truncated"), "not a readable predictor")
    # metadata that does not match the tensors
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["attrsparse_predictor"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    (tmp_path / "shape").mkdir()
    save_file(tensors, str(tmp_path / "shape" / "predictor.safetensors"),
              metadata={"attrsparse_predictor": json.dumps({**meta, "rank": meta["rank"] + 1})})
    _expect_user_error(lambda: load_predictor(tmp_path / "shape"), "has shape")
    # another model: different architecture, then same architecture with other weights
    policy = load_predictor_policy(tmp_path / "good", 0.5)
    ids = torch.stack(sequences(1, 5))
    _expect_user_error(lambda: policy.forward(make_tiny("qwen2"), ids), "trained for another model")
    predictor.meta["model"] = {"spec": "tiny", "fingerprint": "0" * 16}
    save_predictor(predictor, tmp_path / "fp")
    predictor.meta.pop("model")
    _expect_user_error(lambda: load_predictor_policy(tmp_path / "fp", 0.5).forward(model, ids),
                       "different weights")
    _expect_user_error(lambda: load_predictor_policy(tmp_path / "good"), "choose one with --ratio")
    _expect_user_error(lambda: load_predictor_policy(tmp_path / "good", 1.5), "ratio")


def test_chooser_drives_the_sparse_runtime(trained_llama, tmp_path):
    """Greedy decoding with a KV cache under the chooser equals the teacher-forced policy's greedy
    decoding (the masks of a position depend only on that position's own block inputs)."""
    from attrsparse.deploy.runtime import generate

    model, _, _, predictor = trained_llama
    save_predictor(predictor, tmp_path)
    prompt = sequences(1, 5, seed=11)[0]
    policy = load_predictor_policy(tmp_path, 0.5)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, policy.forward(model, seq.unsqueeze(0)).logits[0, -1].argmax().view(1)])
    for break_even in (0.0, 1.0):
        result = generate(model, [prompt], f"predictor:{tmp_path}", ratio=0.5, max_new_tokens=6,
                          stop_at_eos=False, break_even=break_even, backend="torch")
        assert torch.equal(result.tokens[0], seq[prompt.numel():])
        assert abs(result.executed.param - 0.5) < 0.02
    dense = generate(model, [prompt], predictor.chooser(1.0, unit_map(model)), max_new_tokens=6,
                     stop_at_eos=False, break_even=0.0, backend="torch")
    assert torch.equal(dense.tokens[0], generate(model, [prompt], None, max_new_tokens=6, stop_at_eos=False).tokens[0])


def test_train_predictor_command(tiny_truthfulqa_lm, tmp_path, capsys):
    model, tok = tiny_truthfulqa_lm()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    text = tmp_path / "calib.txt"
    words = " ".join(tok.convert_ids_to_tokens(list(range(3, len(tok)))))
    text.write_text((words + " ") * 4)
    args = ["train-predictor", "--model", str(tmp_path / "model"), "--calib", str(text), "--n-seq", "3",
            "--holdout", "1", "--seq-len", "12", "--epochs", "2", "--rank", "4", "--head-rank", "2",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "predictor.json").read_text())
    assert [e["ratio"] for e in report["heldout"]] == RATIOS
    assert report["calibration"] == {"source": str(text), "data": None, "train_sequences": 3,
                                     "heldout_sequences": 1, "seq_len": 12}
    assert 0 < report["cost"]["layer_cost_ratio"] < 1
    assert "held-out recall" in capsys.readouterr().out
    weights = (tmp_path / "out" / "predictor.safetensors").read_bytes()
    assert main(args) == 0  # the labels come from the cache; training is reproducible
    assert json.loads((tmp_path / "out" / "predictor.json").read_text())["timing_s"]["labels_cached"]
    assert (tmp_path / "out" / "predictor.safetensors").read_bytes() == weights
    capsys.readouterr()
    assert main(args[:-2] + ["--ratios", "0.5,2", "--out", str(tmp_path / "bad")]) == 2
    assert main(args[:-2] + ["--rank", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("attrsparse: error:") for line in err)


@pytest.mark.slow
def test_smollm2_cost_and_dense_at_one():
    """SmolLM2-135M (d 576, N 1536, 9 heads of 64, 3 kv heads): the predictor's multiply-adds by hand."""
    from attrsparse import load_model

    model, tok = load_model("smollm2-135m")
    units = unit_map(model)
    predictor = Predictor.for_units(units, 576, rank=64, head_rank=32)
    cost = predictor.cost(units)
    assert cost["mlp_predictor_macs"] == 576 * 64 + 64 * 1536
    assert cost["head_predictor_macs"] == 576 * 32 + 32 * 9
    assert cost["dense_mlp_macs"] == 3 * 576 * 1536
    assert cost["dense_attention_macs"] == 2 * 576 * 576 + 2 * 576 * 192
    assert cost["mlp_cost_ratio"] < 0.1 and cost["layer_cost_ratio"] < 0.05
    ids = tok("The sky is blue because", return_tensors="pt").input_ids
    out = PredictorPolicy("p", 1.0, predictor).forward(model, ids)
    torch.testing.assert_close(out.logits, model_logits(model, ids, None), rtol=0, atol=0)
    half = PredictorPolicy("p", 0.5, predictor).forward(model, ids)
    assert torch.all(half.masks.heads.sum(-1) == 6)  # round(9 * 0.5 ** 0.5)
    assert abs(account(half.masks, None, units).param - 0.5) < 0.5 * 1728 / (3 * 576 * 1536 + 884736) + 1e-9
