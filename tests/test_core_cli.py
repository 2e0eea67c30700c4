"""CLI: user mistakes exit with code 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, tiny_tokenizer
from transformers import BloomConfig, BloomForCausalLM

from attrsparse import UnsupportedArchitectureError, UserError, supported_model_types, unit_map
from attrsparse.cli.main import main


@pytest.fixture(scope="module")
def bloom_model():
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return BloomForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory, bloom_model):
    path = tmp_path_factory.mktemp("tiny-bloom")
    bloom_model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def run_error(capsys, argv, *fragments):
    """main(argv) must return 2 and print exactly one line on stderr containing ``fragments``."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attrsparse: error:"), err
    assert "Traceback" not in err and "Traceback" not in out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1", "abc"])
def test_bad_ratio(capsys, llama_dir, ratio):
    run_error(capsys, ["score", "--model", llama_dir, "--prompt", "w1 w2", "--ratio", ratio], "ratio")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, llama_dir, prompt):
    run_error(capsys, ["score", "--model", llama_dir, "--prompt", prompt], "prompt", "empty")


def test_empty_target(capsys, llama_dir):
    run_error(capsys, ["score", "--model", llama_dir, "--prompt", "w1 w2", "--target", ""], "target")


def test_unknown_metric_suggests(capsys, llama_dir):
    run_error(capsys, ["score", "--model", llama_dir, "--prompt", "w1 w2", "--target", "w3 w4",
                       "--metrics", "gxoo"], "unknown metric", "did you mean 'gxo'")


def test_unknown_policy(capsys, llama_dir):
    run_error(capsys, ["score", "--model", llama_dir, "--prompt", "w1 w2", "--target", "w3 w4",
                       "--metrics", "gxo", "--policy", "nope"], "policy")


@pytest.mark.parametrize("spec, fragment", [
    ("no-such-model-xyz", "unknown model"),
    ("/no/such/dir/model.gguf", "not found"),
])
def test_unknown_model_spec(capsys, spec, fragment):
    run_error(capsys, ["info", "--model", spec], fragment)


def test_directory_without_config(capsys, tmp_path):
    run_error(capsys, ["info", "--model", str(tmp_path)], "config.json")


def test_bad_dtype(capsys, llama_dir):
    run_error(capsys, ["info", "--model", llama_dir, "--dtype", "int3"], "dtype")


def test_unsupported_architecture_in_code(bloom_model):
    with pytest.raises(UnsupportedArchitectureError) as info:
        unit_map(bloom_model)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "bloom" in message
    for model_type in supported_model_types():
        assert model_type in message
    assert "\n" not in message


def test_unsupported_architecture_via_cli(capsys, bloom_dir):
    run_error(capsys, ["info", "--model", bloom_dir], "unsupported architecture 'bloom'", "llama", "gpt2")


def test_info_and_score_succeed_on_a_tiny_checkpoint(capsys, llama_dir):
    assert main(["info", "--model", llama_dir, "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["family"] == "llama" and summary["kv_heads_per_layer"] == 2
    assert main(["score", "--model", llama_dir, "--prompt", "w1 w2 w3", "--target", "w4 w5 w6",
                 "--metrics", "gxo,corrected_gxo", "--ratio", "0.5"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["target_tokens"] == 3 and set(report["metrics"]) == {"gxo", "corrected_gxo"}
    m = report["metrics"]["corrected_gxo"]
    assert m["mlp_scores_shape"] == [3, 2, 48] and m["head_scores_shape"] == [3, 2, 4]
    assert 0 < m["executed_ratio"] < 1 and m["executed_tokens"] == 3
    assert "Traceback" not in err


def test_metrics_command_lists_every_metric(capsys):
    assert main(["metrics"]) == 0
    out = capsys.readouterr().out
    for name in ("magnitude", "gradient", "gxo", "snip", "corrected_gxo", "ig", "ig_all_layers"):
        assert any(line.split()[0] == name for line in out.splitlines() if line.strip())
