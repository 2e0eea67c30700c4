"""Prompt templates and dense greedy labels.

* ``chat`` (default when the tokenizer has a chat template): the question as one user turn, with
  the generation prompt appended. SmolLM2-Instruct answers coherently only this way.
* ``paper``: the paper's raw ``"Instruct: {question}\\nOutput:"``.
* ``qa``: ``"Q: {question}\\nA:"`` (used for multiple-choice log-likelihoods).
"""

from __future__ import annotations

import torch

from ..core.architectures import model_device
from ..core.errors import UserError

TEMPLATES = ("chat", "paper", "qa")


def resolve_template(tokenizer, template: str | None) -> str:
    """``None``/"auto" -> "chat" when the tokenizer has a chat template, else "paper"."""
    if template in (None, "auto"):
        return "chat" if getattr(tokenizer, "chat_template", None) else "paper"
    if template not in TEMPLATES:
        raise UserError(f"unknown prompt template '{template}' (available: auto, {', '.join(TEMPLATES)})")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("this tokenizer has no chat template; use --template paper or qa")
    return template


def prompt_text(tokenizer, question: str, template: str) -> str:
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
    if template == "paper":
        return f"Instruct: {question}\nOutput:"
    return f"Q: {question}\nA:"


def encode_prompt(tokenizer, question: str, template: str) -> torch.Tensor:
    """Token ids ``[P]`` of the templated prompt (BOS added as the tokenizer does for raw text)."""
    text = prompt_text(tokenizer, question, template)
    add_special = template != "chat"  # the chat template already holds its special tokens
    ids = tokenizer(text, add_special_tokens=add_special, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise UserError("the prompt is empty after tokenisation")
    return ids


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end an answer: EOS of tokenizer and generation config (e.g. <|im_end|>)."""
    ids = set()
    for source in (tokenizer, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids}


@torch.no_grad()
def greedy_continuation(model, prompt_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> torch.Tensor:
    """Dense greedy continuation ``[T]`` (CPU; T <= max_new_tokens), stopping after a stop token
    (the stop token itself is kept: it is a generated token the masks must also produce)."""
    from transformers import DynamicCache

    device = model_device(model)
    cache = DynamicCache(config=model.config)
    ids = prompt_ids.view(1, -1).to(device)
    out_tokens = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        token = int(logits.argmax(-1))
        out_tokens.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]], device=device)
    return torch.tensor(out_tokens, dtype=torch.long, device="cpu")
