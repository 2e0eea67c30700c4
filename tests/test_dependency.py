"""The dependency analysis (attrsparse.experiments.dependency) on a tiny in-code Llama.

Semantics under test: a unit removed at target token t only, with the dense keys/values of every
other position, is incremental decoding with a dense cache; the loss change is compared with an
independent step-by-step computation on a copy whose weights have the unit zeroed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, build_tiny
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import DynamicCache, PreTrainedTokenizerFast

from attrsparse import unit_map
from attrsparse.core.reference import reference_trace
from attrsparse.core.trace import token_losses, trace_gradients
from attrsparse.core.units import zero_head_, zero_mlp_unit_
from attrsparse.experiments.dependency import (
    DependencyConfig,
    ablation_deltas,
    ablation_errors,
    error_stats,
    run_dependency,
    sample_ablations,
    score_change,
)
from attrsparse.scores import get_score

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = torch.tensor([1, 5, 9, 17, 33])
TARGET = torch.tensor([7, 8, 40, 3, 11, 12])


@pytest.fixture(scope="module")
def model():
    return build_tiny("llama")


def word_tokenizer():
    words = ["<pad>", "<s>", "</s>", "<unk>"]
    text = (FIXTURES / "truthfulqa_3.csv").read_text()
    for w in text.replace(",", " ").replace("?", " ").split():
        if w not in words and len(words) < VOCAB:
            words.append(w)
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


@torch.no_grad()
def incremental_losses(dense, ablated, prompt, target) -> torch.Tensor:
    """loss_t of ``ablated`` at step t, with a dense model's cache of every earlier position."""
    ids = torch.cat([prompt, target[:-1]])
    p = prompt.numel()
    out = []
    for t in range(target.numel()):
        pos = p - 1 + t
        cache = DynamicCache(config=dense.config)
        if pos > 0:
            dense(input_ids=ids[:pos].view(1, -1), cache=cache, use_cache=True)
        logits = ablated(input_ids=ids[pos:pos + 1].view(1, 1), cache=cache, use_cache=True).logits
        out.append(token_losses(logits[:, -1:], target[t:t + 1])[0, 0])
    return torch.stack(out)


def test_ratio_one_gives_no_change(model):
    ch = score_change(model, PROMPT, TARGET, [1.0, 0.5, 0.1])
    units = unit_map(model)
    assert ch["mlp"].shape == (3, TARGET.numel(), units.num_layers - units.num_layers // 2)
    for key in ("mlp", "heads", "mlp_kept", "heads_kept"):
        assert float(ch[key][0].abs().max()) < 1e-6, key
    assert float(ch["mlp"][1].mean()) > 1e-3 and float(ch["mlp"][2].mean()) > 1e-3
    assert float(ch["heads"][2].mean()) > 1e-3


def test_ablation_of_silent_unit_is_zero():
    model = build_tiny("llama")
    layer, unit = 1, 5
    with torch.no_grad():  # x_unit = silu(gate) * up = 0 everywhere
        model.model.layers[layer].mlp.up_proj.weight[unit] = 0
    # the silent unit at token 2 shares its row with live removals at tokens 0 and 4
    abl = [("mlp", 0, 3, 0), ("mlp", layer, unit, 2), ("heads", 0, 1, 4), ("mlp", layer, unit, 3)]
    trace = trace_gradients(model, PROMPT, TARGET).row(0)
    assert float(trace.mlp_x[:, layer, unit].abs().max()) == 0.0
    errs = ablation_errors(model, PROMPT, TARGET, trace, abl)
    assert errs["delta_loss"][1] == 0.0 and errs["delta_loss"][3] == 0.0
    assert errs["bound"][1] == 0.0 and errs["gxo_pred"][1] == 0.0
    assert abs(errs["delta_loss"][0]) > 0 and abs(errs["delta_loss"][2]) > 0  # live units do count


@pytest.mark.parametrize("chunk", [1, 8])
def test_delta_matches_incremental_reference(model, chunk):
    units = unit_map(model)
    t_len = TARGET.numel()
    abl = sample_ablations(units, t_len, 2 * t_len, 0.5, torch.Generator().manual_seed(3))
    assert {k for k, *_ in abl} == {"mlp", "heads"}
    deltas = ablation_deltas(model, PROMPT, TARGET, abl, chunk=chunk)
    assert deltas.shape == (len(abl),) and torch.isfinite(deltas).all()
    dense_losses = reference_trace(model, PROMPT, TARGET).losses
    for a, (kind, layer, idx, t) in enumerate(abl):
        ablated = copy.deepcopy(model)
        (zero_mlp_unit_ if kind == "mlp" else zero_head_)(ablated, layer, idx)
        # incremental decoding: dense cache of every earlier position, the unit removed at step t
        expected = incremental_losses(model, ablated, PROMPT, TARGET)[t] - dense_losses[t]
        assert abs(float(deltas[a]) - float(expected)) < 2e-5, (kind, layer, idx, t)


def test_delta_matches_weight_zeroed_reference_at_first_token(model):
    """With a one-token prompt, step 0 has no context: zeroing the weights is the same removal."""
    units = unit_map(model)
    abl = [a for a in sample_ablations(units, TARGET.numel(), 12, 0.5, torch.Generator().manual_seed(5))
           if a[3] == 0]
    deltas = ablation_deltas(model, PROMPT[:1], TARGET, abl)
    base = reference_trace(model, PROMPT[:1], TARGET).losses[0]
    for a, (kind, layer, idx, _) in enumerate(abl):
        ablated = copy.deepcopy(model)
        (zero_mlp_unit_ if kind == "mlp" else zero_head_)(ablated, layer, idx)
        ref = reference_trace(ablated, PROMPT[:1], TARGET).losses[0] - base
        assert abs(float(deltas[a]) - float(ref)) < 2e-5


def test_first_order_quantities(model):
    units = unit_map(model)
    t_len = TARGET.numel()
    abl = sample_ablations(units, t_len, 3 * t_len, 0.5, torch.Generator().manual_seed(0))
    trace = trace_gradients(model, PROMPT, TARGET).row(0)
    errs = ablation_errors(model, PROMPT, TARGET, trace, abl)

    gxo = get_score("gxo").from_trace(trace)
    cor = get_score("corrected_gxo").from_trace(trace)
    s = np.array([float(getattr(gxo, k)[t, l, i]) for k, l, i, t in abl])
    c = np.array([float(getattr(cor, k)[t, l, i]) for k, l, i, t in abl])
    np.testing.assert_allclose(errs["gxo_pred"], s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(errs["gxo_pred"] + 0.5 * errs["bound"], c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(errs["gxo_error"], errs["delta_loss"] - s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(errs["corrected_error"], errs["delta_loss"] - c, rtol=1e-5, atol=1e-6)
    stats = error_stats(errs)
    assert stats["all"]["n"] == len(abl)
    assert stats["mlp"]["n"] + stats["heads"]["n"] == stats["all"]["n"]
    assert 0.0 <= stats["all"]["within_bound"] <= 1.0


def test_sampling_is_seeded_and_packed(model):
    units = unit_map(model)
    a = sample_ablations(units, 6, 10, 0.25, torch.Generator().manual_seed(7))
    b = sample_ablations(units, 6, 10, 0.25, torch.Generator().manual_seed(7))
    c = sample_ablations(units, 6, 10, 0.25, torch.Generator().manual_seed(8))
    assert a == b and a != c
    assert len(a) == 12 and len(set(a)) == 12  # rounded up to two rows of 6 tokens
    assert [x[3] for x in a] == list(range(6)) * 2
    assert sum(k == "heads" for k, *_ in a) == 3


def test_run_writes_json_and_is_deterministic(tmp_path):
    model, tok = build_tiny("llama"), word_tokenizer()
    cfg = dict(model="tiny-llama", data=str(FIXTURES / "truthfulqa_3.csv"), limit=2,
               ratios=[0.3, 1.0], max_new_tokens=4, ablations=5, chunk=2, max_samples=15)
    r1 = run_dependency(DependencyConfig(**cfg), tmp_path / "a", model=model, tokenizer=tok,
                        progress=False)
    r2 = run_dependency(DependencyConfig(**cfg), tmp_path / "b", model=model, tokenizer=tok,
                        progress=False)
    data = json.loads((tmp_path / "a" / "dependency.json").read_text())
    for key in ("model", "template", "n_questions", "ratios", "mlp_change_pct", "heads_change_pct",
                "definition", "error_samples", "error_stats", "paper_fig5", "timings",
                "change_formula", "mlp_change_pct_kept", "label_loss_masked"):
        assert key in data, key
    assert data["n_questions"] == 2 and data["template"] == "paper"
    assert data["ratios"] == [0.3, 1.0] and len(data["mlp_change_pct"]) == 2
    assert abs(data["mlp_change_pct"][1]) < 1e-3 and abs(data["heads_change_pct"][1]) < 1e-3
    samples = data["error_samples"]
    assert {"gxo_error", "corrected_error", "bound"} <= set(samples)
    assert len(samples["bound"]) == len(samples["gxo_error"]) <= 15
    assert data["error_stats"]["n_samples_total"] == 2 * 8  # 5 rounded up to 2 rows of 4 tokens
    assert (tmp_path / "a" / "dependency.png").is_file()
    for key in ("mlp_change_pct", "heads_change_pct", "error_samples", "error_stats"):
        assert r1[key] == r2[key], key
