"""Per-site budgets by calibration-loss sensitivity (the ``sensitivity`` allocation of channel rules).

For every group of streams (a site, or one consumer of it) the calibration loss is measured with
only that group sparse, at a few kept fractions (:data:`LEVELS`), every other site dense: the mean
KL divergence of the sparse model's next-token distribution from the dense model's over
:data:`TOKENS` calibration tokens. A greedy search then lowers, one step at a time, the group whose
next step adds the least loss per weight saved (the curves interpolated linearly between the
measured levels), until the read ratio is met. It assumes the groups' losses add up; the joint
result is what the refinement and the measurements then see.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.architectures import model_device
from ..core.channel_hooks import ChannelHooks
from .channel_stats import LogHistogram, leading_batch

LEVELS = (0.75, 0.5, 0.3, 0.15)
TOKENS = 512
STEP = 0.05


class SensitivityCurves:
    """``loss[g][i]``: calibration KL with group g kept at ``LEVELS[i]`` (1.0: 0), the rest dense."""

    def __init__(self, cal, hist: LogHistogram):
        self.cal, self.hist = cal, hist
        self.groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(cal.streams):
            self.groups.setdefault((s.layer, s.site, s.consumer), []).append(i)
        self.ids = leading_batch(cal.sequences, TOKENS).to(model_device(cal.model))
        with torch.no_grad():
            logp = F.log_softmax(cal.model(input_ids=self.ids, use_cache=False).logits.float(), -1)
        self.p, self.neg_entropy = logp.exp(), (logp.exp() * logp).sum(-1)
        self.loss = {g: [self._kl(g, k) for k in LEVELS] for g in self.groups}

    def _kl(self, group: tuple, keep: float) -> float:
        rule_set = self.cal.partial_rule({i: keep for i in self.groups[group]}, self.hist)
        with torch.no_grad(), ChannelHooks(self.cal.model, rule_set), rule_set.live_state(self.cal.model):
            logits = self.cal.model(input_ids=self.ids, use_cache=False).logits.float()
        kl = self.neg_entropy - (self.p * F.log_softmax(logits, -1)).sum(-1)
        return max(0.0, float(kl.mean()))

    def at(self, group: tuple, keep: float) -> float:
        """The group's loss at ``keep``, linear between the measured levels (0 at 1.0)."""
        xs = [1.0] + list(LEVELS)
        ys = [0.0] + self.loss[group]
        if keep >= 1.0:
            return 0.0
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if x1 <= keep <= x0:
                return y0 + (y1 - y0) * (x0 - keep) / (x0 - x1)
        return ys[-1] + (ys[-1] - ys[-2]) * (xs[-1] - keep) / (xs[-2] - xs[-1])  # below the last level

    def keep_for(self, ratio: float) -> list[float]:
        """Kept fraction of every stream for read ratio ``ratio`` (the greedy of the module docstring)."""
        weights = self.cal.stream_weights()
        target = ratio * self.cal.smap.decoder_params - self.cal.fixed_read()
        group_w = {g: sum(weights[i] for i in idx) for g, idx in self.groups.items()}
        keep = {g: 1.0 for g in self.groups}
        read = sum(group_w.values())
        while read > target:
            best, best_cost = None, math.inf
            for g, k in keep.items():
                if k <= STEP / 2:
                    continue
                step = min(STEP, k)
                cost = (self.at(g, k - step) - self.at(g, k)) / (step * group_w[g])
                if cost < best_cost:
                    best, best_cost = g, cost
            if best is None:
                break
            step = min(STEP, keep[best], (read - target) / group_w[best])
            keep[best] -= step
            read -= step * group_w[best]
        out = [1.0] * len(self.cal.streams)
        for g, idx in self.groups.items():
            for i in idx:
                out[i] = keep[g]
        return out
