"""Masked greedy decoding and masked log-likelihoods, batched with one mask schedule per row.

Rows may have different prompts: prompts are left-padded, with an attention mask and position
ids that skip the padding. Every row stops on its own at a stop token; the batch stops when all
rows have stopped or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn
from transformers import DynamicCache

from .architectures import model_device
from .finite import check_finite
from .hooks import UnitHooks
from .masking import apply_masks
from .trace import as_ids, position_multipliers, token_losses
from .units import UnitMasks


def pad_batch(seqs: list[torch.Tensor], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids ``[B, S]``, attention mask ``[B, S]``) on the first sequence's device, every sequence
    right-aligned (``left`` padding) or left-aligned (right padding)."""
    width = max(s.numel() for s in seqs)
    device = seqs[0].device
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for row, s in enumerate(seqs):
        cols = slice(width - s.numel(), width) if left else slice(0, s.numel())
        ids[row, cols] = s
        mask[row, cols] = 1
    return ids, mask


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_batch` with every prompt right-aligned (decoding appends on the right)."""
    return pad_batch(prompts, pad_id, left=True)


def right_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pad_batch` with every sequence left-aligned (teacher-forced scoring)."""
    return pad_batch(seqs, pad_id, left=False)


@torch.no_grad()
def greedy_loop(model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, stop_ids: set[int],
                pad_id: int = 0, before_call=None, after_call=None) -> dict:
    """Batched greedy decoding on a ``DynamicCache``: left padding, per-row stop.

    ``before_call(ids [B, q], attn [B, S], done [B])`` and ``after_call()`` run around every
    forward call (the sparse runtime accounts there; they get tensors on the model's device).
    Returns ``{"tokens": B CPU tensors [T_b] (each
    ending at its stop token), "prefill_s", "decode_s", "decode_tokens"}``; the first call (the
    prefill, which also yields token 0) is timed apart from the decode steps.
    """
    device = model_device(model)
    ids, attn = left_pad([as_ids(p, "prompt", device) for p in prompts], pad_id)
    batch = ids.shape[0]
    cache = DynamicCache(config=model.config)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    prefill_s = decode_s = 0.0
    decode_tokens = 0
    for step in range(max_new_tokens):
        if before_call is not None:
            before_call(ids, attn, done)
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions,
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        tokens = logits.argmax(-1)
        host = tokens.tolist()  # one device-to-host copy per step
        elapsed = time.perf_counter() - t0
        check_finite(logits, model, f"greedy decoding (step {step})")
        if after_call is not None:
            after_call()
        if step == 0:
            prefill_s = elapsed
        else:
            decode_s += elapsed
            decode_tokens += finished.count(False)
        for row in range(batch):
            if not finished[row]:
                out[row].append(host[row])
                finished[row] = host[row] in stop_ids
        done = torch.tensor(finished, device=device)
        if all(finished):
            break
        ids = torch.where(done, torch.full_like(tokens, pad_id), tokens).view(-1, 1)
        attn = torch.cat([attn, torch.ones(batch, 1, dtype=attn.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    return {"tokens": [torch.tensor(t, dtype=torch.long, device="cpu") for t in out], "prefill_s": prefill_s,
            "decode_s": decode_s, "decode_tokens": decode_tokens}


def masked_greedy_decode(model: nn.Module, prompts: list[torch.Tensor], masks: UnitMasks | None,
                         max_new_tokens: int, stop_ids: set[int], pad_id: int = 0,
                         mask_prefill: bool = False) -> list[torch.Tensor]:
    """Greedy continuations, one per row.

    Args:
        prompts: B prompts ``[P_b]``.
        masks: batched schedule ``mlp [B, T, L, N]``, ``heads [B, T, L, H]`` (row b's step t
            masks generated token t of row b), or None for dense decoding.
        max_new_tokens: at most this many tokens per row (steps past T run dense).
    Returns:
        B tensors ``[T_b]`` of generated ids, each ending at (and including) its stop token.
    """
    if masks is not None and masks.mlp.shape[0] != len(prompts):
        raise ValueError(f"{masks.mlp.shape[0]} mask rows for {len(prompts)} prompts")
    context = apply_masks(model, masks, mask_prefill=mask_prefill) if masks is not None else nullcontext()
    with context:
        return greedy_loop(model, prompts, max_new_tokens, stop_ids, pad_id)["tokens"]


@torch.no_grad()
def masked_loglik(model: nn.Module, prompt_ids, target_ids, masks: UnitMasks | None) -> torch.Tensor:
    """Summed log-probability of ``target`` after ``prompt`` per row: ``[B]`` (model's device).

    ``masks`` is a batched schedule ``[B, T, L, *]`` applied as in decoding (position P-1+t uses
    step t, earlier prompt positions dense), or None for one dense row.
    """
    device = model_device(model)
    prompt, target = as_ids(prompt_ids, "prompt", device), as_ids(target_ids, "target", device)
    ids = torch.cat([prompt, target[:-1]]).unsqueeze(0)
    rows = 1 if masks is None else masks.mlp.shape[0]
    with UnitHooks(model) as hooks:
        if masks is not None:
            hooks.mlp_mult = position_multipliers(masks.mlp, prompt.numel())
            hooks.head_mult = position_multipliers(masks.heads, prompt.numel())
        logits = model(input_ids=ids.expand(rows, -1), use_cache=False,
                       logits_to_keep=target.numel()).logits
    return check_finite(-token_losses(logits, target).sum(-1), model, "the log-likelihood of a target")
