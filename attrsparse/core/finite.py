"""The one finiteness check of model outputs.

A model with a NaN weight (or one that overflows in float16) produces NaN logits; ``argmax`` and
``max(..., key=...)`` then silently pick index 0, and every score computed from those picks looks
plausible (a broken model scored MC1 accuracy 1.0). Wherever logits, log-likelihoods or losses are
consumed, :func:`check_finite` stops the run with one line naming the model and the place.
``-inf`` is allowed in logits (a token a model rules out); NaN and ``+inf`` never are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .errors import UserError

#: Attribute of a loaded model holding the spec it was loaded from (set by ``load_model``).
SPEC_ATTRIBUTE = "_attrsparse_spec"


class NonFiniteError(UserError):
    """A model produced NaN or +inf logits, log-likelihoods or losses."""


def model_name(model) -> str:
    """What a model is called in messages: the spec it was loaded from (:func:`load_model` records
    it), else its ``name_or_path`` (a folder, a hub id), else its class."""
    if model is None:
        return "the model"
    if getattr(model, SPEC_ATTRIBUTE, None):
        return repr(getattr(model, SPEC_ATTRIBUTE))
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return repr(str(name)) if name else type(model).__name__


def check_finite(values, model, where: str):
    """Return ``values`` (a tensor or numbers) unchanged when none is NaN or +inf, else raise
    :class:`NonFiniteError` naming ``model`` (see :func:`model_name`) and ``where``."""
    if isinstance(values, torch.Tensor):
        bad = torch.isnan(values) | torch.isposinf(values)
        if not bool(bad.any()):
            return values
        count, total = int(bad.sum()), values.numel()
    else:
        floats = [float(v) for v in (values if isinstance(values, Iterable) else [values])]
        count, total = sum(1 for v in floats if math.isnan(v) or v == math.inf), len(floats)
        if not count:
            return values
    raise NonFiniteError(f"model {model_name(model)} produced non-finite values (NaN or inf) in {where} "
                         f"({count} of {total}); its weights or inputs are broken (a NaN weight, or "
                         f"overflow: try --dtype float32), so no score from it would mean anything")
