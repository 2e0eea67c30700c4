"""Apply unit masks to a stock model for the duration of a ``with`` block.

Three mask layouts (see :class:`attrsparse.core.units.UnitMasks`):

* static ``[L, *]``: every position of every forward call is masked alike;
* schedule ``[T, L, *]``: the protocol of the paper's decoding. Forward call 0 (the prefill of the
  prompt) runs the prompt dense except its last position, which produces generated token 0 and
  uses row 0 (``mask_prefill=True`` masks the whole prompt with row 0 instead); call ``k >= 1``
  (one new token) uses row ``k``. Calls past the schedule run dense and are counted as dense;
* batched schedule ``[B, T, L, *]``: the same with one schedule per batch row.

The handle counts what really ran (:attr:`MaskHandle.executed`), generated-token rows only;
dense prompt positions are counted in :attr:`MaskHandle.prefill_dense_tokens`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .hooks import UnitHooks
from .units import ExecutedRatio, UnitMasks, executed_ratio


class MaskHandle:
    """Controls the masks of an :func:`apply_masks` block."""

    def __init__(self, hooks: UnitHooks, masks: UnitMasks, mask_prefill: bool):
        self.hooks = hooks
        self.masks = masks
        self.mask_prefill = mask_prefill
        self.step = 0
        self.executed = ExecutedRatio()
        self.prefill_dense_tokens = 0
        dims = masks.mlp.dim()
        if dims not in (2, 3, 4):
            raise ValueError(f"masks must be [L, N], [T, L, N] or [B, T, L, N]; got {tuple(masks.mlp.shape)}")
        self.kind = {2: "static", 3: "schedule", 4: "batched"}[dims]

    @property
    def length(self) -> int:
        return {"static": 0, "schedule": self.masks.mlp.shape[0],
                "batched": self.masks.mlp.shape[1]}[self.kind]

    def _row(self, step: int) -> UnitMasks | None:
        """Masks for generated token ``step``: ``[L, *]`` or ``[B, L, *]``; None past the end."""
        if step >= self.length:
            return None
        return self.masks[step] if self.kind == "schedule" else self.masks[:, step]

    def _account(self, row: UnitMasks | None, batch: int) -> None:
        units = self.hooks.units
        if row is None:
            row = UnitMasks.dense(units)
        if row.mlp.dim() == 2:
            row = UnitMasks(row.mlp.expand(batch, *row.mlp.shape), row.heads.expand(batch, *row.heads.shape))
        self.executed = self.executed.add(executed_ratio(row, units))

    def before_forward(self, batch: int, q: int) -> None:
        """Set the multipliers for a forward call over ``q`` new positions."""
        hooks = self.hooks
        if self.kind == "static":
            hooks.mlp_mult, hooks.head_mult = self.masks.mlp, self.masks.heads
            self._account(self.masks, batch * q)
            return
        row = self._row(self.step)
        if row is None:
            hooks.mlp_mult = hooks.head_mult = None
        elif q == 1 or self.mask_prefill:
            hooks.mlp_mult, hooks.head_mult = row.mlp, row.heads
        else:  # prefill: dense prompt, masked last position
            hooks.mlp_mult = _last_position_only(row.mlp, batch, q)
            hooks.head_mult = _last_position_only(row.heads, batch, q)
            self.prefill_dense_tokens += batch * (q - 1)
        if q > 1 and self.mask_prefill:
            for _ in range(q - 1):
                self._account(row, batch)
        self._account(row, batch)
        self.step += 1


def _last_position_only(row: torch.Tensor, batch: int, q: int) -> torch.Tensor:
    """``[(B,) L, K]`` -> ``[B, q, L, K]`` of ones with the last position set to ``row``."""
    if row.dim() == 2:
        row = row.unsqueeze(0).expand(batch, *row.shape)
    mult = torch.ones(batch, q, *row.shape[1:], dtype=row.dtype, device=row.device)
    mult[:, -1] = row
    return mult


def _new_positions(args, kwargs) -> tuple[int, int]:
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return int(ids.shape[0]), int(ids.shape[1])


@contextmanager
def apply_masks(model: nn.Module, masks: UnitMasks, mask_prefill: bool = False) -> Iterator[MaskHandle]:
    """Mask units during every forward call of ``model`` inside the block.

    Example::

        masks = attrsparse.select(scores, ratio=0.5)          # schedule [T, L, *]
        with attrsparse.apply_masks(model, masks) as handle:
            model.generate(ids, max_new_tokens=T, do_sample=False)
        handle.executed.param                                 # parameter-weighted ratio
    """
    with UnitHooks(model) as hooks:
        handle = MaskHandle(hooks, masks, mask_prefill)

        def pre_forward(module, args, kwargs):
            handle.before_forward(*_new_positions(args, kwargs))

        reg = model.register_forward_pre_hook(pre_forward, with_kwargs=True)
        try:
            yield handle
        finally:
            reg.remove()
