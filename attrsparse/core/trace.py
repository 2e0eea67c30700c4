"""Unit outputs and exact per-token loss gradients from one forward and one backward pass.

For a prompt of P tokens and a target of T tokens, the model runs teacher-forced over
``prompt + target[:-1]`` (S = P + T - 1 positions). Target token t is predicted at position
``P - 1 + t``; its loss is ``loss_t = CE(logits[P-1+t], target[t])``. With the attention of
:mod:`attrsparse.core.attention`, one backward of ``sum_t loss_t`` gives ``g_t = d loss_t / d x_t`` at every
target position, exactly as incremental decoding would (see :mod:`attrsparse.core.reference`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import model_device
from .attention import KVRecorder, diagonal_gradient_attention
from .errors import UserError
from .hooks import UnitHooks
from .units import unit_map


@dataclass
class GradientTrace:
    """Per-token unit outputs and gradients of one (prompt, target) pair, B rows.

    mlp_x, mlp_g:   [B, T, L, N]
    head_x, head_g: [B, T, L, H, D]
    losses:         [B, T]   cross-entropy of each target token
    """

    mlp_x: torch.Tensor
    mlp_g: torch.Tensor
    head_x: torch.Tensor
    head_g: torch.Tensor
    losses: torch.Tensor

    def row(self, b: int = 0) -> "GradientTrace":
        return GradientTrace(self.mlp_x[b], self.mlp_g[b], self.head_x[b], self.head_g[b], self.losses[b])


def to_ids(ids, device: torch.device | str | None = None) -> torch.Tensor:
    """1-D LongTensor ``[S]`` from a list/tensor of token ids, on ``device`` (default: a tensor's
    own device, the CPU for a list)."""
    if device is None:
        device = ids.device if isinstance(ids, torch.Tensor) else "cpu"
    return torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)


def as_ids(ids, name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`to_ids`, where empty input is a user error."""
    t = to_ids(ids, device)
    if t.numel() == 0:
        raise UserError(f"{name} is empty: need at least one token")
    return t


def teacher_forced_ids(prompt_ids, target_ids, device=None) -> tuple[torch.Tensor, int, int]:
    """(ids ``[S]`` on ``device``, P, T) for the teacher-forced pass over ``prompt + target[:-1]``."""
    prompt, target = as_ids(prompt_ids, "prompt", device), as_ids(target_ids, "target", device)
    return torch.cat([prompt, target[:-1]]), prompt.numel(), target.numel()


def token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row and token: logits ``[B, T, V]``, target ``[T]`` -> ``[B, T]``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, target.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)


def forward_units(model: nn.Module, prompt_ids, target_ids, *, rows: int = 1,
                  mlp_mult=None, head_mult=None, recorder: KVRecorder | None = None,
                  grad_layers: list[int] | None = None, want_grad: bool = True,
                  labels=None) -> tuple:
    """Run the teacher-forced pass; return (hooks, losses ``[B, T]``, grads, P, T).

    ``labels`` ``[T]`` (default: ``target_ids``) are the tokens whose losses are attributed; the
    oracle policy of :mod:`attrsparse.policies` feeds a text as ``target`` and the dense model's own
    predictions as ``labels`` (``labels="argmax"`` takes them from this very pass: unmasked, its
    forward values are the dense model's).

    ``mlp_mult`` / ``head_mult`` follow :class:`attrsparse.core.hooks.UnitHooks` (``q`` = S positions).
    Token ids may live anywhere; the pass runs on the model's device, where the results stay.
    ``grads`` is ``(mlp_grads, head_grads)``: per layer in ``grad_layers`` (default all), the
    gradient ``[B, S, N]`` / ``[B, S, H, D]`` of ``sum(losses)`` w.r.t. the unit outputs.
    """
    device = model_device(model)
    ids, p, t = teacher_forced_ids(prompt_ids, target_ids, device)
    argmax = isinstance(labels, str) and labels == "argmax"
    target = as_ids(target_ids if labels is None or argmax else labels, "labels", device)
    if target.numel() != t:
        raise ValueError(f"{target.numel()} labels for {t} target tokens")
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embeds = embed(ids.unsqueeze(0)).expand(rows, -1, -1).clone()
    embeds.requires_grad_(want_grad)
    layers = list(range(unit_map(model).num_layers)) if grad_layers is None else grad_layers
    with UnitHooks(model, capture=True) as hooks, diagonal_gradient_attention(model, recorder), \
            torch.set_grad_enabled(want_grad):
        hooks.mlp_mult, hooks.head_mult = mlp_mult, head_mult
        out = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=t)
        if argmax:  # the model's own prediction at each position (the forward values are dense)
            target = out.logits[0, -t:].detach().argmax(-1)
        losses = token_losses(out.logits[:, -t:], target)
        grads = (None, None)
        if want_grad:
            tensors = [hooks.mlp_inputs[l] for l in layers] + [hooks.head_inputs[l] for l in layers]
            g = torch.autograd.grad(losses.sum(), tensors)
            grads = (list(g[: len(layers)]), list(g[len(layers):]))
        captured = (list(hooks.mlp_inputs), list(hooks.head_inputs))
    return captured, losses.detach(), grads, p, t


def model_logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 **model_kwargs) -> torch.Tensor:
    """Plain forward (no cache unless ``model_kwargs`` give one): ``[B, S, V]`` float32, on the
    model's device (where ``ids`` and ``attention_mask`` are moved)."""
    model_kwargs.setdefault("use_cache", False)
    device = model_device(model)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    return model(input_ids=ids.to(device), attention_mask=attention_mask, **model_kwargs).logits.float()


def record_dense_kv(model: nn.Module, prompt_ids, target_ids) -> KVRecorder:
    """Keys/values of one dense teacher-forced pass, to be served to later passes (off-diagonal)."""
    recorder = KVRecorder()
    forward_units(model, prompt_ids, target_ids, recorder=recorder, want_grad=False)
    recorder.record = False
    return recorder


def trace_gradients(model: nn.Module, prompt_ids, target_ids, *, rows: int = 1,
                    mlp_mult=None, head_mult=None,
                    recorder: KVRecorder | None = None, labels=None) -> GradientTrace:
    """One forward + one backward -> :class:`GradientTrace` at the T target positions
    (losses of ``labels``, default ``target_ids``), on the model's device."""
    (mlp_in, head_in), losses, (mlp_g, head_g), p, t = forward_units(
        model, prompt_ids, target_ids, rows=rows, mlp_mult=mlp_mult, head_mult=head_mult,
        recorder=recorder, labels=labels)
    sl = slice(p - 1, p - 1 + t)

    def stack(tensors):
        return torch.stack([x[:, sl].detach().float() for x in tensors], dim=2)

    return GradientTrace(stack(mlp_in), stack(mlp_g), stack(head_in), stack(head_g), losses)


def position_multipliers(step_masks: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Turn a per-step mask schedule into per-position multipliers for the teacher-forced pass.

    step_masks ``[B, T, L, K]`` (bool) -> ``[B, S, L, K]`` float with S = P + T - 1: prompt
    positions before the last are dense; position ``P-1+t`` uses step t (decoding's protocol).
    """
    b, t = step_masks.shape[:2]
    dense = torch.ones(b, prompt_len - 1, *step_masks.shape[2:], dtype=torch.float32, device=step_masks.device)
    return torch.cat([dense, step_masks.float()], dim=1)
