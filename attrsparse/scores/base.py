"""The metric interface and registry.

A metric turns a :class:`~attrsparse.trace.GradientTrace` (unit outputs ``x`` and loss gradients
``g = d loss_t / d x`` at every target token) into :class:`~attrsparse.units.UnitScores` where a
higher score means *keep*: the estimated increase of the loss when the unit is removed.

Single-pass metrics implement :meth:`Metric.from_trace`; metrics that need more model passes
(Integrated Gradients) set ``single_pass = False`` and implement :meth:`Metric.from_model`.
Register a metric with ``@register_metric``; :func:`get_metric` resolves names with a
"did you mean" hint, so the CLI, configs and tests can enumerate :func:`list_metrics`.
"""

from __future__ import annotations

import difflib
import torch

from ..core.errors import UserError
from ..core.trace import GradientTrace
from ..core.units import UnitMasks, UnitScores

HEAD_REDUCTIONS = ("sum", "mean")


class Metric:
    """One importance metric. Subclasses set ``name``/``description`` and one compute method."""

    name: str = ""
    description: str = ""
    single_pass: bool = True
    is_ig: bool = False  # Integrated Gradients (costly; limited by --ig-questions)
    kind: str = "attribution"  # "attribution" (oracle, per token), "selector" or "baseline"

    def from_trace(self, trace: GradientTrace, head_reduction: str = "sum") -> UnitScores:
        """Scores ``mlp [T, L, N]``, ``heads [T, L, H]`` from one trace row."""
        raise NotImplementedError

    def from_model(self, model, prompt_ids, target_ids, trace: GradientTrace,
                   head_reduction: str = "sum", **options) -> UnitScores:
        """Scores that need extra passes over ``model``; default: :meth:`from_trace`."""
        return self.from_trace(trace, head_reduction)

    def masks_for(self, scores: UnitScores | None, ratio: float, policy: str = "per_layer",
                  **context) -> UnitMasks:
        """Keep-masks ``[T, L, *]`` at ``ratio``. Plain metrics apply the selection ``policy`` to
        their scores (``ratio`` is a unit ratio, the paper's); selectors (``kind="selector"``)
        override this and may use ``context`` (model, prompt_ids, target_ids, trace, units)."""
        from ..selectors.topk import select

        return select(scores, ratio, policy)

    def make_policy(self, ratio: float, **options):
        """The :class:`~attrsparse.policies.SparsityPolicy` that evaluates this metric on tasks.
        Default: the paper's oracle (per-position masks along the dense model's predictions);
        deployable baselines override this (online thresholds, static masks)."""
        from ..policies.oracle import OraclePolicy

        return OraclePolicy(self, ratio, **options)

    def masks_for_many(self, scores: UnitScores | None, ratios, policy: str = "per_layer",
                       **context) -> list[UnitMasks]:
        """:meth:`masks_for` at several ratios (selectors batch them)."""
        return [self.masks_for(scores, r, policy, **context) for r in ratios]


_REGISTRY: dict[str, Metric] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    """Class decorator: register an instance under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"metric name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls()
    return cls


def get_metric(name: str) -> Metric:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown metric '{name}'{hint} (available: {', '.join(list_metrics())})")


def list_metrics(kind: str | None = None) -> list[str]:
    return [n for n, m in _REGISTRY.items() if kind is None or m.kind == kind]


def head_sum(values: torch.Tensor, head_reduction: str) -> torch.Tensor:
    """Reduce per-dimension head values ``[..., H, D]`` to ``[..., H]`` by sum or mean."""
    if head_reduction not in HEAD_REDUCTIONS:
        raise UserError(f"head_reduction must be one of {HEAD_REDUCTIONS}, got '{head_reduction}'")
    return values.sum(-1) if head_reduction == "sum" else values.mean(-1)


def gxo_terms(trace: GradientTrace, head_reduction: str) -> UnitScores:
    """GxO importance ``-x * g`` (heads: ``-sum_d o_d g_d``, or the mean)."""
    return UnitScores(-(trace.mlp_x * trace.mlp_g), head_sum(-(trace.head_x * trace.head_g), head_reduction))

