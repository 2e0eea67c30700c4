"""The score interface and registry.

A score turns a :class:`~attrsparse.core.trace.GradientTrace` (unit outputs ``x`` and loss gradients
``g = d loss_t / d x`` at every target token) into :class:`~attrsparse.core.units.UnitScores` where a
higher score means *keep*: the estimated increase of the loss when the unit is removed.

Single-pass scores implement :meth:`Score.from_trace`; scores that need more model passes
(Integrated Gradients) set ``single_pass = False`` and implement :meth:`Score.from_model`.
Register a score with ``@register_score``; :func:`get_score` resolves names with a "did you mean"
hint. Turning scores into masks is the selectors' job (:mod:`attrsparse.selectors`), where every
registered score is also a selector (top-k of the score, the paper's oracle).
"""

from __future__ import annotations

import torch

from ..core.errors import UserError
from ..core.registry import lookup
from ..core.trace import GradientTrace
from ..core.units import UnitScores

HEAD_REDUCTIONS = ("sum", "mean")


class Score:
    """One importance score. Subclasses set ``name``/``description`` and one compute method."""

    name: str = ""
    description: str = ""
    single_pass: bool = True
    is_ig: bool = False  # Integrated Gradients (costly; limited by --ig-questions)

    def from_trace(self, trace: GradientTrace, head_reduction: str = "sum") -> UnitScores:
        """Scores ``mlp [T, L, N]``, ``heads [T, L, H]`` from one trace row."""
        raise NotImplementedError

    def from_model(self, model, prompt_ids, target_ids, trace: GradientTrace,
                   head_reduction: str = "sum", **options) -> UnitScores:
        """Scores that need extra passes over ``model``; default: :meth:`from_trace`."""
        return self.from_trace(trace, head_reduction)


_REGISTRY: dict[str, Score] = {}


def register_score(cls: type[Score]) -> type[Score]:
    """Class decorator: register an instance under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"score name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls()
    return cls


def get_score(name: str) -> Score:
    return lookup(_REGISTRY, name, "score")


def list_scores() -> list[str]:
    return list(_REGISTRY)


def head_sum(values: torch.Tensor, head_reduction: str) -> torch.Tensor:
    """Reduce per-dimension head values ``[..., H, D]`` to ``[..., H]`` by sum or mean."""
    if head_reduction not in HEAD_REDUCTIONS:
        raise UserError(f"head_reduction must be one of {HEAD_REDUCTIONS}, got '{head_reduction}'")
    return values.sum(-1) if head_reduction == "sum" else values.mean(-1)


def gxo_terms(trace: GradientTrace, head_reduction: str) -> UnitScores:
    """GxO importance ``-x * g`` (heads: ``-sum_d o_d g_d``, or the mean)."""
    return UnitScores(-(trace.mlp_x * trace.mlp_g), head_sum(-(trace.head_x * trace.head_g), head_reduction))
