"""The one tolerance rule: when a sparse result counts as the dense model's quality.

Within 5% relative of dense for accuracies (``acc``, ``mc1``, ``mc2``), within 10% for perplexity
(lower is better), and BLEU against the dense model's own output of at least 95. ``compare``'s
frontier and ``bench``'s quality frontier both use :func:`within`.
"""

from __future__ import annotations

import math

TOLERANCE = {"acc": 0.05, "mc1": 0.05, "mc2": 0.05, "ppl": 0.10}
LOWER_IS_BETTER = {"ppl"}
BLEU_VS_DENSE_FLOOR = 95.0


def within(metric: str, relative: float | None, value: float | None = None) -> bool | None:
    """Whether ``metric`` at ``relative`` (sparse / dense) or, for ``bleu_vs_dense``, at ``value``
    is within tolerance; None when it is unknown (no dense value, NaN)."""
    if metric == "bleu_vs_dense":
        return None if value is None else value >= BLEU_VS_DENSE_FLOOR
    if relative is None or (isinstance(relative, float) and math.isnan(relative)):
        return None
    tol = TOLERANCE[metric]
    return relative <= 1 + tol if metric in LOWER_IS_BETTER else relative >= 1 - tol


def within_tolerance(record: dict) -> bool | None:
    """:func:`within` for a ``compare`` record with its ``primary_metric``."""
    return within(record["primary_metric"], record["relative_to_dense"], record["value"])
