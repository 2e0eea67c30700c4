"""Importance metrics and selectors, one module each, behind one interface and a registry."""

from ..selectors import baselines, progressive
from . import corrected_gxo, gradient, gxo, ig, magnitude, snip  # noqa: F401
from ..selectors import cats, teal, wanda  # noqa: F401  (the field's calibrated baselines)
from .base import Metric, get_metric, list_metrics, register_metric

PAPER_METRICS = ("magnitude", "gradient", "gxo", "snip", "ig", "corrected_gxo")
RECOMMENDED = "progressive_gxo"  # the best selector we have (see docs/results)
ALIASES = {"paper": PAPER_METRICS, "recommended": (RECOMMENDED,),
           "ablation": ("corrected_gxo", "budget_gxo", "progressive_uniform_gxo", RECOMMENDED)}


def resolve_metric_names(names) -> list[str]:
    """Expand aliases (``paper``; ``recommended`` is a registered selector) and check each name."""
    out: list[str] = []
    for name in names:
        for resolved in ALIASES.get(name, (name,)):
            if resolved not in out:
                out.append(get_metric(resolved).name)
    return out


__all__ = ["Metric", "PAPER_METRICS", "RECOMMENDED", "get_metric", "list_metrics", "register_metric",
           "resolve_metric_names"]
