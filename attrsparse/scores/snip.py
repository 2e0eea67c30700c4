"""SNIP: ``|x_i g_i|`` (Fisher information, its square, ranks identically); heads ``|sum_d o_d g_d|``."""

from .base import Score, gxo_terms, register_score


@register_score
class Snip(Score):
    name = "snip"
    description = "SNIP |x*dL/dx| (ranks like Fisher information)"

    def from_trace(self, trace, head_reduction="sum"):
        return gxo_terms(trace, head_reduction).map(lambda t: t.abs())
