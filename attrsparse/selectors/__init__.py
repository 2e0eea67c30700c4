"""Selectors: turn scores or live activations into keep-masks at a target ratio.

The registry (:mod:`.base`) holds every selector by name: the scores of :mod:`attrsparse.scores`
under top-k, ours (:mod:`.progressive`, :mod:`.static`) and the field's input-channel rules (:mod:`.channels`), unit-space stand-ins (:mod:`.teal_units`,
:mod:`.cats_units`, :mod:`.baselines`) and :mod:`.wanda`. One top-k rule (:mod:`.topk`), one budget rule (:mod:`.budget`).
"""

from . import baselines, cats_units, channel_calibration, progressive, static, teal_units, wanda  # noqa: F401
from .base import (
                   ALIASES,
                   RECOMMENDED,
                   OnlineRule,
                   ScoreSelector,
                   Selector,
                   get_metric,
                   get_selector,
                   list_metrics,
                   list_selectors,
                   register_metric,
                   register_selector,
                   resolve_metric_names,
                   resolve_selector_names,
)
from .topk import SCOPES, keep_count, select, top_k, unit_ranks

__all__ = ["ALIASES", "RECOMMENDED", "SCOPES", "OnlineRule", "ScoreSelector", "Selector", "get_metric",
           "get_selector", "keep_count", "list_metrics", "list_selectors", "register_metric",
           "register_selector", "resolve_metric_names", "resolve_selector_names", "select", "top_k",
           "unit_ranks"]
