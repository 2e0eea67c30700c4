"""Online policies: masks decided inside the pass from the live unit inputs (TEAL, CATS, WINA).

The rule comes from the selector (:meth:`attrsparse.selectors.base.Selector.online_rule`),
calibrated in :meth:`OnlinePolicy.prepare` when the selector needs calibration sequences.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..core.hooks import UnitHooks
from ..core.units import UnitMasks, unit_map
from ..selectors.base import OnlineRule, Selector
from .base import Applied, SparsityPolicy


class _OnlineApplied(Applied):
    def __init__(self, model, hooks: UnitHooks, prepaid):
        super().__init__(model, prepaid)
        self.hooks = hooks

    def last_masks(self, batch, q):
        return UnitMasks(torch.stack([m.bool() for m in self.hooks.rule_mlp], dim=2),
                         torch.stack([m.bool() for m in self.hooks.rule_heads], dim=2))


class OnlinePolicy(SparsityPolicy):
    """Masks decided in the pass by the selector's :class:`~attrsparse.selectors.base.OnlineRule`."""

    mode = "online"
    prefix_cache = True

    def __init__(self, selector: Selector, ratio: float):
        super().__init__(selector.name, ratio)
        self.selector = selector
        self.needs_calibration = selector.needs_calibration
        self.rule: OnlineRule | None = None

    def prepare(self, model, calibration=None) -> None:
        self.rule = self.selector.online_rule(model, calibration, self.ratio)

    def _ready(self, model) -> OnlineRule:
        if self.rule is None:
            if self.needs_calibration:
                raise RuntimeError(f"{self.name}: thresholds are not calibrated; call prepare() first")
            self.prepare(model)
        return self.rule

    @contextmanager
    def apply(self, model):
        rule = self._ready(model)
        with UnitHooks(model) as hooks, rule.live_state(model):
            hooks.mlp_rule, hooks.head_rule = rule.mlp_keep, rule.head_keep
            yield _OnlineApplied(model, hooks, self.prepaid_params(self.rule_units(model)))

    @staticmethod
    def rule_units(model):
        return unit_map(model)

    def prepaid_params(self, units):
        return self.selector.prepaid_params(units)
