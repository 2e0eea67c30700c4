"""Gathered unit projections: drop-in replacements for one decoder layer's unit projections.

Clean module swaps (the original module is kept, and restored by
:class:`attrsparse.deploy.runtime.SparseRuntime`):

* :class:`GatheredMLP` replaces a layer's MLP module;
* :class:`GatheredIn` replaces the query (or fused qkv) projection, and OPT's ``fc1``;
* :class:`GatheredOut` replaces the attention output projection, and OPT's ``fc2``.

One token row with the C backend: each group (the layer's heads, its MLP units) has a
:class:`~attrsparse.deploy.kernels.OneTokenPlan` prepared once by the runtime, and one C call
chooses the units (a native predictor, or the keep-mask already in the plan's buffer) and runs the
gathered projections: the MLP in one call, the kept heads' query rows in one and their
output-projection columns in another. Several rows, or the torch backend: a per-layer
:class:`LayerChoice` carries the keep-mask from the block's first projection (which asks the
runtime's unit chooser) to its output projection (which clears it), and the union of the rows'
units is gathered. When a call keeps more than the runtime's break-even, it runs dense and
multiplies the output projection's input by the mask instead (the same result). Every path equals
masked dense computation (tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def _row_major(module: nn.Module) -> torch.Tensor:
    """Weight as ``[out, in]`` row-major (nn.Linear as is; GPT-2 Conv1D transposed, copied)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().contiguous()
    return module.weight.detach().t().contiguous()


def _col_major(module: nn.Module) -> torch.Tensor:
    """Weight as ``[in, out]`` row-major, so input columns are rows (Linear transposed, copied)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().t().contiguous()
    return module.weight.detach().contiguous()


def _float_bias(module: nn.Module, sl: slice | None = None) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if bias is None:
        return None
    bias = bias.detach().float()
    return (bias if sl is None else bias[sl]).contiguous()


@dataclass
class LayerChoice:
    """Keep-set of one layer's current forward call, shared by its gathered projections.

    ``keep [rows, K]`` (bool, rows = token rows of the call); for the generic path ``idx [k]``,
    the units computed (union over rows) and ``features`` (their head rows/columns); ``dense``:
    the call runs dense and masks the output projection's input; ``fast``: the one-token plan
    chose and computed the query rows, so the output projection uses the plan too.
    """

    keep: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    dense: bool = False
    features: torch.Tensor | None = None
    fast: bool = False

    def clear(self) -> None:
        self.keep = self.idx = self.features = None
        self.dense = self.fast = False


@dataclass
class Block:
    """A range of an input projection's output features: ``gathered`` by unit or computed fully."""

    start: int
    size: int
    gathered: bool


@dataclass
class UnitGroup:
    """One kind of unit of one layer (MLP units or heads) and its gathered projections."""

    kind: str  # "mlp" or "heads"
    layer: int
    count: int  # K: units per layer
    width: int  # output features per unit (1 for MLP units, head_dim for heads)
    choice: LayerChoice = field(default_factory=LayerChoice)
    plan: object = None  # OneTokenPlan of one-token calls (C backend), set by the runtime
    native: bool = False  # the plan chooses (or holds fixed units): no Python chooser call
    keep_row: torch.Tensor | None = None  # [1, K] view of the plan's keep-mask

    def feature_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Unit indices ``[k]`` -> feature indices ``[k * width]`` (head rows/columns)."""
        if self.width == 1:
            return idx
        return (idx.unsqueeze(-1) * self.width + torch.arange(self.width)).reshape(-1)


def _flat32(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when contiguous fp32, else a contiguous fp32 copy (the plans read its data)."""
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def _shaped(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A one-token fp32 output ``[F]`` in ``x``'s leading shape and dtype: ``[..., F]``."""
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    return out.view_as(x) if out.numel() == x.numel() else out.view(*x.shape[:-1], -1)


class GatheredIn(nn.Module):
    """Replaces an input projection (query or fused qkv projection; OPT's fc1).

    Gathered call: query projections return the full width with zeros in the rows of dropped
    heads (the attention code expects every head); MLP projections return the compact outputs of
    the kept units (``[..., k * blocks]``). Dense call: the original projection.
    """

    def __init__(self, original: nn.Module, group: UnitGroup, blocks: list[Block], runtime):
        super().__init__()
        self.original = original
        self.group, self.blocks, self.runtime = group, blocks, runtime
        self.weight_rm = _row_major(original)
        bias = getattr(original, "bias", None)
        self.bias_rm = None if bias is None else bias.detach()
        self.q_bias = _float_bias(original, slice(0, group.count * group.width))

    def _rest(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the blocks that are always computed (keys/values of a fused projection)."""
        out = []
        for block in self.blocks:
            if not block.gathered:
                sl = slice(block.start, block.start + block.size)
                out.append(F.linear(flat, self.weight_rm[sl], None if self.bias_rm is None else self.bias_rm[sl]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, choice, runtime = self.group, self.group.choice, self.runtime
        plan = group.plan
        if plan is not None and group.kind == "heads" and x.numel() == plan.D:
            return self._one_token(x, plan)
        if choice.keep is None:  # the layer's first input projection of this call chooses
            runtime.choose(group, x)
        lead = x.shape[:-1]
        if choice.idx is None and not choice.dense:
            runtime.resolve(group)
        if choice.dense:
            return self.original(x)
        flat = x.reshape(-1, x.shape[-1])
        features = choice.features
        parts = []
        for block in self.blocks:
            if block.gathered:
                rows = features + block.start if block.start else features
                out = runtime.backend.rows(self.weight_rm, rows, flat)
                if self.bias_rm is not None:
                    out = out + self.bias_rm[rows].float()
                if group.kind == "heads":  # scatter back to the full width
                    full = torch.zeros(flat.shape[0], block.size, dtype=out.dtype)
                    full[:, features] = out
                    out = full
                parts.append(out)
            else:
                parts.extend(p.float() for p in self._rest(flat))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out.to(x.dtype).reshape(*lead, out.shape[-1])

    def _one_token(self, x: torch.Tensor, plan) -> torch.Tensor:
        """One token row: the plan chooses the heads (or reads the chooser's mask) and computes
        their query rows in one C call."""
        group, choice, runtime = self.group, self.group.choice, self.runtime
        runtime.choose_one(group, x)
        kept, q = plan.head_rows(_flat32(x))
        if kept < 0:
            choice.keep, choice.dense = group.keep_row, True
            runtime.count(group, group.count)
            return self.original(x)
        choice.fast = True
        runtime.count(group, kept)
        if len(self.blocks) == 1:
            return _shaped(q, x)
        q = q.view(1, -1) if x.dtype == torch.float32 else q.to(x.dtype).view(1, -1)
        return torch.cat([q] + self._rest(x.reshape(1, -1)), dim=-1).view(*x.shape[:-1], -1)


class GatheredOut(nn.Module):
    """Replaces an output projection (o_proj / dense / out_proj / c_proj; OPT's fc2).

    Gathered call: ``Wt[kept features]`` times the kept inputs (the kept head slices of the full
    input; compact inputs for MLP units); rows that did not choose a unit of the union are masked.
    Dense call: the original projection of the masked input.
    """

    def __init__(self, original: nn.Module, group: UnitGroup, runtime):
        super().__init__()
        self.original = original
        self.group, self.runtime = group, runtime
        self.weight_cm = _col_major(original)
        self.bias = _float_bias(original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, choice, runtime = self.group, self.group.choice, self.runtime
        keep = choice.keep  # [rows, K]
        lead = x.shape[:-1]
        if choice.dense:
            mask = keep.repeat_interleave(group.width, dim=-1) if group.width > 1 else keep
            out = self.original(x * mask.reshape(*lead, -1).to(x.dtype))
        elif choice.fast:  # the one-token plan chose in GatheredIn
            out = _shaped(group.plan.head_cols(_flat32(x)), x)
        else:
            flat = x.reshape(-1, x.shape[-1])
            features = choice.features
            a = flat if group.kind == "mlp" else flat[:, features]
            if keep.shape[0] > 1:  # the union holds units some rows did not choose
                sub = keep[:, choice.idx]
                a = a * (sub.repeat_interleave(group.width, dim=-1) if group.width > 1 else sub).to(a.dtype)
            out = runtime.backend.cols(self.weight_cm, features, a)
            if self.bias is not None:
                out = out + self.bias
            out = out.to(x.dtype).reshape(*lead, -1)
        choice.clear()
        return out


# activations the C kernel computes itself (checked against the model's module at install)
_ACT_CODES = {"SiLU": 0, "SiLUActivation": 0, "PytorchGELUTanh": 1, "GELUTanh": 1, "NewGELUActivation": 1,
              "FastGELUActivation": 1, "GELUActivation": 2, "GELU": 2, "ReLU": 3}
_ACT_REFERENCE = (F.silu, lambda v: F.gelu(v, approximate="tanh"), F.gelu, F.relu)


def activation_code(module: nn.Module) -> int | None:
    """The C kernel's code for an activation module, or None (verified on a probe tensor)."""
    code = _ACT_CODES.get(type(module).__name__)
    if code is None:
        return None
    probe = torch.linspace(-6, 6, 97)
    return code if torch.allclose(module(probe), _ACT_REFERENCE[code](probe), atol=1e-6) else None


class GatheredMLP(nn.Module):
    """Replaces a layer's MLP module (gated: gate/up/down or fused gate_up; plain: fc1/fc2).

    One token, C backend: one call of the group's plan (the choice, kept rows of the input
    projections, the activation, kept columns of the down-projection). Several token rows: the
    union of their units, gathered, each row masked. Dense calls: the original projections with
    the down-projection's input masked.
    """

    def __init__(self, original: nn.Module, group: UnitGroup, runtime, ins: list[nn.Module],
                 down: nn.Module, act: nn.Module, gated: bool):
        super().__init__()
        self.original, self.group, self.runtime = original, group, runtime
        self.ins, self.down, self.act, self.gated = ins, down, act, gated
        n = group.count
        rm = [_row_major(m) for m in ins]
        biases = [_float_bias(m) for m in ins]
        if gated and len(rm) == 1:  # fused [gate | up] rows (Phi-3)
            rm = [rm[0][:n], rm[0][n:]]
            biases = [None, None] if biases[0] is None else [biases[0][:n], biases[0][n:]]
        self.w_gate, self.w_up = rm[0], (rm[1] if gated else None)
        self.b_gate, self.b_up = biases[0], (biases[1] if gated else None)
        self.wt_down = _col_major(down)
        self.b_down = _float_bias(down)
        self.code = activation_code(act)  # None: no one-token plan (the C kernel lacks it)

    def _dense(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.gated and len(self.ins) == 1:
            gate, up = self.ins[0](x).chunk(2, dim=-1)
            h = self.act(gate) * up
        elif self.gated:
            h = self.act(self.ins[0](x)) * self.ins[1](x)
        else:
            h = self.act(self.ins[0](x))
        return self.down(h * keep.reshape(*x.shape[:-1], -1).to(h.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, choice, runtime = self.group, self.group.choice, self.runtime
        plan = group.plan
        if plan is not None and x.numel() == plan.D:  # one token: choose + MLP in one C call
            runtime.choose_one(group, x)
            k, out = plan.mlp(_flat32(x))
            if k >= 0:
                runtime.count(group, k)
                return _shaped(out, x)
            runtime.count(group, group.count)
            return self._dense(x, group.keep_row)
        runtime.choose(group, x)
        keep = choice.keep
        runtime.resolve(group)
        out = self._dense(x, keep) if choice.dense else self._gathered(x, keep, choice.idx)
        choice.clear()
        return out

    def _gathered(self, x: torch.Tensor, keep: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        backend = self.runtime.backend
        flat = x.reshape(-1, x.shape[-1])
        g = backend.rows(self.w_gate, idx, flat)
        if self.b_gate is not None:
            g = g + self.b_gate[idx]
        h = self.act(g.to(x.dtype)).float()
        if self.gated:
            u = backend.rows(self.w_up, idx, flat)
            h = h * (u + self.b_up[idx] if self.b_up is not None else u)
        if keep.shape[0] > 1:
            h = h * keep[:, idx].to(h.dtype)
        out = backend.cols(self.wt_down, idx, h)
        if self.b_down is not None:
            out = out + self.b_down
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


