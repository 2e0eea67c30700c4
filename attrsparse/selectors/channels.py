"""Input-channel rules: which input channels of every decoder-layer linear a token skips.

A rule keeps channel ``j`` of a site's input ``x`` for consumer ``c`` (a linear reading that input)
when ``score_j = |x_j - center_j| * scale_j > threshold_c``; a dropped channel is replaced by its
``fill`` value (0 unless the rule compensates; see :mod:`attrsparse.core.channel_hooks`), so the
consumer reads ``W[:, j]`` only for kept channels. All of a rule's numbers live in one
:class:`SiteRule` per (layer, site), calibrated offline (:mod:`.channel_calibration`):

============  =============================================  ==========================================
rule          score and calibration                          site rules
============  =============================================  ==========================================
``teal``      ``|x_j|``                                      per-consumer thresholds; TEAL's block-wise
                                                             greedy allocation of per-projection sparsity
``wina``      ``|x_j| * ||W_c[:, j]||_2``                    as TEAL (its code reuses TEAL's)
``cats``      ``|act(gate x)_i|`` decides MLP unit ``i``     ``mlp_out`` only: gate read in full, the kept
                                                             units' up rows and down columns
``r_sparse``  ``|x_j|``, dropped part through a rank-``r``   uniform sparsity; the low-rank factors'
              SVD of ``W`` (``adds_output``)                 weights count as read
``scap``      ``|x_j - mode_j|``, mode folded into a bias    uniform sparsity per site
``attr_channel``  ``|x_j| * g_cj / sqrt(p_c)``: ``g_cj``     one threshold over every projection of
              ``= sqrt(E[x_j^2 g_j^2] / E[x_j^2])``, ``g``   every layer (score^2: a first-order
              the gradient through projection ``c``,         estimate of the loss per weight saved);
              ``p_c`` its outputs (options:                  each projection decides on its own
              ``channel_calibration.ATTR``)
============  =============================================  ==========================================

The weights a token reads are counted by the rule itself (:meth:`ChannelRuleSet.transform`), so
CATS's up rows and R-Sparse's low-rank path are in the read ratio.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.architectures import find_arch
from ..core.channel_hooks import ChannelRule
from ..core.sites import SiteMap, site_map
from ..core.units import unit_map

CHANNEL_RULES = ("teal", "wina", "cats", "r_sparse", "scap", "attr_channel")


@dataclass
class SiteRule:
    """One site's rule: ``thresholds [C]`` (one per consumer), ``scale`` ``[in]`` or ``[C, in]``,
    ``center`` / ``fill`` ``[in]`` (None: 0), ``lowrank``: per consumer ``(U [out, r], V [r, in])`` of
    the dropped part, ``gate``: CATS (decide ``mlp_out`` from ``|act(gate x)|``)."""

    thresholds: torch.Tensor
    scale: torch.Tensor | None = None
    center: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    lowrank: list | None = None
    gate: bool = False

    def score(self, x: torch.Tensor, consumer: int) -> torch.Tensor:
        s = x.detach().float()
        if self.center is not None:
            s = s - self.center.to(s.device)
        s = s.abs()
        if self.scale is not None:
            scale = self.scale if self.scale.dim() == 1 else self.scale[consumer]
            s = s * scale.to(s.device)
        return s

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file (keys under ``prefix``)."""
        out = {f"{prefix}.thresholds": self.thresholds.float()}
        for name in ("scale", "center", "fill"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}.{name}"] = value.float()
        for c, (u, v) in enumerate(self.lowrank or []):
            out[f"{prefix}.lowrank{c}.u"], out[f"{prefix}.lowrank{c}.v"] = u.float(), v.float()
        if self.gate:
            out[f"{prefix}.gate"] = torch.ones(1)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "SiteRule":
        lowrank, c = [], 0
        while f"{prefix}.lowrank{c}.u" in tensors:
            lowrank.append((tensors[f"{prefix}.lowrank{c}.u"], tensors[f"{prefix}.lowrank{c}.v"]))
            c += 1
        return cls(tensors[f"{prefix}.thresholds"], tensors.get(f"{prefix}.scale"), tensors.get(f"{prefix}.center"),
                   tensors.get(f"{prefix}.fill"), lowrank or None, f"{prefix}.gate" in tensors)


def site_key(layer: int, site: str) -> str:
    return f"L{layer:03d}.{site}"


@dataclass
class ChannelRuleSet(ChannelRule):
    """A calibrated rule on the sites of one model (``sites``: ``site_key -> SiteRule``; a missing
    site is dense)."""

    name: str
    sites: dict[str, SiteRule] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self._cache: tuple | None = None  # (layer, site, id(x)) -> score of the shared input
        self._acts: list | None = None
        self.adds_output = any(r.lowrank for r in self.sites.values())
        self._smap: SiteMap | None = None
        self._dense_reads: dict = {}

    def bind(self, model: nn.Module) -> "ChannelRuleSet":
        """Attach the rule to ``model``'s sites (weights per channel, CATS's up rows)."""
        self._smap = site_map(model)
        self._gated = find_arch(model.config.model_type).mlp_gated
        # CATS reads the up row of every kept unit (gated MLPs); the gate (or fc1) rows in full
        self._in_up = self._smap.layers[0]["mlp_in"].in_features if self._gated else 0
        return self

    def _score(self, layer: int, site: str, consumer: int, rule: SiteRule, x: torch.Tensor) -> torch.Tensor:
        per_consumer = rule.scale is not None and rule.scale.dim() == 2
        key = (layer, site, id(x), consumer if per_consumer else -1)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, rule.score(x, consumer))
        return self._cache[1]

    def keep(self, layer, site, consumer, x) -> torch.Tensor | None:
        """The kept channels ``[..., in]`` (bool) of ``x`` for a consumer; None: the site is dense."""
        rule = self.sites.get(site_key(layer, site))
        if rule is None or (rule.gate and site == "mlp_in"):
            return None
        if rule.gate:
            act = self._acts[layer].reshape(x.shape) if self._acts is not None else x
            return act.detach().float().abs() > rule.thresholds[consumer].item()
        return self._score(layer, site, consumer, rule, x) > rule.thresholds[consumer].item()

    def fill(self, layer, site) -> torch.Tensor | None:
        rule = self.sites.get(site_key(layer, site))
        return None if rule is None else rule.fill

    def transform(self, layer, site, consumer, x):
        smap = self._smap
        s = smap.layers[layer][site]
        out_c = s.out_features[consumer]
        lead = x.shape[:-1]
        rule = self.sites.get(site_key(layer, site))
        if rule is None:
            return x, torch.full(lead, float(out_c * s.in_features), device=x.device)
        if rule.gate:
            return self._cats(layer, site, consumer, rule, x)
        keep = self._score(layer, site, consumer, rule, x) > rule.thresholds[consumer].item()
        kept = keep.sum(-1).to(torch.float64)
        read = kept * out_c
        if rule.lowrank:
            u, v = rule.lowrank[consumer]
            read = read + u.shape[1] * (u.shape[0] + v.shape[1])
        fill = 0.0 if rule.fill is None else rule.fill.to(x.device, x.dtype)
        return torch.where(keep, x, fill), read

    def _cats(self, layer, site, consumer, rule: SiteRule, x):
        """CATS: ``mlp_out`` channels from ``|act(gate x)|``; gate rows in full, up rows of kept units."""
        s = self._smap.layers[layer][site]
        lead = x.shape[:-1]
        if site == "mlp_in":  # gate (or fc1) rows in full; up rows are counted with the kept units
            rows = s.out_features[consumer]
            if self._gated and len(s.modules) == 1:
                rows //= 2  # a fused [gate | up] projection
            read = rows * s.in_features if consumer == 0 else 0
            return x, torch.full(lead, float(read), device=x.device)
        act = self._acts[layer].reshape(x.shape) if self._acts is not None else x
        keep = act.detach().float().abs() > rule.thresholds[consumer].item()
        kept = keep.sum(-1).to(torch.float64)
        return x * keep.to(x.dtype), kept * (s.out_features[consumer] + self._in_up)

    def extra(self, layer, site, consumer, x):
        rule = self.sites.get(site_key(layer, site))
        if rule is None or not rule.lowrank:
            return None
        keep = self._score(layer, site, consumer, rule, x) > rule.thresholds[consumer].item()
        dropped = (x.float() * (~keep)).reshape(-1, x.shape[-1])
        u, v = rule.lowrank[consumer]
        return (dropped @ v.t().to(x.device) @ u.t().to(x.device)).reshape(*x.shape[:-1], -1)

    @contextmanager
    def live_state(self, model):
        """CATS reads ``act(gate x)`` of every layer in the same pass."""
        if not any(r.gate for r in self.sites.values()):
            yield None
            return
        spec = find_arch(model.config.model_type)
        acts: list = [None] * unit_map(model).num_layers
        if spec.mlp_gated:
            modules = [layer.get_submodule(spec.mlp_act) for layer in unit_map(model).layer_modules]
            handles = [m.register_forward_hook(lambda _m, _a, out, l=l: acts.__setitem__(l, out))
                       for l, m in enumerate(modules)]
        else:
            handles, acts = [], None  # non-gated: the down input itself is act(fc1 x)
        self._acts = acts
        try:
            yield acts
        finally:
            for h in handles:
                h.remove()
            self._acts = None
            self._cache = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, rule in self.sites.items():
            out.update(rule.tensors(key))
        return out

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> "ChannelRuleSet":
        keys = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".thresholds")})
        return cls(name, {k: SiteRule.from_tensors(tensors, k) for k in keys}, meta)
