"""Sites: one concept for where sparsity happens.

A *site* is the input vector of one or more linear layers that read it (its *consumers*), and the
groups of its channels that may be skipped. Skipping input channel ``j`` of a site means column
``j`` of every consumer's weight is never read. Every decoder layer has four sites:

============  ==========================================  ====================================
site          consumers                                   input
============  ==========================================  ====================================
``attn_in``   q, k, v projections (or a fused qkv)        the normed hidden state (shared)
``attn_out``  the attention output projection             the concatenated head outputs
``mlp_in``    gate and up projections (or fc1, gate_up)   the normed hidden state (shared)
``mlp_out``   the down-projection (fc2)                   the MLP intermediate
============  ==========================================  ====================================

and the model has one more, ``lm_head`` (the final hidden state read by the output projection).
Shared inputs are decided once: q/k/v read one ``attn_in`` decision, gate/up one ``mlp_in``.

The paper's units are groups of channels of two sites, with the rows of other projections that
become dead with them (:class:`attrsparse.core.units.UnitMap`): an MLP neuron is channel ``i`` of
``mlp_out`` (with row ``i`` of gate/up), a head is the ``head_dim`` channels of ``attn_out`` it
writes (with its query rows; its key/value rows once every query head of its group is off).

The parameters a site reads per kept channel are :attr:`Site.params_per_channel`; the read ratio of
channel sparsity (weights read ÷ dense weights over the decoder linears, the field's convention) is
counted from kept channels per site (:meth:`SiteMap.read_params`). Only the architecture table
(:mod:`.architectures`) knows module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import find_arch, get_module, linear_dims

SITE_NAMES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass
class Site:
    """One input vector of a decoder layer (or of the LM head) and the linears that read it."""

    name: str
    layer: int | None  # None for the LM head
    modules: list[nn.Module] = field(repr=False)
    in_features: int = 0
    out_features: tuple[int, ...] = ()  # per consumer
    bias_params: int = 0  # read whatever is kept

    @property
    def params_per_channel(self) -> int:
        """Weights read per kept input channel (one column of every consumer)."""
        return sum(self.out_features)

    @property
    def weight_params(self) -> int:
        """Weights of every consumer: the site's cost when dense."""
        return self.in_features * self.params_per_channel


def _site(name: str, layer: int | None, modules: list[nn.Module]) -> Site:
    dims = [linear_dims(m) for m in modules]
    if len({d[0] for d in dims}) != 1:
        raise ValueError(f"the consumers of site {name} read inputs of different widths: {dims}")
    bias = sum(out_f for _, out_f, has_bias in dims if has_bias)
    return Site(name, layer, list(modules), dims[0][0], tuple(d[1] for d in dims), bias)


@dataclass
class SiteMap:
    """The sites of one model: ``layers[l][name]`` and ``lm_head`` (None when absent)."""

    layers: list[dict[str, Site]]
    lm_head: Site | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def sites(self, name: str) -> list[Site]:
        """Site ``name`` of every layer."""
        return [layer[name] for layer in self.layers]

    @property
    def decoder_params(self) -> int:
        """Weights of every decoder-layer linear: the denominator of the read ratio."""
        return sum(s.weight_params for layer in self.layers for s in layer.values())

    @property
    def head_params(self) -> int:
        """Weights of the LM head (0 when the model has none)."""
        return 0 if self.lm_head is None else self.lm_head.weight_params

    def read_params(self, kept: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder-linear weights read, from ``kept[name]`` = kept channels ``[..., L]`` per site
        (a site missing from ``kept`` is read in full)."""
        total = None
        for name in SITE_NAMES:
            sites = self.sites(name)
            per_channel = torch.tensor([s.params_per_channel for s in sites], dtype=torch.float64)
            if name in kept:
                part = (kept[name].to(torch.float64) * per_channel.to(kept[name].device)).sum(-1)
            else:
                part = torch.tensor(float(sum(s.weight_params for s in sites)), dtype=torch.float64)
            total = part if total is None else total + part
        return total


def site_map(model: nn.Module) -> SiteMap:
    """The sites of a stock Hugging Face causal LM (cached on the model)."""
    cached = getattr(model, "_attrsparse_site_map", None)
    if cached is not None:
        return cached
    spec = find_arch(getattr(model.config, "model_type", "unknown"))
    layers = []
    for l, block in enumerate(get_module(model, spec.layers)):
        paths = {"attn_in": spec.attn_qkv, "attn_out": (spec.attn_out,), "mlp_in": spec.mlp_in,
                 "mlp_out": (spec.mlp_down,)}
        layers.append({name: _site(name, l, [get_module(block, p) for p in ps]) for name, ps in paths.items()})
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    smap = SiteMap(layers, None if head is None else _site("lm_head", None, [head]))
    model._attrsparse_site_map = smap
    return smap
