"""The input-sparse LM head's channel rule, calibrated (needs torch; the runner does not).

The head's input is the final normed hidden state ``h``. Channel ``j`` is kept iff
``|h_j| * a_j > t``: ``attr_channel``'s score on this one more linear, with
``a_j = sqrt(E[h_j^2 g_j^2] / E[h_j^2])`` (its default statistic: the RMS of the attribution
``g = dL/dh`` of the text's next-token loss, weighted by ``h_j^2``) over the calibration text, and
one threshold ``t`` per requested ratio such that exactly that fraction of the calibration values
``|h_j| * a_j`` (every position, every channel) exceeds it (:func:`exact_thresholds`). The kept
channels are read exactly and the dropped ones count as zero (no compensation: a centre and its
bias ``W E[h]`` measured no better on the held-out side, docs/engine.md).

Only the native engine runs it (``pack(..., head_layout="input")``, ``ChannelRules.head``); the
read ratios of the decoder linears do not count the head, ``total_read_ratio`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.architectures import model_device
from ...core.errors import UserError
from ...core.trace import token_losses
from ...selectors.channel_stats import batches
from ...selectors.thresholds import exact_thresholds
from .sites import SiteRule


def head_statistics(model: nn.Module, sequences: list[torch.Tensor], batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [N, d], g [N, d])``: the head's input at every predicting position of ``sequences`` and
    the gradient of that position's next-token loss with respect to it (float64, CPU)."""
    head = model.get_output_embeddings()
    hs, gs = [], []
    for ids in batches(sequences, batch_size):
        ids = ids.to(model_device(model))
        leaf: list[torch.Tensor] = []

        def capture(_module, args):
            leaf.append(args[0].detach().requires_grad_(True))
            return (leaf[-1],)

        handle = head.register_forward_pre_hook(capture)
        try:
            with torch.enable_grad():
                logits = model(input_ids=ids[:, :-1], use_cache=False).logits
                loss = sum(token_losses(logits[b:b + 1], ids[b, 1:]).sum() for b in range(ids.shape[0]))
                (grad,) = torch.autograd.grad(loss, leaf)
        finally:
            handle.remove()
        hs.append(leaf[0].detach().double().reshape(-1, grad.shape[-1]).cpu())
        gs.append(grad.detach().double().reshape(-1, grad.shape[-1]).cpu())
    if not hs:
        raise UserError("the head's calibration is empty: no sequences")
    return torch.cat(hs), torch.cat(gs)


def head_scale(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a_j = sqrt(E[h_j^2 g_j^2] / E[h_j^2])`` (0 for a channel that is always 0)."""
    h2 = h * h
    return ((h2 * g * g).mean(0) / h2.mean(0).clamp_min(1e-300)).sqrt()


def calibrate_head(model: nn.Module, sequences: list[torch.Tensor], ratios, batch_size: int = 4) -> dict[float, SiteRule]:
    """``{ratio: the head's rule keeping that fraction of the calibration values}`` (module
    docstring). Ratios in (0, 1]; 1 keeps every channel (no threshold)."""
    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise UserError(f"a head ratio must be in (0, 1], got {r:g}")
    h, g = head_statistics(model, sequences, batch_size)
    scale = head_scale(h, g)
    scores = h.abs() * scale
    taus = exact_thresholds(lambda: [[scores.float()]], ratios)
    return {r: SiteRule() if r >= 1.0 else SiteRule(threshold=float(taus[r][0]), scale=scale.float().tolist())
            for r in ratios}
