"""The input-sparse LM head's channel rule, calibrated (needs torch; the runner does not).

The head's input is the final normed hidden state ``h``. Channel ``j`` is kept iff
``|h_j| * a_j > t``: ``attr_channel``'s score on this one more linear, with
``a_j = sqrt(E[h_j^2 g_j^2] / E[h_j^2])`` (its default statistic: the RMS of the attribution
``g = dL/dh`` of the text's next-token loss, weighted by ``h_j^2``) over the calibration text, and
one threshold ``t`` per requested ratio such that exactly that fraction of the calibration values
``|h_j| * a_j`` (every position, every channel) exceeds it (:func:`exact_thresholds`). The kept
channels are read exactly. The dropped ones count as zero, or, centred, at their calibration mean:
the rule then decides on ``|h_j - E[h_j]| * a_j`` and adds ``W E[h]`` as its compensation bias.
Which of the two is model-dependent (on held-out text centring lowered SmolLM2's perplexity at
every head ratio and raised Gemma-3-270M's at 0.3 and 0.5; docs/results/sparse-head), so by
default :func:`calibrate_head` chooses per ratio on the calibration text itself: both fitted on
the first three quarters of the sequences, the one with the lower next-token loss on the last
quarter wins, and is fitted again on every sequence.

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
from .pack import quantize
from .sites import HEAD_PROJECTION, SiteRule


def head_statistics(model: nn.Module, sequences: list[torch.Tensor],
                    batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h [N, d], g [N, d], targets [N])``: the head's input at every predicting position of
    ``sequences`` (batched by :func:`batches`), the gradient of that position's next-token loss with respect to it
    (float64, CPU) and the next token."""
    head = model.get_output_embeddings()
    hs, gs, ts = [], [], []
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
        ts.append(ids[:, 1:].reshape(-1).cpu())
    if not hs:
        raise UserError("the head's calibration is empty: no sequences")
    return torch.cat(hs), torch.cat(gs), torch.cat(ts)


def head_scale(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``a_j = sqrt(E[h_j^2 g_j^2] / E[h_j^2])`` (0 for a channel that is always 0)."""
    h2 = h * h
    return ((h2 * g * g).mean(0) / h2.mean(0).clamp_min(1e-300)).sqrt()


def fit_thresholds(h: torch.Tensor, scale: torch.Tensor, ratios: list[float], center: bool) -> dict[float, tuple]:
    """``{ratio: (threshold, mean or None)}``: the threshold keeping that fraction of the values
    ``|h - mean| * scale`` on ``h`` (mean: E[h] when ``center``, else none)."""
    mean = h.mean(0) if center else torch.zeros(h.shape[1], dtype=h.dtype)
    scores = ((h - mean).abs() * scale).float()
    taus = exact_thresholds(lambda: [[scores]], ratios)
    return {r: (float(taus[r][0]), mean.float() if center else None) for r in ratios}


def apply_rule(h: torch.Tensor, threshold: float, scale: torch.Tensor, mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, kept)``: what the head computes on under the rule, the slow way (the dropped channels
    at ``mean``, or 0), and the kept mask."""
    h = h.float()
    m = mean if mean is not None else torch.zeros(h.shape[1])
    kept = (h - m).abs() * scale.float() > threshold
    return torch.where(kept, h - m, torch.zeros_like(h)) + m, kept


def _held_out_nll(stored: torch.Tensor, h: torch.Tensor, targets: torch.Tensor, threshold: float,
                  scale: torch.Tensor, mean: torch.Tensor | None) -> float:
    """Mean next-token loss of the head ``stored`` [V, d] on ``h`` under the rule."""
    x, _ = apply_rule(h, threshold, scale, mean)
    total = 0.0
    for s in range(0, len(x), 256):
        total += float(torch.nn.functional.cross_entropy(x[s:s + 256] @ stored.T, targets[s:s + 256], reduction="sum"))
    return total / len(x)


def calibrate_head(model: nn.Module, sequences: list[torch.Tensor], ratios, *, center: bool | None = None,
                   precision: str = "fp32", batch_size: int = 4) -> dict[float, SiteRule]:
    """``{ratio: the head's rule keeping that fraction of the calibration values}`` (module
    docstring). Ratios in (0, 1]; 1 keeps every channel (no rule). ``center``: decide on and read
    ``h_j - E[h_j]``, the dropped channels' share ``W E[h]`` added as the compensation bias, computed
    from the head as stored in ``precision`` (the engine file's weights); None (the default): per
    ratio, whichever of the two gives the lower next-token loss on the last quarter of the
    calibration sequences when fitted on the others (module docstring)."""
    ratios = [float(r) for r in ratios]
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise UserError(f"a head ratio must be in (0, 1], got {r:g}")
    sparse = [r for r in ratios if r < 1.0]
    stored = None  # the head as stored [V, d]: for the held-out losses and the compensation bias
    if center is not False and sparse:
        stored = quantize(model.get_output_embeddings().weight.detach(), precision, dim=0)[2].float()
    choice = {r: bool(center) for r in sparse}
    held = len(sequences) // 4
    if center is None and held and sparse:
        h, g, _ = head_statistics(model, sequences[:-held], batch_size)
        h_out, g_out, targets = head_statistics(model, sequences[-held:], batch_size)
        scale = head_scale(h, g)
        fits = {c: fit_thresholds(h, scale, sparse, c) for c in (False, True)}
        for r in sparse:
            losses = {c: _held_out_nll(stored, h_out, targets, fits[c][r][0], scale, fits[c][r][1]) for c in (False, True)}
            choice[r] = losses[True] < losses[False]
        h, g = torch.cat([h, h_out]), torch.cat([g, g_out])  # the rules: fitted on every sequence
    else:
        h, g, _ = head_statistics(model, sequences, batch_size)
    scale = head_scale(h, g)
    fitted = {c: fit_thresholds(h, scale, sparse, c) for c in set(choice.values())}
    rules: dict[float, SiteRule] = {}
    for r in ratios:
        if r >= 1.0:
            rules[r] = SiteRule()
            continue
        threshold, mean = fitted[choice[r]][r]
        rules[r] = SiteRule(threshold=threshold, scale=scale.float().tolist())
        if mean is not None:
            rules[r].center = mean.tolist()
            rules[r].bias = {HEAD_PROJECTION: (stored.double() @ mean.double()).float().tolist()}
    return rules
