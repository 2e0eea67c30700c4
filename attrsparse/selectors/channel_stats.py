"""Calibration statistics of the sites' inputs: score histograms, per-channel moments, attribution.

* :class:`LogHistogram`: counts of non-negative scores in log2 bins (64 per octave, 2^-40 to 2^24),
  one row per stream (a site, or one consumer of a site); a threshold that keeps a fraction ``k``
  of a stream's values is read off it to within one bin (1.1% in value), so the kept fraction on
  the calibration data is the requested one to well under 0.01.
* :func:`site_inputs`: every site's input (the first consumer's pre-hook sees it) of a forward
  pass, dense or under a rule, before the rule transforms it.
* :func:`attribution`: ``E|dL/dx_j|`` and ``E[(dL/dx_j)^2]`` for every channel of every site input,
  from per-token gradients (one forward and one backward per batch with the attention of
  :mod:`attrsparse.core.attention`: the gradient of token t's loss reaches position t only, as in
  decoding), the language-modelling loss of the calibration text.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn

from ..core.architectures import model_device
from ..core.attention import diagonal_gradient_attention
from ..core.channel_hooks import ChannelHooks
from ..core.sites import SITE_NAMES, site_map
from ..core.trace import to_ids, token_losses

_LO, _HI, _PER_OCTAVE = -40.0, 24.0, 64
BINS = int((_HI - _LO) * _PER_OCTAVE)


class LogHistogram:
    """Counts of scores ``>= 0`` per stream in log2 bins (bin 0 holds everything below 2^-40, zeros
    included)."""

    def __init__(self, streams: int):
        self.counts = torch.zeros(streams, BINS, dtype=torch.float64)

    @staticmethod
    def bins(values: torch.Tensor) -> torch.Tensor:
        logs = torch.log2(values.detach().float().clamp_min(2.0 ** _LO))
        return ((logs - _LO) * _PER_OCTAVE).long().clamp_(0, BINS - 1)

    def add(self, stream: int, values: torch.Tensor) -> None:
        self.counts[stream] += torch.bincount(self.bins(values).reshape(-1).cpu(), minlength=BINS).double()

    @staticmethod
    def edge(b) -> float:
        """Lower edge of bin ``b`` (the threshold that keeps bins ``>= b``)."""
        return 0.0 if b <= 0 else 2.0 ** (_LO + b / _PER_OCTAVE)

    def above(self, stream: int) -> torch.Tensor:
        """``[BINS + 1]``: fraction of the stream's values in bins ``>= b`` (1 at b = 0, 0 at the end)."""
        c = self.counts[stream]
        tail = torch.cat([c.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        return tail / max(1.0, float(c.sum()))

    def threshold(self, stream: int, keep: float) -> float:
        """The threshold ``t`` with ``score > t`` keeping about ``keep`` of the stream's values
        (linear in log-value inside the bin where the fraction is crossed)."""
        if keep >= 1.0:
            return -1.0  # keep everything, zeros included
        if keep <= 0.0:
            return math.inf
        above = self.above(stream)
        b = int((above >= keep).nonzero().max())  # last bin edge at or above the wanted fraction
        if b >= BINS or b <= 0:
            return self.edge(max(b, 0))
        lo, hi = float(above[b]), float(above[b + 1])
        w = 0.0 if lo == hi else (lo - keep) / (lo - hi)
        return 2.0 ** (_LO + (b + w) / _PER_OCTAVE)

    def kept(self, stream: int, t: float) -> float:
        """Fraction of the stream's values above ``t`` (interpolated inside its bin)."""
        if t < 0:
            return 1.0
        if t == math.inf:
            return 0.0
        pos = 0.0 if t <= 0 else (math.log2(t) - _LO) * _PER_OCTAVE
        b = min(BINS - 1, max(0, int(pos)))
        above = self.above(stream)
        w = min(1.0, max(0.0, pos - b))
        return float(above[b]) * (1 - w) + float(above[b + 1]) * w


@contextmanager
def site_inputs(model: nn.Module, per_consumer: bool = False) -> Iterator[dict]:
    """During the block, ``captured[(layer, site)]`` is the last input of that site (as its first
    consumer received it, before any channel rule; ``[..., in]``, graph kept). ``per_consumer``:
    ``captured[(layer, site, c)]`` is consumer c's own copy of the input, so a gradient taken with
    respect to it flows through that consumer only."""
    smap = site_map(model)
    captured: dict = {}
    handles = []

    def own_copy(key):
        def hook(_m, args):
            x = args[0].clone()
            captured[key] = x
            return (x,) + tuple(args[1:])
        return hook

    for l, layer in enumerate(smap.layers):
        for name in SITE_NAMES:
            if per_consumer:
                for c, module in enumerate(layer[name].modules):
                    handles.append(module.register_forward_pre_hook(own_copy((l, name, c))))
                continue
            module = layer[name].modules[0]
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, key=(l, name): captured.__setitem__(key, args[0])))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def batches(sequences: list[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Equal-length id sequences ``[B, S]`` (sequences of other lengths go in their own batch)."""
    by_len: dict[int, list] = {}
    for s in sequences:
        by_len.setdefault(to_ids(s).numel(), []).append(to_ids(s))
    for group in by_len.values():
        for start in range(0, len(group), size):
            yield torch.stack(group[start:start + size])


def leading_batch(sequences: list[torch.Tensor], tokens: int) -> torch.Tensor:
    """One batch ``[B, S]`` of the first sequences, taken until they hold at least ``tokens``
    tokens (of their common length: the first group of :func:`batches`)."""
    seqs, count = [], 0
    for s in sequences:
        if count >= tokens:
            break
        seqs.append(s)
        count += s.numel()
    return next(batches(seqs, len(seqs)))


X_WEIGHTS = (1, 2, 4)  # powers p of the |x|^p-weighted gradient moments attribution() also sums
LABELS = ("text", "sampled")  # the targets of attribution()'s loss


def attribution(model: nn.Module, sequences: list[torch.Tensor], batch_size: int = 4,
                per_token: bool = True, per_consumer: bool = False, rule=None, labels: str = "text",
                seed: int = 0, skip_first: int = 0) -> dict:
    """Per site input ``(layer, site)``: ``{"abs_grad": E|g_j|, "sq_grad": E[g_j^2], "mean": E[x_j],
    "abs": E|x_j|}`` and, for p in :data:`X_WEIGHTS`, ``"x{p}": E|x_j|^p`` and ``"x{p}_sq_grad":
    E[|x_j|^p g_j^2]``, and ``"x_sq_grad": E[x_j g_j^2]`` (so that the x²-weighted moments of a
    shifted input x - m follow: E[(x-m)^2 g^2] = E[x^2 g^2] - 2m E[x g^2] + m^2 E[g^2]) over every
    predicting position of the calibration text (float64, CPU).

    ``per_token``: ``g`` at position t is the gradient of token t's own loss (decoding's view, the
    one-pass attention); else of every later token's loss too (a plain backward: what a channel
    dropped at position t costs through the keys and values later tokens read). ``per_consumer``:
    keys ``(layer, site, c)`` too, the gradient through consumer c alone. ``rule`` (a bound
    :class:`~.channels.ChannelRuleSet`): the passes run under it, and ``x`` and ``g`` are those of the
    input each consumer really sees (dropped channels at their fill; their gradient is still
    ``W[:, j]^T dL/dy``: what restoring them would change). ``labels``: the loss of the text's next
    tokens ("text"), or of one token per position sampled from the model's own prediction there
    ("sampled", seeded by ``seed``: E[g g^T] is then the true Fisher, the curvature of the KL divergence
    from the model's predictions, instead of the empirical one). ``skip_first``: the first positions
    of every window are left out of the sums (a window's first token is an attention sink with
    inputs of another scale; the gradients still include what every position's loss sends there)."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    generator = torch.Generator().manual_seed(seed)
    device = model_device(model)
    sums: dict = {}
    tokens = 0
    embed = model.get_input_embeddings()
    for ids in batches(sequences, batch_size):
        ids = ids.to(device)
        with torch.no_grad():
            embeds = embed(ids[:, :-1])
        embeds.requires_grad_(True)
        attention = diagonal_gradient_attention(model) if per_token else nullcontext()
        # the rule's hooks first, so that site_inputs captures what they pass on
        hooks = ChannelHooks(model, rule) if rule is not None else nullcontext()
        live = rule.live_state(model) if rule is not None else nullcontext()
        with hooks, live, site_inputs(model, per_consumer) as cap, attention, torch.enable_grad():
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            targets = ids[:, 1:]
            if labels == "sampled":
                probs = torch.softmax(logits.detach().double().cpu(), dim=-1).reshape(-1, logits.shape[-1])
                targets = torch.multinomial(probs, 1, generator=generator).reshape(targets.shape).to(device)
            loss = sum(token_losses(logits[b:b + 1], targets[b]).sum() for b in range(ids.shape[0]))
            keys = list(cap)
            grads = torch.autograd.grad(loss, [cap[k] for k in keys])
        n = ids.shape[0] * max(0, ids.shape[1] - 1 - skip_first)
        tokens += n
        pairs = list(zip(keys, grads))
        if per_consumer:  # the shared input's own gradient: the sum over its consumers
            shared: dict = {}
            for (l, name, c), g in pairs:
                shared[(l, name)] = g if c == 0 else shared[(l, name)] + g
                if c == 0:
                    cap[(l, name)] = cap[(l, name, c)]
            pairs += list(shared.items())
        for key, g in pairs:
            x = cap[key].detach().double()[:, skip_first:].reshape(-1, g.shape[-1])
            g = g.detach().double()[:, skip_first:].reshape(-1, g.shape[-1])
            part = {"abs_grad": g.abs().sum(0), "sq_grad": (g * g).sum(0), "mean": x.sum(0), "abs": x.abs().sum(0)}
            for power in X_WEIGHTS:  # the |x|^power-weighted moments of g
                w = x.abs() ** power
                part[f"x{power}"], part[f"x{power}_sq_grad"] = w.sum(0), (w * g * g).sum(0)
            part["x_sq_grad"] = (x * g * g).sum(0)  # signed: with x2 and mean, the moments of x - m
            acc = sums.setdefault(key, {k: torch.zeros_like(v, device="cpu") for k, v in part.items()})
            for k, v in part.items():
                acc[k] += v.cpu()
    return {key: {k: v / tokens for k, v in acc.items()} for key, acc in sums.items()}
