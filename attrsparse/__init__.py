"""attrsparse: attribution-based sparse activation for small language models.

Public API::

    model, tok = attrsparse.load_model("smollm2-135m")
    units = attrsparse.unit_map(model)
    scores = attrsparse.score(model, prompt_ids, target_ids, metrics=["gxo", "corrected_gxo"])
    masks = attrsparse.select(scores["corrected_gxo"], ratio=0.5, policy="per_layer")
    with attrsparse.apply_masks(model, masks) as handle:
        ...                          # masked forward passes / decoding
    handle.executed.param            # parameter-weighted activation ratio really executed
"""

from __future__ import annotations

from .core.architectures import ARCHITECTURES, UnitMap, supported_model_types, unit_map
from .core.errors import UnsupportedArchitectureError, UserError
from .core.hooks import capture_units
from .core.masking import apply_masks
from .scores import get_metric, list_metrics, register_metric
from .scores.scoring import score
from .selectors.topk import POLICIES, select
from .core.trace import GradientTrace, trace_gradients
from .core.units import ExecutedRatio, UnitMasks, UnitScores, executed_ratio
from .deploy import generate  # noqa: E402  (also registers the static_gxo selector)

__version__ = "0.1.0"


def load_model(spec: str = "smollm2-135m", **kwargs):
    """Load ``(model, tokenizer)``: a packaged alias, a HF id or directory, or a ``.gguf`` file.

    See :func:`attrsparse.models.load_model` for the options.
    """
    from .core.models import load_model as _load

    return _load(spec, **kwargs)


__all__ = [
    "ARCHITECTURES", "ExecutedRatio", "GradientTrace", "POLICIES", "UnitMap", "UnitMasks",
    "UnitScores", "UnsupportedArchitectureError", "UserError", "apply_masks", "capture_units",
    "executed_ratio", "generate", "get_metric", "list_metrics", "load_model", "register_metric", "score",
    "select", "supported_model_types", "trace_gradients", "unit_map",
]
