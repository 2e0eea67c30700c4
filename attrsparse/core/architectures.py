"""The architecture table: which modules of each supported family hold what.

Supporting a new architecture is one :class:`ArchSpec` line in :data:`ARCHITECTURES`; nothing else
in attrsparse knows module names or family-specific config keys. Where sparsity happens is derived
from it in :mod:`.sites` (the inputs of the linears) and :mod:`.units` (the paper's units).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` of ``root``."""
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
