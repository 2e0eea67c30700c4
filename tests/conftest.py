"""Tiny randomly initialised causal LMs, built in code (no files, no network), one per family.

Every config has vocab 64, hidden 32, 2-3 layers and bos/eos/pad ids inside the vocabulary.
Weights are re-drawn with a fixed seed at a scale (std ~ 1/sqrt(fan_in)) that gives non-trivial
activations, logits and gradients, unlike the default 0.02 initialisation.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
)

VOCAB = 64
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  max_position_embeddings=64, **IDS)
    return {
        "llama": lambda: LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common),
        "qwen2": lambda: Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common),
        "gemma3_text": lambda: Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, query_pre_attn_scalar=12, sliding_window=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=48, n_layer=2, n_head=4,
                                   n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   **IDS),
        "phi": lambda: PhiConfig(num_attention_heads=4, partial_rotary_factor=0.5, **common),
        "phi3": lambda: Phi3Config(num_attention_heads=4, num_key_value_heads=2,
                                   original_max_position_embeddings=64, **common),
        "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64,
                                 word_embed_proj_dim=32, dropout=0.0, **IDS),
    }


CONFIGS = _configs()
ARCHS = list(CONFIGS)


def build_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny ``name`` model in eval mode with seeded, moderately scaled random weights."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() < 2:  # norms and biases: perturb around their initial value
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif any(k in pname for k in ("embed", "wte", "wpe")):
                # (tied) embeddings: logits of std ~ 1.5; Gemma multiplies by sqrt(hidden) itself
                std = 0.05 if name == "gemma3_text" else 0.3
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:  # Linear [out, in] or GPT-2 Conv1D [in, out]
                fan_in = p.shape[0] if name == "gpt2" else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model.to(dtype).eval().requires_grad_(False)  # as attrsparse.load_model does


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one thread: tiny ops are dominated by thread synchronisation on small,
    busy CPUs (about 10x slower on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def greedy_checkpoints(tmp_path_factory, monkeypatch):
    """TEAL's greedy searches keep their checkpoints in a folder of this test's own, so that no
    test reuses a search of an earlier run from the user's cache (channel_greedy.checkpoint_path)."""
    from attrsparse.selectors import channel_greedy

    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setattr(channel_greedy, "cache_root", lambda: folder)
    return folder / "greedy"


@pytest.fixture
def make_tiny():
    """``make_tiny(name, seed=0, dtype=torch.float32)`` -> a fresh model."""
    return build_tiny


#: Vocabulary of :func:`tiny_tokenizer`, sized for the :func:`build_tiny` models.
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]


def word_tokenizer(vocab: list[str], *, unk: str, pad: str, eos: str, bos: str | None = None):
    """A ``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model of ``vocab`` (id = list
    position; whitespace and punctuation split, no chat template)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": bos} if bos is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, pad_token=pad, eos_token=eos,
                                   **special)


def tiny_tokenizer():
    """Word-level tokenizer of :data:`WORDS` (``w0``, ``w1``, ...) for the :func:`build_tiny` models."""
    return word_tokenizer(WORDS, unk="<unk>", pad="<unk>", eos="</s>", bos="<s>")


def tiny_word_lm(words, seed: int = 0, attn: str | None = None):
    """(tiny seeded Llama, word-level tokenizer) whose vocabulary is ``[PAD]`` (0), ``[UNK]`` (1),
    ``[EOS]`` (2) and ``sorted(words)``; weights re-drawn like :func:`build_tiny` so that logits are
    far from ties."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = ["[PAD]", "[UNK]", "[EOS]"] + sorted(words)
    tokenizer = word_tokenizer(vocab, unk="[UNK]", pad="[PAD]", eos="[EOS]")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, **({} if attn is None else {"attn_implementation": attn}))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "embed" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model.eval().requires_grad_(False), tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A saved tiny Llama checkpoint (:func:`build_tiny`) with its :func:`tiny_tokenizer`: a directory
    path for the CLI tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_truthfulqa_lm():
    """``make(seed=0, attn=None)`` -> :func:`tiny_word_lm` over every word of
    ``fixtures/truthfulqa_3.csv`` and of the "paper"/"qa" templates, for the sweep tests."""
    import csv
    from pathlib import Path

    from tokenizers import pre_tokenizers

    fixture = Path(__file__).parent / "fixtures" / "truthfulqa_3.csv"
    splitter = pre_tokenizers.Whitespace()
    words = {"Instruct", "Output", "Q", "A", ":"}
    with fixture.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            for column in ("Question", "Best Answer", "Correct Answers", "Incorrect Answers"):
                words.update(piece for piece, _ in splitter.pre_tokenize_str(row[column]))

    def make(seed: int = 0, attn: str | None = None):
        return tiny_word_lm(words, seed, attn)

    return make
