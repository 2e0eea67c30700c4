"""attrsparse: attribution-based sparse activation for small language models.

Public API::

    model, tok = attrsparse.load_model("smollm2-135m")
    units = attrsparse.unit_map(model)
    scores = attrsparse.score(model, prompt_ids, target_ids, metrics=["gxo", "corrected_gxo"])
    masks = attrsparse.select(scores["corrected_gxo"], ratio=0.5, scope="per_layer")
    with attrsparse.sparsify(model, masks) as sp:      # or a spec: "teal", "static:DIR", ...
        ...                                            # masked forward passes / decoding
    sp.executed.param                                  # parameter-weighted ratio really executed

The layers, bottom up: :mod:`.core`, :mod:`.data`, :mod:`.scores`, :mod:`.selectors`,
:mod:`.policies`, :mod:`.deploy`, :mod:`.experiments` / :mod:`.evaluation`, :mod:`.cli`
(docs/architecture.md).
"""

from __future__ import annotations

from .core import __version__
from .core.architectures import ARCHITECTURES, supported_model_types
from .core.errors import UnsupportedArchitectureError, UserError
from .core.hooks import capture_units
from .core.masking import apply_masks
from .core.models import load_model
from .core.trace import GradientTrace, trace_gradients
from .core.units import ExecutedRatio, UnitMap, UnitMasks, UnitScores, executed_ratio, unit_map
from .deploy import generate, sparsify
from .selectors import get_metric, get_selector, list_metrics, list_selectors, register_metric, select
from .selectors.scoring import score
from .selectors.topk import SCOPES

POLICIES = SCOPES  # the old name of the selection scopes

__all__ = [
    "ARCHITECTURES", "ExecutedRatio", "GradientTrace", "POLICIES", "SCOPES", "UnitMap", "UnitMasks",
    "UnitScores", "UnsupportedArchitectureError", "UserError", "__version__", "apply_masks", "capture_units",
    "executed_ratio", "generate", "get_metric", "get_selector", "list_metrics", "list_selectors", "load_model",
    "register_metric", "score", "select", "sparsify", "supported_model_types", "trace_gradients", "unit_map",
]
