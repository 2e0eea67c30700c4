"""Output magnitude: ``|x_i|``; a head's score is ``||o_h||_2`` (the LLM practice, the paper's baseline)."""

from ..core.units import UnitScores
from .base import Score, register_score


@register_score
class Magnitude(Score):
    name = "magnitude"
    description = "output magnitude |x| (head: L2 norm of its output)"

    def from_trace(self, trace, head_reduction="sum"):
        return UnitScores(trace.mlp_x.abs(), trace.head_x.norm(dim=-1))
