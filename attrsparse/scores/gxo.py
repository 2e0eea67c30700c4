"""Gradient x Output: ``-x_i g_i``, the first-order loss increase when unit i is removed."""

from .base import Score, gxo_terms, register_score


@register_score
class GradientTimesOutput(Score):
    name = "gxo"
    description = "gradient x output -x*dL/dx: first-order loss increase on removal"

    def from_trace(self, trace, head_reduction="sum"):
        return gxo_terms(trace, head_reduction)
