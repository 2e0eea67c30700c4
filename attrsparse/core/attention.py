"""An attention function that turns one teacher-forced pass into exact per-token gradients.

In incremental decoding, the gradient of token t's loss reaches only position t's own computation:
the keys and values of earlier positions come from the cache as constants. This function gives
the same gradients in one pass over the whole sequence: every query attends to *detached* keys
and values of the other positions, while its own key and value (the diagonal term) stay live.
Forward values are unchanged, so ``d loss_t / d x_t`` from one backward of ``sum_t loss_t``
equals the incremental-decoding gradient for every t at once.

For Integrated Gradients, the off-diagonal keys/values can instead be taken from a recorded dense
pass (:class:`KVRecorder`), so that scaling position t's units does not leak into the context
that later positions see (exactly as in incremental decoding with a dense cache).

Registered with transformers' ``AttentionInterface`` (and its mask interface) under
:data:`ATTN_NAME`; enable it with :func:`diagonal_gradient_attention`. No model code is patched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

ATTN_NAME = "attrsparse_diag"


class KVRecorder:
    """Records (``record=True``) or serves (``record=False``) detached keys/values per module."""

    def __init__(self) -> None:
        self.record = True
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


_ACTIVE: list[KVRecorder | None] = [None]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv*groups, S, D]."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def diagonal_live_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            softcap: float | None = None, **kwargs):
    """Eager attention with live gradients only through each query's own key/value.

    Shapes: query ``[B, H, S, D]``, key/value ``[B, Hkv, S_kv, D]`` (query i sits at key
    position ``i + S_kv - S``), mask ``[B, 1, S, S_kv]`` additive. Returns ``([B, S, H, D], probs)``.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    recorder = _ACTIVE[0]
    past_k, past_v = key.detach(), value.detach()
    if recorder is not None:
        if recorder.record:
            recorder.kv[id(module)] = (past_k, past_v)
        else:
            past_k, past_v = recorder.kv[id(module)]
    groups = query.shape[1] // key.shape[1]
    k_live, v_live = _repeat_kv(key, groups), _repeat_kv(value, groups)
    k_past, v_past = _repeat_kv(past_k, groups), _repeat_kv(past_v, groups)
    s, s_kv = query.shape[2], key.shape[2]
    offset = s_kv - s

    diag = torch.zeros(s, s_kv, dtype=torch.bool, device=query.device)
    idx = torch.arange(s, device=query.device)
    diag[idx, idx + offset] = True

    scores = torch.matmul(query, k_past.transpose(2, 3))
    own = (query * k_live[:, :, offset:]).sum(-1)  # [B, H, S]: live q_i . k_i
    scores = scores.masked_fill(diag, 0.0) + F.pad(torch.diag_embed(own), (offset, 0))
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :s_kv]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    p_own = torch.diagonal(probs[..., offset:], dim1=-2, dim2=-1)  # [B, H, S]
    out = torch.matmul(probs.masked_fill(diag, 0.0), v_past) + p_own.unsqueeze(-1) * v_live[:, :, offset:]
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTN_NAME, diagonal_live_attention)
AttentionMaskInterface.register(ATTN_NAME, eager_mask)


def _attn_configs(model: nn.Module) -> list:
    """Configs whose ``_attn_implementation`` the attention modules read (text config too)."""
    configs = [model.config]
    text = getattr(model.config, "get_text_config", lambda: None)()
    if text is not None and text is not model.config:
        configs.append(text)
    return configs


@contextmanager
def diagonal_gradient_attention(model: nn.Module, recorder: KVRecorder | None = None) -> Iterator[None]:
    """Run ``model`` with :func:`diagonal_live_attention` inside the block, then restore."""
    configs = _attn_configs(model)
    previous = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ATTN_NAME
    _ACTIVE[0] = recorder
    try:
        yield
    finally:
        _ACTIVE[0] = None
        for c, prev in zip(configs, previous):
            c._attn_implementation = prev
