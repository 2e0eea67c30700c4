"""Gradient: the signed ``-g`` (as the official code ranks it); a head's score is ``-sum_d g_d``."""

from ..core.units import UnitScores
from .base import Score, head_sum, register_score


@register_score
class Gradient(Score):
    name = "gradient"
    description = "signed gradient -dL/dx (head: -sum over its dims, or mean)"

    def from_trace(self, trace, head_reduction="sum"):
        return UnitScores(-trace.mlp_g, head_sum(-trace.head_g, head_reduction))
