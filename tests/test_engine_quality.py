"""Perplexity on the engines' own logits (attrsparse.evaluation.engine_quality) against the
PyTorch evaluation over the same strided windows."""

from __future__ import annotations

import math

import pytest
import torch

from attrsparse.core.errors import UserError
from attrsparse.deploy.engine import ChannelRules, Engine, SiteRule, pack
from attrsparse.evaluation import Evaluator
from attrsparse.evaluation.engine_quality import llamacpp_perplexity, native_perplexity
from attrsparse.evaluation.evaluate import scored_windows
from attrsparse.policies import DensePolicy

IDS = [int(x) for x in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(3))]


class DigitTok:
    """Token ids written as space-separated numbers (no special tokens)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        return type("E", (), {"input_ids": torch.tensor([[int(x) for x in text.split()]])})()


def test_scored_windows_score_every_token_once():
    for n, window, stride in [(40, 64, 64), (40, 16, 8), (40, 16, 16), (40, 10, 3), (2, 8, 4)]:
        wins = list(scored_windows(n, window, stride))
        scored = [t for _, end, first in wins for t in range(first, end)]
        assert scored == list(range(1, n))  # every token but the first, once, in order
        assert all(first > begin and end - begin <= window for begin, end, first in wins)
    assert list(scored_windows(10, 4, 2)) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(UserError, match="at least 2 tokens"):
        list(scored_windows(1, 8, 4))


@pytest.mark.parametrize("window,stride", [(64, 64), (16, 8), (10, 3)])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_native_perplexity_equals_the_pytorch_evaluation(make_tiny, tmp_path, arch, window, stride):
    model = make_tiny(arch)
    want = Evaluator(model, DigitTok(), DensePolicy()).perplexity(" ".join(map(str, IDS)), window=window,
                                                                   stride=stride)
    with Engine(pack(model, "fp32", directory=tmp_path), threads=2, max_ctx=64) as eng:
        got = native_perplexity(eng, IDS, window=window, stride=stride)
    assert got["n_tokens"] == want["n_tokens"] == 39
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert got["read_ratio"] == 1.0


def test_native_perplexity_runs_the_rules_and_refuses_a_short_context(make_tiny, tmp_path):
    model = make_tiny("llama")
    path = pack(model, "int8", directory=tmp_path)
    rules = ChannelRules({(layer, site): SiteRule(threshold=0.3) for layer in range(2)
                          for site in ("attn_in", "mlp_in", "attn_out", "mlp_out")})
    with Engine(path, threads=1, max_ctx=16) as eng:
        dense = native_perplexity(eng, IDS, window=16, stride=8)
        eng.set_rules(rules)
        sparse = native_perplexity(eng, IDS, window=16, stride=8)
        with pytest.raises(UserError, match="window 32 exceeds the engine's context of 16"):
            native_perplexity(eng, IDS, window=32, stride=8)
    assert sparse["read_ratio"] < 0.9 and sparse["ppl"] != dense["ppl"]
    assert math.isfinite(sparse["ppl"]) and dense["read_ratio"] == 1.0


def test_native_perplexity_of_an_input_sparse_head(make_tiny, tmp_path):
    """An input-major head: no rule gives the rows head's perplexity, agreement 1 and head read 1; a
    rule lowers the head's read ratio and the agreement (the argmax match of its logits with the
    full head's), and leaves the decoder linears' read ratio alone."""
    model = make_tiny("gemma3_text")
    with Engine(pack(model, "fp32", directory=tmp_path), threads=2, max_ctx=16) as eng:
        rows = native_perplexity(eng, IDS, window=16, stride=8)
    assert "top1_agreement" not in rows
    with Engine(pack(model, "fp32", head_layout="input", directory=tmp_path), threads=2, max_ctx=16) as eng:
        full = native_perplexity(eng, IDS, window=16, stride=8)
        eng.set_rules(ChannelRules(head=SiteRule(threshold=0.9)))
        sparse = native_perplexity(eng, IDS, window=16, stride=8)
    assert full["ppl"] == pytest.approx(rows["ppl"], rel=1e-5)
    assert full["top1_agreement"] == 1.0 and full["head_read_ratio"] == 1.0
    assert 0.0 < sparse["head_read_ratio"] < 0.9 and sparse["top1_agreement"] < 1.0
    assert sparse["ppl"] != full["ppl"] and sparse["read_ratio"] == 1.0


class FakeLlama:
    """What llamacpp_perplexity uses of llama_cpp.Llama (reset, eval, scores), with a model's logits."""

    def __init__(self, model):
        self.model, self.scores = model, None

    def reset(self):
        self.scores = None

    def eval(self, tokens):
        with torch.no_grad():
            self.scores = self.model(torch.tensor([tokens])).logits[0].numpy()


def test_llamacpp_perplexity_scores_the_same_windows(make_tiny):
    model = make_tiny("qwen2")
    want = Evaluator(model, DigitTok(), DensePolicy()).perplexity(" ".join(map(str, IDS)), window=16, stride=5)
    got = llamacpp_perplexity(FakeLlama(model), IDS, window=16, stride=5)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6) and got["n_tokens"] == 39


def test_non_finite_logits_stop_the_measurement(make_tiny, tmp_path):
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    with Engine(pack(model, "fp32", directory=tmp_path), threads=1, max_ctx=16) as eng:
        with pytest.raises(UserError, match="non-finite log-likelihood from the native engine"):
            native_perplexity(eng, IDS, window=16, stride=8)
