"""The paper's units, their parameter costs, containers for per-unit tensors (scores, masks) and
honest activation-ratio accounting.

Units (as in the paper) are groups of channels of two sites (:mod:`.sites`):

* **MLP unit** ``i`` of layer ``l``: channel ``i`` of the ``mlp_out`` site (the input of the MLP
  down-projection, i.e. the post-activation intermediate, ``act(gate) * up`` for gated MLPs).
  Removing it removes row ``i`` of every input projection (gate/up or fc1) and column ``i`` of the
  down-projection.
* **Head unit** ``h`` of layer ``l``: the slice ``[h*D:(h+1)*D]`` of the ``attn_out`` site (the input
  of the attention output projection), one per *query* head. Removing it removes that head's query
  rows and output columns; a key/value head is removed only when every query head of its group is
  removed.

Shapes: ``mlp`` is ``[..., L, N]`` and ``heads`` is ``[..., L, H]``; the leading dims are usually
``T`` (one row per generated token), sometimes ``B, T`` (batched rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .architectures import find_arch, get_module, linear_dims
from .sites import site_map


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class UnitMap:
    """Units of one model and their parameter costs (all layers are alike).

    Shapes used throughout attrsparse: MLP tensors ``[..., L, N]``, head tensors ``[..., L, H]``
    with ``L = num_layers``, ``N = mlp_size``, ``H = num_heads``.
    """

    family: str
    model_type: str
    num_layers: int
    mlp_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_unit_params: int  # parameters removed with one MLP unit
    head_params: int  # query rows + output columns of one query head
    kv_group_params: int  # key + value rows of one key/value head
    attn_fixed_params: int  # per layer, always executed (output bias)
    mlp_fixed_params: int  # per layer, always executed (down-projection bias)
    embedding_params: int  # input embeddings + LM head (counted once if tied) + final norm etc.
    total_params: int
    layer_modules: list[nn.Module] = field(repr=False, default_factory=list)
    down_modules: list[nn.Module] = field(repr=False, default_factory=list)
    out_modules: list[nn.Module] = field(repr=False, default_factory=list)
    # first attention input projection (q_proj, c_attn, qkv_proj) / first MLP input projection
    # (gate_proj, fc1, c_fc, gate_up_proj) per layer: their input is the (normed) hidden state
    # entering the attention / MLP block, available before that block's work (predictors read it)
    attn_in_modules: list[nn.Module] = field(repr=False, default_factory=list)
    mlp_in_modules: list[nn.Module] = field(repr=False, default_factory=list)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def mlp_params_per_layer(self) -> int:
        return self.mlp_unit_params * self.mlp_size + self.mlp_fixed_params

    @property
    def attn_params_per_layer(self) -> int:
        return (self.head_params * self.num_heads + self.kv_group_params * self.num_kv_heads
                + self.attn_fixed_params)

    def attention_params(self, n_heads, n_groups):
        """Attention parameters of one layer running ``n_heads`` query heads in ``n_groups``
        key/value groups (ints or tensors, broadcast): the one accounting rule for heads."""
        return n_heads * self.head_params + n_groups * self.kv_group_params + self.attn_fixed_params

    def mlp_params(self, n_units):
        """MLP parameters of one layer running ``n_units`` units (ints or tensors)."""
        return n_units * self.mlp_unit_params + self.mlp_fixed_params

    @property
    def layer_params(self) -> int:
        """Attention and MLP parameters of one layer."""
        return self.attn_params_per_layer + self.mlp_params_per_layer

    @property
    def maskable_params(self) -> int:
        """Parameters of all attention and MLP blocks: the denominator of the activation ratio."""
        return self.num_layers * (self.mlp_params_per_layer + self.attn_params_per_layer)

    @property
    def attn_share(self) -> float:
        """Attention's share of the maskable parameters (the paper's 1/3 for Phi-2)."""
        return self.attn_params_per_layer / (self.attn_params_per_layer + self.mlp_params_per_layer)

    @property
    def mlp_share(self) -> float:
        return 1.0 - self.attn_share

    @classmethod
    def structure_fields(cls) -> list[str]:
        """The scalar fields (everything but module lists): what files record and check."""
        return [f.name for f in fields(cls) if not f.name.endswith("modules")]

    def structure(self) -> dict:
        """:meth:`structure_fields` and their values."""
        return {name: getattr(self, name) for name in self.structure_fields()}

    def summary(self) -> dict:
        """Plain-dict description (for ``attrsparse info`` and result files)."""
        other = self.total_params - self.maskable_params
        return {
            "family": self.family,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "mlp_units_per_layer": self.mlp_size,
            "heads_per_layer": self.num_heads,
            "kv_heads_per_layer": self.num_kv_heads,
            "head_dim": self.head_dim,
            "params_per_mlp_unit": self.mlp_unit_params,
            "params_per_head": self.head_params,
            "params_per_kv_head": self.kv_group_params,
            "attention_params": self.num_layers * self.attn_params_per_layer,
            "mlp_params": self.num_layers * self.mlp_params_per_layer,
            "other_params": other,
            "total_params": self.total_params,
            "share_attention": self.num_layers * self.attn_params_per_layer / self.total_params,
            "share_mlp": self.num_layers * self.mlp_params_per_layer / self.total_params,
            "share_other": other / self.total_params,
            "attention_share_of_maskable": self.attn_share,
        }


def unit_map(model: nn.Module) -> UnitMap:
    """Describe the units of a stock Hugging Face causal LM (see module docstring)."""
    cached = getattr(model, "_attrsparse_unit_map", None)
    if cached is not None:
        return cached
    config = model.config
    spec = find_arch(getattr(config, "model_type", "unknown"))
    layers = list(get_module(model, spec.layers))
    sites = site_map(model)
    first = layers[0]
    down = get_module(first, spec.mlp_down)
    out = get_module(first, spec.attn_out)
    n_in, _, down_bias = linear_dims(down)  # columns of down = MLP units
    hidden_out = linear_dims(down)[1]
    num_heads = int(config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    o_in, o_out, o_bias = linear_dims(out)
    head_dim = o_in // num_heads

    mlp_unit = hidden_out  # one column of the down-projection
    for path in spec.mlp_in:
        in_f, out_f, bias = linear_dims(get_module(first, path))
        rows_per_unit = out_f // n_in
        mlp_unit += rows_per_unit * (in_f + int(bias))

    qkv_params = sum(_num_params(get_module(first, p)) for p in spec.attn_qkv)
    q_share = num_heads / (num_heads + 2 * num_kv)
    q_params = round(qkv_params * q_share)
    head_params = q_params // num_heads + head_dim * o_out
    kv_group = (qkv_params - q_params) // num_kv

    total = sum(p.numel() for p in model.parameters())
    maskable_layer = (mlp_unit * n_in + (hidden_out if down_bias else 0)
                      + head_params * num_heads + kv_group * num_kv + (o_out if o_bias else 0))
    umap = UnitMap(
        family=spec.family, model_type=config.model_type, num_layers=len(layers), mlp_size=n_in,
        num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim,
        mlp_unit_params=mlp_unit, head_params=head_params, kv_group_params=kv_group,
        attn_fixed_params=o_out if o_bias else 0, mlp_fixed_params=hidden_out if down_bias else 0,
        embedding_params=total - len(layers) * maskable_layer, total_params=total,
        layer_modules=layers,
        down_modules=[s.modules[0] for s in sites.sites("mlp_out")],
        out_modules=[s.modules[0] for s in sites.sites("attn_out")],
        attn_in_modules=[s.modules[0] for s in sites.sites("attn_in")],
        mlp_in_modules=[s.modules[0] for s in sites.sites("mlp_in")],
    )
    model._attrsparse_unit_map = umap
    return umap


@dataclass
class UnitScores:
    """Importance of every unit: higher = keep. ``mlp [T, L, N]``, ``heads [T, L, H]``."""

    mlp: torch.Tensor
    heads: torch.Tensor

    def map(self, fn) -> "UnitScores":
        return UnitScores(fn(self.mlp), fn(self.heads))


@dataclass
class UnitMasks:
    """Boolean keep-masks. ``mlp [..., L, N]``, ``heads [..., L, H]``; True = unit is computed.

    ``[L, *]`` is a static mask (every position), ``[T, L, *]`` a per-token schedule (row t is used
    for generated token t), ``[B, T, L, *]`` a batched schedule (one schedule per batch row).
    """

    mlp: torch.Tensor
    heads: torch.Tensor

    @classmethod
    def dense(cls, units: UnitMap, *leading: int, device: torch.device | str = "cpu") -> "UnitMasks":
        """All-True masks ``[*leading, L, *]`` on ``device``."""
        return cls(torch.ones(*leading, units.num_layers, units.mlp_size, dtype=torch.bool, device=device),
                   torch.ones(*leading, units.num_layers, units.num_heads, dtype=torch.bool, device=device))

    def __getitem__(self, index) -> "UnitMasks":
        return UnitMasks(self.mlp[index], self.heads[index])

    @staticmethod
    def stack(masks: list["UnitMasks"], dim: int = 0) -> "UnitMasks":
        return UnitMasks(torch.stack([m.mlp for m in masks], dim),
                         torch.stack([m.heads for m in masks], dim))


@dataclass
class ExecutedRatio:
    """Activation ratio that was really executed, accumulated over token rows.

    ``param`` weighs attention and MLP by their real parameter counts: kept MLP units times the
    parameters of one unit, kept query heads times (query rows + output columns), key/value heads
    that at least one kept query head still needs times (key + value rows), plus the always-run
    biases; divided by all attention and MLP parameters. Embeddings and the LM head are outside
    the ratio (as in the paper) and reported separately by :meth:`UnitMap.summary`.
    """

    tokens: int = 0
    sum_param: float = 0.0
    sum_mlp: float = 0.0
    sum_heads: float = 0.0
    sum_kv: float = 0.0
    per_layer_param: list = field(default_factory=list)  # sums per layer

    def _mean(self, total: float) -> float:
        return total / self.tokens if self.tokens else float("nan")

    param = property(lambda self: self._mean(self.sum_param), doc="parameter-weighted executed ratio")
    mlp = property(lambda self: self._mean(self.sum_mlp), doc="executed fraction of MLP units")
    heads = property(lambda self: self._mean(self.sum_heads), doc="executed fraction of query heads")
    kv_heads = property(lambda self: self._mean(self.sum_kv), doc="executed fraction of key/value heads")

    def add(self, other: "ExecutedRatio") -> "ExecutedRatio":
        layers = [a + b for a, b in zip(self.per_layer_param, other.per_layer_param)] \
            if self.per_layer_param else list(other.per_layer_param)
        return ExecutedRatio(self.tokens + other.tokens, self.sum_param + other.sum_param,
                             self.sum_mlp + other.sum_mlp, self.sum_heads + other.sum_heads,
                             self.sum_kv + other.sum_kv, layers)

    def as_dict(self) -> dict:
        """The ratios; None (JSON null, not NaN) when no unit masks were executed, e.g. under an
        input-channel rule, whose accounting is the read ratio."""
        if not self.tokens:
            return {"executed_ratio": None, "executed_ratio_mlp": None, "executed_ratio_heads": None,
                    "executed_ratio_kv_heads": None, "executed_tokens": 0}
        return {"executed_ratio": self.param, "executed_ratio_mlp": self.mlp,
                "executed_ratio_heads": self.heads, "executed_ratio_kv_heads": self.kv_heads,
                "executed_tokens": self.tokens}


def layer_param_fractions(mlp: torch.Tensor, heads: torch.Tensor, units: UnitMap) -> torch.Tensor:
    """Executed parameter fraction per row and layer: ``[..., L]`` from masks ``[..., L, *]``."""
    mlp, heads = mlp.to(torch.float64), heads.to(torch.float64)
    kept_mlp = mlp.sum(-1)
    kept_heads = heads.sum(-1)
    groups = heads.reshape(*heads.shape[:-1], units.num_kv_heads, units.group_size)
    kept_kv = groups.amax(-1).sum(-1)
    return (units.mlp_params(kept_mlp) + units.attention_params(kept_heads, kept_kv)) / units.layer_params


def executed_ratio(masks: UnitMasks, units: UnitMap) -> ExecutedRatio:
    """Account masks ``[..., L, *]``: every leading index is one executed token row."""
    mlp, heads = masks.mlp, masks.heads
    if mlp.dim() == 2:
        mlp, heads = mlp.unsqueeze(0), heads.unsqueeze(0)
    mlp = mlp.reshape(-1, *mlp.shape[-2:])
    heads = heads.reshape(-1, *heads.shape[-2:])
    layer_frac = layer_param_fractions(mlp, heads, units)  # [R, L]
    groups = heads.to(torch.float64).reshape(heads.shape[0], units.num_layers,
                                             units.num_kv_heads, units.group_size).amax(-1)
    rows = mlp.shape[0]
    return ExecutedRatio(
        tokens=rows,
        sum_param=float(layer_frac.mean(-1).sum()),
        sum_mlp=float(mlp.to(torch.float64).mean((-1, -2)).sum()),
        sum_heads=float(heads.to(torch.float64).mean((-1, -2)).sum()),
        sum_kv=float(groups.mean((-1, -2)).sum()),
        per_layer_param=layer_frac.sum(0).tolist(),
    )


def _zero_input_columns_(module: nn.Module, columns) -> None:
    """Zero input columns ``columns`` of an ``nn.Linear`` (``weight[:, c]``) or GPT-2 ``Conv1D``
    (``weight[c, :]``) in place."""
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            module.weight[:, columns] = 0
        else:
            module.weight[columns, :] = 0


def zero_mlp_unit_(model: nn.Module, layer: int, unit: int) -> None:
    """Zero column ``unit`` of layer ``layer``'s down-projection in place (for tests/exports)."""
    _zero_input_columns_(unit_map(model).down_modules[layer], unit)


def zero_head_(model: nn.Module, layer: int, head: int) -> None:
    """Zero head ``head``'s input slice of layer ``layer``'s output projection in place."""
    umap = unit_map(model)
    _zero_input_columns_(umap.out_modules[layer], slice(head * umap.head_dim, (head + 1) * umap.head_dim))
