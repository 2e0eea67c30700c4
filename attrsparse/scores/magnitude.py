"""Output magnitude: ``|x_i|``; a head's score is ``||o_h||_2`` (the LLM practice, the paper's baseline)."""

from ..core.units import UnitScores
from .base import Metric, register_metric


@register_metric
class Magnitude(Metric):
    name = "magnitude"
    description = "output magnitude |x| (head: L2 norm of its output)"

    def from_trace(self, trace, head_reduction="sum"):
        return UnitScores(trace.mlp_x.abs(), trace.head_x.norm(dim=-1))
