"""Which modules hold the units of each supported architecture, and what each unit costs.

Units (as in the paper):

* **MLP unit** ``i`` of layer ``l``: channel ``i`` of the input of the MLP down-projection, i.e. the
  post-activation intermediate (``act(gate) * up`` for gated MLPs). Removing it removes row ``i`` of
  every input projection (gate/up or fc1) and column ``i`` of the down-projection.
* **Head unit** ``h`` of layer ``l``: the slice ``[h*D:(h+1)*D]`` of the input of the attention
  output projection, one per *query* head. Removing it removes that head's query rows and output
  columns; a key/value head is removed only when every query head of its group is removed.

Supporting a new architecture is one :class:`ArchSpec` line in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths and structural facts of one architecture family (paths relative to a decoder
    layer). The only place attrsparse knows module names and config keys."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # path from the CausalLM to the list of decoder layers
    mlp_in: tuple[str, ...]  # projections whose output rows are MLP units (gate, up / fc1)
    mlp_down: str  # projection whose input columns are MLP units
    attn_qkv: tuple[str, ...]  # q, k, v projections, or one fused qkv projection
    attn_out: str  # projection whose input is the concatenated head outputs
    examples: str = ""
    mlp_act: str = ""  # the MLP's activation module (gated: its output is act(gate x), before "* up x")
    mlp_gated: bool = False  # act(gate x) * up x; else act(fc1 x)
    mlp_module: str = "mlp"  # the module holding the whole MLP ("" when inlined in the layer, OPT)
    mlp_size_key: str = "intermediate_size"  # config key of the MLP width
    heads_sliceable: bool = True  # False where head size = hidden / heads (GPT-2, OPT): no head export


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "mobillama"), "model.layers",
             ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
             "SmolLM2, TinyLlama, MobiLlama-style", mlp_act="mlp.act_fn", mlp_gated=True),
    ArchSpec("qwen2", ("qwen2", "qwen3"), "model.layers",
             ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
             "Qwen2/2.5, Qwen3", mlp_act="mlp.act_fn", mlp_gated=True),
    ArchSpec("gemma", ("gemma", "gemma2", "gemma3_text", "gemma3"), "model.layers",
             ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
             "Gemma, Gemma 2, Gemma 3 (text)", mlp_act="mlp.act_fn", mlp_gated=True),
    ArchSpec("phi", ("phi",), "model.layers",
             ("mlp.fc1",), "mlp.fc2",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.dense",
             "phi-1.5, phi-2", mlp_act="mlp.activation_fn"),
    ArchSpec("phi3", ("phi3",), "model.layers",
             ("mlp.gate_up_proj",), "mlp.down_proj",
             ("self_attn.qkv_proj",), "self_attn.o_proj", "Phi-3", mlp_act="mlp.activation_fn", mlp_gated=True),
    ArchSpec("gpt2", ("gpt2",), "transformer.h",
             ("mlp.c_fc",), "mlp.c_proj", ("attn.c_attn",), "attn.c_proj", "GPT-2 (Conv1D)",
             mlp_act="mlp.act", mlp_size_key="n_inner", heads_sliceable=False),
    ArchSpec("opt", ("opt",), "model.decoder.layers",
             ("fc1",), "fc2",
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj",
             "OPT", mlp_act="activation_fn", mlp_module="", mlp_size_key="ffn_dim", heads_sliceable=False),
)


def supported_model_types() -> list[str]:
    return sorted({t for spec in ARCHITECTURES for t in spec.model_types})


def find_arch(model_type: str) -> ArchSpec:
    """Return the :class:`ArchSpec` for a ``config.model_type`` or raise a clear error."""
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise UnsupportedArchitectureError(
        f"unsupported architecture '{model_type}'; supported: {', '.join(supported_model_types())}"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter: where its inputs and masks must live."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        out_f, in_f = weight.shape
    else:  # transformers.pytorch_utils.Conv1D stores weight as [in, out]
        in_f, out_f = weight.shape
    return int(in_f), int(out_f), getattr(module, "bias", None) is not None


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
    layers = list(_get(model, spec.layers))
    first = layers[0]
    down = _get(first, spec.mlp_down)
    out = _get(first, spec.attn_out)
    n_in, _, down_bias = linear_dims(down)  # columns of down = MLP units
    hidden_out = linear_dims(down)[1]
    num_heads = int(config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head)
    num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
    o_in, o_out, o_bias = linear_dims(out)
    head_dim = o_in // num_heads

    mlp_unit = hidden_out  # one column of the down-projection
    for path in spec.mlp_in:
        in_f, out_f, bias = linear_dims(_get(first, path))
        rows_per_unit = out_f // n_in
        mlp_unit += rows_per_unit * (in_f + int(bias))

    qkv_params = sum(_num_params(_get(first, p)) for p in spec.attn_qkv)
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
        down_modules=[_get(layer, spec.mlp_down) for layer in layers],
        out_modules=[_get(layer, spec.attn_out) for layer in layers],
        attn_in_modules=[_get(layer, spec.attn_qkv[0]) for layer in layers],
        mlp_in_modules=[_get(layer, spec.mlp_in[0]) for layer in layers],
    )
    model._attrsparse_unit_map = umap
    return umap


def zero_mlp_unit_(model: nn.Module, layer: int, unit: int) -> None:
    """Zero column ``unit`` of layer ``layer``'s down-projection in place (for tests/exports)."""
    down = unit_map(model).down_modules[layer]
    with torch.no_grad():
        if isinstance(down, nn.Linear):
            down.weight[:, unit] = 0
        else:
            down.weight[unit, :] = 0


def zero_head_(model: nn.Module, layer: int, head: int) -> None:
    """Zero head ``head``'s input slice of layer ``layer``'s output projection in place."""
    umap = unit_map(model)
    out = umap.out_modules[layer]
    sl = slice(head * umap.head_dim, (head + 1) * umap.head_dim)
    with torch.no_grad():
        if isinstance(out, nn.Linear):
            out.weight[:, sl] = 0
        else:
            out.weight[sl, :] = 0
