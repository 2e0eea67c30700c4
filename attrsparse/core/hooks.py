"""Forward pre-hooks on the unit projections: capture unit outputs and multiply them by masks.

One :class:`UnitHooks` object installs a pre-hook on every layer's MLP down-projection and
attention output projection (see :mod:`attrsparse.core.architectures`). Each hook can

* multiply its input by a per-layer multiplier (a 0/1 mask or an IG scale), broadcast to
  ``[B, q, N]`` for MLP units and ``[B, q, H]`` for heads (expanded over ``head_dim``), and
* record the (possibly multiplied) input *without detaching it*, so gradients can be taken.

Multiplying the input of the down-projection by a 0/1 vector is exactly zeroing the
corresponding weight columns; that is what the tests check.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .units import UnitMap, unit_map


def _per_layer(mult, layer: int) -> torch.Tensor | None:
    """Slice layer ``layer`` from a multiplier and shape it to ``[B|1, q|1, K]``.

    ``mult`` is None, a tensor ``[..., L, K]``, or a list of L entries, each None or a tensor
    already broadcastable to ``[B, q, K]`` (used when only a few layers are scaled).
    """
    if mult is None:
        return None
    if isinstance(mult, (list, tuple)):
        return mult[layer]
    m = mult[..., layer, :]
    if m.dim() == 1:  # static [N]
        return m.view(1, 1, -1)
    if m.dim() == 2:  # per row [B, N]
        return m.unsqueeze(1)
    return m  # per row and position [B, q, N]


class UnitHooks:
    """Pre-hooks on all unit projections of a model. Use as a context manager.

    Attributes set between forward calls:
        mlp_mult:  None, a tensor ``[L, N]``, ``[B, L, N]`` or ``[B, q, L, N]``, or a per-layer list
        head_mult: None, a tensor ``[L, H]``, ``[B, L, H]`` or ``[B, q, L, H]``, or a per-layer list
        capture:   when True, ``mlp_inputs[l]`` ``[B, q, N]`` and ``head_inputs[l]``
                   ``[B, q, H, D]`` hold the last forward's (multiplied) inputs.
        mlp_rule:  None or ``fn(layer, x [B, q, N]) -> keep [B, q, N] (bool)``, decided from the
                   live input inside the forward pass (online selectors such as TEAL);
        head_rule: None or ``fn(layer, o [B, q, H, D]) -> keep [B, q, H] (bool)``.
                   The masks a rule returned are kept in ``rule_mlp[l]`` / ``rule_heads[l]``.
    """

    def __init__(self, model: nn.Module, capture: bool = False):
        self.model = model
        self.units: UnitMap = unit_map(model)
        self.capture = capture
        self.mlp_mult: torch.Tensor | None = None
        self.head_mult: torch.Tensor | None = None
        self.mlp_rule = None
        self.head_rule = None
        self.rule_mlp: list[torch.Tensor | None] = [None] * self.units.num_layers
        self.rule_heads: list[torch.Tensor | None] = [None] * self.units.num_layers
        self.mlp_inputs: list[torch.Tensor | None] = [None] * self.units.num_layers
        self.head_inputs: list[torch.Tensor | None] = [None] * self.units.num_layers
        self._layer_shape: list[tuple[int, int] | None] = [None] * self.units.num_layers
        self._handles: list = []

    def layer_shape(self, layer: int) -> tuple[int, int] | None:
        """``(B, q)`` of the layer's current forward call (recorded by its pre-hook)."""
        return self._layer_shape[layer]

    # -- hook bodies -------------------------------------------------------------------------
    def _shape_hook(self, layer: int):
        """Remember the layer's [B, q] (OPT flattens the MLP input to [B*q, N])."""
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None:
                self._layer_shape[layer] = tuple(hidden.shape[:2])
        return hook

    def _mlp_hook(self, layer: int):
        def hook(module, args):
            x = flat = args[0]
            if x.dim() == 2 and self._layer_shape[layer] is not None:
                x = x.view(*self._layer_shape[layer], x.shape[-1])
            m = _per_layer(self.mlp_mult, layer)
            if m is not None:
                x = x * m.to(x.device, x.dtype)
            if self.mlp_rule is not None:
                keep = self.mlp_rule(layer, x)
                self.rule_mlp[layer] = keep
                x = x * keep.to(x.device, x.dtype)
            if self.capture:
                self.mlp_inputs[layer] = x
            return (x.reshape(flat.shape),) + tuple(args[1:])
        return hook

    def _head_hook(self, layer: int):
        heads, dim = self.units.num_heads, self.units.head_dim

        def hook(module, args):
            x = args[0]
            m = _per_layer(self.head_mult, layer)
            shaped = x.view(*x.shape[:-1], heads, dim)
            if m is not None:
                shaped = shaped * m.to(x.device, x.dtype).unsqueeze(-1)
            if self.head_rule is not None:
                keep = self.head_rule(layer, shaped)
                self.rule_heads[layer] = keep
                shaped = shaped * keep.to(x.device, x.dtype).unsqueeze(-1)
                m = keep
            if m is not None or self.capture:  # the captured view must be on the graph's path
                x = shaped.reshape(x.shape)
            if self.capture:
                self.head_inputs[layer] = shaped
            return (x,) + tuple(args[1:])
        return hook

    # -- installation ------------------------------------------------------------------------
    def install(self) -> "UnitHooks":
        for layer, block in enumerate(self.units.layer_modules):
            self._handles.append(block.register_forward_pre_hook(self._shape_hook(layer), with_kwargs=True))
        for layer, (down, out) in enumerate(zip(self.units.down_modules, self.units.out_modules)):
            self._handles.append(down.register_forward_pre_hook(self._mlp_hook(layer)))
            self._handles.append(out.register_forward_pre_hook(self._head_hook(layer)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.mlp_inputs = [None] * self.units.num_layers
        self.head_inputs = [None] * self.units.num_layers

    def __enter__(self) -> "UnitHooks":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def capture_units(model: nn.Module) -> Iterator[UnitHooks]:
    """Record every layer's unit outputs (autograd graph kept) during the block.

    Example::

        with capture_units(model) as cap:
            model(input_ids)
        cap.mlp_inputs[0]   # [B, S, N]
        cap.head_inputs[0]  # [B, S, H, D]
    """
    with UnitHooks(model, capture=True) as hooks:
        yield hooks
