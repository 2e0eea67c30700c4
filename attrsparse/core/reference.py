"""The readable reference: the official code's algorithm, one decoding step at a time.

For each target token t: run the model on one new token with a KV cache of the earlier positions
(constants), take ``loss_t`` at that position and ``d loss_t / d x`` for the units of that position.
With ``per_layer=True`` each step is re-run once per layer, as the official code does (one
attribution run per layer); the numbers are the same, only slower. Used by the tests and by
``benchmarks/bench_scoring.py`` as the baseline of the one-pass scorer (:mod:`attrsparse.core.trace`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import DynamicCache

from .hooks import UnitHooks
from .trace import GradientTrace, as_ids, token_losses
from .units import unit_map


def _detach_cache(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


def _step(model, embed, token, cache, layers):
    """One decoding step with gradients: (logits ``[1, 1, V]``, mlp inputs, head inputs) of ``layers``."""
    emb = embed(token.view(1, 1)).detach().requires_grad_(True)
    with UnitHooks(model, capture=True) as hooks, torch.enable_grad():
        out = model(inputs_embeds=emb, cache=cache, use_cache=True)
        return (out.logits[:, -1:], [hooks.mlp_inputs[l] for l in layers],
                [hooks.head_inputs[l] for l in layers])


def reference_trace(model: nn.Module, prompt_ids, target_ids, per_layer: bool = False) -> GradientTrace:
    """Same result as :func:`attrsparse.core.trace.trace_gradients` (one row), computed step by step."""
    prompt, target = as_ids(prompt_ids, "prompt"), as_ids(target_ids, "target")
    units = unit_map(model)
    embed = model.get_input_embeddings()
    cache = DynamicCache(config=model.config)
    if prompt.numel() > 1:
        with torch.no_grad():
            model(input_ids=prompt[:-1].unsqueeze(0), cache=cache, use_cache=True)
    all_layers = list(range(units.num_layers))
    rows = {k: [] for k in ("mlp_x", "mlp_g", "head_x", "head_g", "loss")}
    for t in range(target.numel()):
        token = prompt[-1] if t == 0 else target[t - 1]
        groups = [[l] for l in all_layers] if per_layer else [all_layers]
        mlp_x, mlp_g = [None] * units.num_layers, [None] * units.num_layers
        head_x, head_g = [None] * units.num_layers, [None] * units.num_layers
        step_cache = cache
        for group in groups:
            step_cache = copy.deepcopy(cache) if per_layer else cache
            logits, mx, hx = _step(model, embed, token, step_cache, group)
            loss = token_losses(logits, target[t:t + 1])[0, 0]
            grads = torch.autograd.grad(loss, mx + hx)
            for i, l in enumerate(group):
                mlp_x[l], head_x[l] = mx[i][0, -1].detach(), hx[i][0, -1].detach()
                mlp_g[l], head_g[l] = grads[i][0, -1], grads[len(group) + i][0, -1]
        cache = step_cache
        _detach_cache(cache)
        rows["mlp_x"].append(torch.stack(mlp_x))
        rows["mlp_g"].append(torch.stack(mlp_g))
        rows["head_x"].append(torch.stack(head_x))
        rows["head_g"].append(torch.stack(head_g))
        rows["loss"].append(loss.detach())
    return GradientTrace(*(torch.stack(rows[k]).float() for k in ("mlp_x", "mlp_g", "head_x", "head_g")),
                         torch.stack(rows["loss"]))
