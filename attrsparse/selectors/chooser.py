"""Unit choosers: each layer's units chosen from the hidden state entering the block, before it runs.

The runtime (:mod:`attrsparse.deploy.runtime`) asks a :class:`UnitChooser` in every layer for the
heads before attention and for the MLP units before the MLP; :meth:`UnitChooser.native` may
describe the same one-token choice to the C library (:class:`NativeChoice`), which then chooses
without calling Python. :class:`StaticChooser` serves fixed masks; the trained predictor's
chooser is :class:`attrsparse.selectors.predictor.PredictorChooser`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.units import UnitMasks


@dataclass
class NativeChoice:
    """How the C library chooses one token row's units of one layer itself (no Python per token).

    ``mask [K]``: the same units at every token. Else a low-rank predictor whose logits
    ``w2 relu(w1 h + b1) + b2`` (``w1 [r, d]``, ``b1 [r]``, ``w2 [K, r]``, ``b2 [K]``) rank the
    units: the top ``budget[0]`` are kept or, with ``by_heads`` (MLP units), the top
    ``budget[nh * (G + 1) + ng]`` given the layer's chosen heads (``nh`` heads in ``ng`` of the
    ``G`` key/value groups). Ties go to the lower index, as a stable descending sort.
    """

    mask: torch.Tensor | None = None
    w1: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    budget: torch.Tensor | None = None  # int64
    by_heads: bool = False

    def predictor(self) -> tuple | None:
        """``(w1, b1, w2, b2)`` as contiguous fp32, or None for a fixed mask."""
        if self.w1 is None:
            return None
        return tuple(None if t is None else t.detach().float().contiguous() for t in (self.w1, self.b1, self.w2, self.b2))


class UnitChooser:
    """Chooses each layer's units from the hidden state entering the block, before it runs.

    ``hidden [..., d]`` is the input of the block's first projection (the normed hidden state);
    the leading dims are the call's token rows. Return a bool keep-mask ``[..., N]`` / ``[..., H]``.
    :meth:`native` may describe the same choice for one token row to the C library.
    """

    def native(self, kind: str, layer: int) -> NativeChoice | None:
        """The one-token choice of ``kind`` (``"mlp"`` / ``"heads"``) units in ``layer`` for the C
        library, equal to ``choose_*`` on one row (ties aside); None: ask ``choose_*`` per call."""
        return None

    def choose_mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def choose_heads(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cost_params(self) -> int:
        """Parameters the chooser multiplies per token (predictor weights), for the accounting."""
        return 0


class StaticChooser(UnitChooser):
    """The same masks ``mlp [L, N]``, ``heads [L, H]`` at every token (tests, benchmarks)."""

    def __init__(self, masks: UnitMasks):
        self.masks = UnitMasks(masks.mlp.bool(), masks.heads.bool())

    def choose_mlp(self, layer, hidden):
        return self.masks.mlp[layer].expand(*hidden.shape[:-1], -1)

    def choose_heads(self, layer, hidden):
        return self.masks.heads[layer].expand(*hidden.shape[:-1], -1)

    def native(self, kind, layer):
        return NativeChoice(mask=(self.masks.mlp if kind == "mlp" else self.masks.heads)[layer])
