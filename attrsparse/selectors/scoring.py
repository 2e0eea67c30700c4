"""``score()``: per-token importance of every unit for a (prompt, target) pair."""

from __future__ import annotations

from torch import nn

from ..core.errors import UserError
from ..core.trace import GradientTrace, as_ids, trace_gradients
from ..core.units import UnitScores
from .base import get_selector


def score(model: nn.Module, prompt_ids, target_ids, metrics=("corrected_gxo",), *,
          head_reduction: str = "sum", ig_steps: int = 20,
          trace: GradientTrace | None = None) -> dict[str, UnitScores]:
    """Importance scores of every MLP unit and head at every target token.

    Args:
        prompt_ids: ``[P]`` token ids of the prompt (P >= 1).
        target_ids: ``[T]`` token ids of the continuation to attribute (T >= 1).
        metrics: registered metric names (see :func:`attrsparse.list_metrics`).
        head_reduction: ``"sum"`` (exact first-order head terms) or ``"mean"`` (official code).
        ig_steps: Riemann steps for the IG metrics.
        trace: a precomputed :class:`GradientTrace` row to reuse.

    Returns:
        ``{name: UnitScores}`` with ``mlp [T, L, N]`` and ``heads [T, L, H]``; higher = keep.
        All single-pass metrics share one forward and one backward pass.
    """
    prompt, target = as_ids(prompt_ids, "prompt"), as_ids(target_ids, "target")
    chosen = [get_selector(m) for m in ([metrics] if isinstance(metrics, str) else metrics)]
    selectors = [m.name for m in chosen if m.kind == "selector"]
    if selectors:
        raise UserError(f"{', '.join(selectors)}: a selector gives masks, not scores; use "
                        f"attrsparse.get_selector(name).masks_for(...) or `attrsparse sweep --metrics`")
    if trace is None:
        trace = trace_gradients(model, prompt, target).row(0)
    out = {}
    for metric in chosen:  # most need no extra passes (the trace holds x and g)
        out[metric.name] = metric.scores(model, prompt, target, trace,
                                         head_reduction=head_reduction, ig_steps=ig_steps)
    return out
