"""Importance metrics, one module each, behind one interface and a registry."""

from . import corrected_gxo, gradient, gxo, ig, magnitude, snip  # noqa: F401  (registration)
from .base import Metric, get_metric, list_metrics, register_metric

__all__ = ["Metric", "get_metric", "list_metrics", "register_metric"]
