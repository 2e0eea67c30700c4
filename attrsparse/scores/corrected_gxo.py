"""Corrected GxO, the paper's metric: ``GxO + 1/2 |x_i| ||g_layer||_2``.

``g_layer`` is the gradient over every unit of the same layer at the same token. The correction is
half the paper's bound on the attribution error caused by deactivating earlier layers.

Heads (``head_reduction="sum"``, the default): ``-o_h . g_h + 1/2 ||o_h||_2 ||g||_2`` with the norm over
the whole output-projection input of the layer (the Cauchy-Schwarz form of the bound).
``head_reduction="mean"`` reproduces the official code: ``-mean_d(o g) + 1/2 ||o_h|| ||(mean_d g_h')_h'||``.
"""

from ..core.units import UnitScores
from .base import Score, gxo_terms, register_score


@register_score
class CorrectedGxO(Score):
    name = "corrected_gxo"
    description = "the paper's corrected GxO: -x*g + 1/2*|x|*||g of the layer||"

    def from_trace(self, trace, head_reduction="sum"):
        gxo = gxo_terms(trace, head_reduction)
        mlp_norm = trace.mlp_g.norm(dim=-1, keepdim=True)  # [T, L, 1]
        if head_reduction == "mean":
            head_norm = trace.head_g.mean(-1).norm(dim=-1, keepdim=True)  # [T, L, 1]
        else:
            head_norm = trace.head_g.flatten(-2).norm(dim=-1, keepdim=True)
        return UnitScores(gxo.mlp + 0.5 * trace.mlp_x.abs() * mlp_norm,
                          gxo.heads + 0.5 * trace.head_x.norm(dim=-1) * head_norm)
