"""The lm-eval model type ``attrsparse`` on a tiny Llama saved with a word-level tokenizer, evaluated
offline on a 3-item local ARC task (``fixtures/arc_3.jsonl``): ratio 1.0 equals ``--model hf``,
every kind of selector runs and is accounted over the real tokens, a static mask equals ``hf`` on
zeroed weights (log-likelihoods and generation)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lm_eval
import pytest
import torch
from conftest import tiny_word_lm
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from attrsparse.core.errors import UserError
from attrsparse.core.units import zero_head_, zero_mlp_unit_
from attrsparse.deploy import sparsify
from attrsparse.evaluation.lm_eval_model import AttrsparseLM, right_padding_mask
from attrsparse.policies import make_policy
from attrsparse.selectors.topk import keep_count

FIXTURE = Path(__file__).parent / "fixtures" / "arc_3.jsonl"
REPO = Path(__file__).resolve().parents[1]
TASK_YAML = """task: arc_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
CALIB = "calib_sequences=4,calib_len=16"


def _tiny_lm(rows: list[dict]):
    """A seeded tiny Llama and a word-level tokenizer covering the fixture's words."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = {"Question", "Answer", ":"}
    for row in rows:
        for text in [row["question"], *row["choices"]["text"]]:
            words.update(piece for piece, _ in split.pre_tokenize_str(text))
    return tiny_word_lm(words)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, calibration text file, TaskManager with the local task ``arc_tiny``)."""
    root = tmp_path_factory.mktemp("lm_eval")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    model, tokenizer = _tiny_lm(rows)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    calib = root / "calib.txt"
    calib.write_text(" ".join(" ".join([r["question"], *r["choices"]["text"]]) for r in rows) * 4)
    (root / "tasks").mkdir()
    (root / "tasks" / "arc_tiny.yaml").write_text(TASK_YAML.format(data=FIXTURE.resolve()))
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    return root / "model", calib, manager


def evaluate(setup, model_type: str, model_args: str, batch_size: int = 2) -> dict:
    model_dir, calib, manager = setup
    args = f"pretrained={model_dir},{model_args}" if model_args else f"pretrained={model_dir}"
    if model_type == "attrsparse":
        args += f",calib={calib},{CALIB}"
    return lm_eval.simple_evaluate(model=model_type, model_args=args, tasks=["arc_tiny"],
                                   task_manager=manager, device="cpu", batch_size=batch_size,
                                   log_samples=True)


def logliks(results: dict) -> list[float]:
    return [ll for s in results["samples"]["arc_tiny"] for ll, _ in s["filtered_resps"]]


def test_importing_registers_the_model_type():
    assert get_model("attrsparse") is AttrsparseLM


def test_right_padding_mask_by_hand():
    ids = torch.tensor([[5, 0, 7, 0, 0], [3, 4, 5, 6, 7], [0, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(right_padding_mask(ids), expected)


def test_ratio_one_equals_the_hf_model_type_and_padding_is_not_counted(setup):
    hf = evaluate(setup, "hf", "")
    ours = evaluate(setup, "attrsparse", "selector=teal_units,ratio=1.0")
    unbatched = evaluate(setup, "attrsparse", "selector=teal_units,ratio=1.0", batch_size=1)
    assert logliks(ours) == logliks(hf)  # bit for bit
    assert ours["results"]["arc_tiny"]["acc,none"] == hf["results"]["arc_tiny"]["acc,none"]
    info = ours["config"]["attrsparse"]
    assert info["mode"] == "dense" and info["executed_ratio"] == 1.0
    # batches of 2 are right-padded; one request per batch is not: the same real tokens
    assert info["executed_tokens"] == unbatched["config"]["attrsparse"]["executed_tokens"] > 0


@pytest.fixture(scope="module")
def dense(setup) -> dict:
    return evaluate(setup, "attrsparse", "selector=dense")


@pytest.mark.parametrize("selector", ["teal_units", "cats_units", "wanda", "wina_units", "random", "corrected_gxo"])
def test_every_kind_of_selector_evaluates_and_is_accounted(setup, dense, selector):
    sparse = evaluate(setup, "attrsparse", f"selector={selector},ratio=0.5")
    info = sparse["config"]["attrsparse"]
    assert info["selector"] == selector and info["requested_ratio"] == 0.5
    assert info["executed_tokens"] == dense["config"]["attrsparse"]["executed_tokens"]
    assert logliks(sparse) != logliks(dense) and len(logliks(sparse)) == len(logliks(dense))
    assert 0.0 < info["executed_ratio"] < 1.0
    expected_mode = {"teal_units": "online", "cats_units": "online", "wina_units": "online", "wanda": "static",
                     "random": "static", "corrected_gxo": "oracle"}[selector]
    assert info["mode"] == expected_mode
    if selector in ("wanda", "random", "wina_units", "corrected_gxo"):  # top-k: exactly k of 48 / of 4
        assert info["executed_ratio_mlp"] == keep_count(0.5, 48) / 48
        assert info["executed_ratio_heads"] == keep_count(0.5, 4) / 4
    if expected_mode == "online":  # gate/up (and q/k/v) rows ran before each decision
        assert info["executed_ratio_with_decision_cost"] > info["executed_ratio"]
    if selector == "cats_units":
        assert info["executed_ratio_heads"] == 1.0


def _wanda_lm(setup, **extra) -> tuple[AttrsparseLM, Path]:
    """An ``attrsparse`` LM with Wanda at 0.5 and a saved copy of the model with its dropped
    units' weights zeroed."""
    model_dir, calib, _ = setup
    lm = get_model("attrsparse").create_from_arg_string(
        f"pretrained={model_dir},selector=wanda,ratio=0.5,calib={calib},{CALIB}",
        {"batch_size": 2, "device": "cpu", **extra})
    pruned = copy.deepcopy(lm.model)
    for layer, unit in (~lm.sparsity.masks.mlp).nonzero().tolist():
        zero_mlp_unit_(pruned, layer, unit)
    for layer, head in (~lm.sparsity.masks.heads).nonzero().tolist():
        zero_head_(pruned, layer, head)
    out = model_dir.parent / "wanda_zeroed"
    pruned.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return lm, out


def test_static_mask_equals_hf_on_zeroed_weights(setup):
    _, zeroed = _wanda_lm(setup)
    ours = evaluate(setup, "attrsparse", "selector=wanda,ratio=0.5")
    _, _, manager = setup
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={zeroed}", tasks=["arc_tiny"],
                                 task_manager=manager, device="cpu", batch_size=2, log_samples=True)
    torch.testing.assert_close(torch.tensor(logliks(ours)), torch.tensor(logliks(hf)), rtol=1e-5, atol=1e-5)


def test_generation_runs_under_the_policy(setup):
    lm, zeroed = _wanda_lm(setup)
    hf = get_model("hf").create_from_arg_string(f"pretrained={zeroed}", {"batch_size": 2, "device": "cpu"})
    prompts = ["Question: Which gas do plants take in from the air to make food ?\nAnswer:",
               "Question: What is the main source of energy ?\nAnswer:"]
    requests = [Instance(request_type="generate_until", doc={}, idx=i,
                         arguments=(p, {"until": ["[EOS]"], "max_gen_toks": 5, "do_sample": False}))
                for i, p in enumerate(prompts)]
    dense = get_model("attrsparse").create_from_arg_string(f"pretrained={setup[0]}", {"device": "cpu"})
    sparse_text = lm.generate_until(requests)
    assert sparse_text == hf.generate_until(requests)
    assert sparse_text != dense.generate_until(requests)  # the masks did change the generation
    assert lm.executed.tokens > 0
    assert lm.executed.mlp == keep_count(0.5, 48) / 48


def test_online_generation_is_accounted_and_the_oracle_refuses(setup):
    model_dir, calib, _ = setup
    lm = get_model("attrsparse").create_from_arg_string(
        f"pretrained={model_dir},selector=teal_units,ratio=0.5,calib={calib},{CALIB}", {"device": "cpu"})
    requests = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=("Question: What is the main source of energy ?\nAnswer:",
                                    {"until": ["[EOS]"], "max_gen_toks": 4, "do_sample": False}))]
    lm.generate_until(requests)
    prompt_tokens = len(lm.tok_encode(requests[0].args[0]))
    assert prompt_tokens <= lm.executed.tokens <= prompt_tokens + 3  # prefill + each new token once
    assert 0.0 < lm.executed.param < 1.0
    oracle = make_policy("corrected_gxo", 0.5)
    with pytest.raises(UserError, match="cannot generate"):
        with sparsify(lm.model, oracle):
            pass


@pytest.mark.slow
def test_packaged_model_on_the_documented_task_matches_hf():
    """SmolLM2-135M on 3 questions of the docs' offline ARC-Easy task: ratio 1.0 = ``--model hf``."""
    from attrsparse.core.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    manager = TaskManager(include_path=str(REPO / "docs" / "lm_eval" / "tasks"), include_defaults=False)
    runs = {}
    for name, lm in (("hf", get_model("hf")(pretrained=model, tokenizer=tokenizer, batch_size=4)),
                     ("attrsparse", AttrsparseLM(pretrained=model, tokenizer=tokenizer, batch_size=4))):
        runs[name] = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy_local"], task_manager=manager,
                                             limit=3, log_samples=True)
    assert [s["filtered_resps"] for s in runs["attrsparse"]["samples"]["arc_easy_local"]] == \
        [s["filtered_resps"] for s in runs["hf"]["samples"]["arc_easy_local"]]
    assert runs["attrsparse"]["config"]["attrsparse"]["executed_ratio"] == 1.0
