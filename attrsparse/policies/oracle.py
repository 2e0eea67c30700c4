"""The paper's oracle as a policy for teacher-forced evaluation.

For one sequence ``x [S]``: (1) a dense pass gives the model's own prediction ``y_t = argmax``
at every position (the label; the ground truth is never used); (2) one trace over ``x`` attributes
``loss_t = CE(logits_t, y_t)`` to every unit at every position (:func:`trace_gradients` with the
text as input and ``y`` as labels); (3) the metric's scores give per-position masks at the ratio
(selectors such as ``progressive_gxo`` re-score under their own masks); (4) the masked pass over
``x`` gives the logits. Rows are processed one at a time (padding is stripped per row).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..core.accounting import unit_read
from ..core.errors import UserError
from ..core.hooks import UnitHooks
from ..core.trace import model_logits, trace_gradients
from ..core.units import UnitMasks, unit_map
from ..selectors.base import Selector
from ..selectors.topk import check_scope
from .base import PolicyOutput, SparsityPolicy


class OraclePolicy(SparsityPolicy):
    """Per-position attribution masks along the dense model's own predictions."""

    mode = "oracle"
    deployable = False

    def __init__(self, selector: Selector, ratio: float, scope: str = "per_layer", head_reduction: str = "sum",
                 **_):
        super().__init__(selector.name, ratio)
        if selector.is_ig:
            raise UserError(f"{selector.name}: Integrated Gradients needs {20}+ passes per sequence; "
                            "use it in `attrsparse sweep`, not in task evaluations")
        self.selector = selector
        self.scope = check_scope(scope)
        self.head_reduction = head_reduction

    def _masks(self, model, prompt: torch.Tensor, target: torch.Tensor, labels=None) -> UnitMasks:
        """Masks ``[T, L, *]`` from one trace of ``prompt + target`` attributing ``labels``
        (default ``target``; ``"argmax"``: the trace's own dense predictions)."""
        trace = trace_gradients(model, prompt, target, labels=labels).row(0)
        scores = self.selector.scores(model, prompt, target, trace, head_reduction=self.head_reduction)
        return self.selector.masks_for(scores, self.ratio, self.scope, model=model, prompt_ids=prompt,
                                       target_ids=target, labels=labels, trace=trace, units=unit_map(model),
                                       head_reduction=self.head_reduction)

    def row_masks(self, model, ids: torch.Tensor) -> UnitMasks:
        """Masks ``[S, L, *]`` for one unpadded sequence ``ids [S]``."""
        labels = "argmax"  # the dense prediction at each position, taken from the trace's own pass
        if self.selector.kind == "selector":  # re-scoring passes need the labels themselves
            with torch.no_grad():
                labels = model_logits(model, ids.unsqueeze(0), None)[0].argmax(-1)  # [S]
        return self._masks(model, ids[:1], torch.cat([ids[1:], ids[-1:]]), labels)  # last target token is never input

    def schedule(self, model, prompt: torch.Tensor, label: torch.Tensor) -> UnitMasks:
        """Masks ``[T, L, *]`` for generating ``label`` after ``prompt`` (the sweep's protocol)."""
        return self._masks(model, prompt, label)

    @contextmanager
    def apply(self, model):
        raise UserError(f"selector '{self.name}' (oracle) cannot generate or run plain forward calls: its "
                        "masks need the whole sequence and its dense labels; use a static, online or "
                        "predictor selector")
        yield  # pragma: no cover

    def forward(self, model, ids, attention_mask=None, **_):
        units = unit_map(model)
        b, s = ids.shape
        keep = torch.ones(b, s, dtype=torch.bool, device=ids.device) if attention_mask is None \
            else attention_mask.bool()
        masks = UnitMasks.dense(units, b, s, device=ids.device)
        for row in range(b):
            chosen = self.row_masks(model, ids[row][keep[row]])
            masks.mlp[row][keep[row]] = chosen.mlp
            masks.heads[row][keep[row]] = chosen.heads
        with torch.no_grad(), UnitHooks(model) as hooks:
            hooks.mlp_mult, hooks.head_mult = masks.mlp, masks.heads
            logits = model_logits(model, ids, attention_mask)
        return PolicyOutput(logits, masks, unit_read(masks, model))
