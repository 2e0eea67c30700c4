"""Prompt templates and dense greedy labels.

* ``chat`` (default when the tokenizer has a chat template): the question as one user turn, with
  the generation prompt appended. SmolLM2-Instruct answers coherently only this way.
* ``paper``: the paper's raw ``"Instruct: {question}\\nOutput:"``.
* ``qa``: ``"Q: {question}\\nA:"`` (used for multiple-choice log-likelihoods).
"""

from __future__ import annotations

import sys

import torch

from ..core.architectures import model_device
from ..core.errors import UserError
from ..core.finite import check_finite, model_name

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


TRUNCATE = ("none", "left")


def context_length(model) -> int | None:
    """Positions the model was trained for (``max_position_embeddings``), None when unknown."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def fit_prompt(prompt_ids: torch.Tensor, model, max_new_tokens: int, truncate: str | None = "none",
               what: str = "the prompt") -> torch.Tensor:
    """``prompt_ids`` when it and ``max_new_tokens`` new tokens fit the model's context
    (:func:`context_length`); else a :class:`UserError` (``truncate="none"``), or its last tokens
    that fit, with a warning on stderr (``truncate="left"``). Past its context a model runs on
    positions it never saw and produces garbage without any error."""
    truncate = truncate or "none"
    if truncate not in TRUNCATE:
        raise UserError(f"--truncate must be one of {', '.join(TRUNCATE)}, got {truncate!r}")
    limit = context_length(model)
    n = int(prompt_ids.numel())
    if limit is None or n + max_new_tokens <= limit:
        return prompt_ids
    room = limit - max_new_tokens
    if truncate == "none" or room < 1:
        fix = "pass --truncate left to keep its end, " if room >= 1 else ""
        raise UserError(f"{what} has {n} tokens; with up to {max_new_tokens} new tokens it exceeds the "
                        f"context of model {model_name(model)} ({limit} tokens): {fix}shorten it or "
                        "lower --max-new-tokens")
    print(f"attrsparse: warning: {what} has {n} tokens; keeping its last {room} (context {limit}, "
          f"{max_new_tokens} new tokens)", file=sys.stderr, flush=True)
    return prompt_ids[n - room:]


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
        token = int(check_finite(logits, model, "dense greedy decoding").argmax(-1))
        out_tokens.append(token)
        if token in stop_ids:
            break
        ids = torch.tensor([[token]], device=device)
    return torch.tensor(out_tokens, dtype=torch.long, device="cpu")
