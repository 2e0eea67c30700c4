"""The native engine on the packaged SmolLM2-135M (fp32): 128 greedy tokens after a chat prompt
identical to transformers (its own greedy loop, EOS not suppressed), through the screened head.
The engine file is packed once into the user's cache (``<cache root>/engine``, ~570 MB)."""

from __future__ import annotations

import pytest
import torch

from attrsparse.core.models import PACKAGED_MODELS, load_model
from attrsparse.deploy.engine import Engine, pack

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PACKAGED_MODELS["smollm2-135m"].installed(), reason="SmolLM2 not installed")]
NEW = 128


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out, cache, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(step, cache=cache, use_cache=True)
            cache = res.cache
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            step = torch.tensor([[nxt]])
    return out


def test_smollm2_greedy_tokens_equal_transformers():
    model, tok = load_model("smollm2-135m")
    ids = tok.apply_chat_template([{"role": "user", "content": "Why do veins appear blue?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = hf_greedy(model, ids, NEW)
    finally:
        torch.set_num_threads(threads)
    path = pack(model, "fp32")
    del model
    with Engine(path, threads=2, max_ctx=len(ids) + NEW) as eng:
        got = eng.generate(ids, NEW)
    first_diff = next((i for i, (a, b) in enumerate(zip(got.tokens, want)) if a != b), None)
    assert first_diff is None, f"first differing token at {first_diff}: {tok.decode(got.tokens[:first_diff + 1])!r}"
    assert len(got.tokens) == NEW
    assert got.head_cost < 0.5  # the screened head ran and computed few rows exactly
    assert got.read_ratio == 1.0
