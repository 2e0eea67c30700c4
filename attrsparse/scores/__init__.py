"""Importance scores, one module each, behind one interface and a registry (:mod:`.base`)."""

from . import corrected_gxo, gradient, gxo, ig, magnitude, snip  # noqa: F401  (registration)
from .base import Score, get_score, gxo_terms, head_sum, list_scores, register_score

PAPER_SCORES = ("magnitude", "gradient", "gxo", "snip", "ig", "corrected_gxo")

__all__ = ["PAPER_SCORES", "Score", "get_score", "gxo_terms", "head_sum", "list_scores", "register_score"]
