"""Input-channel rules of the native engine: the contract with the channel-sparsity selectors.

Each decoder layer has four input *sites*, each read by one or more projections:

========== ========================================== ==================
site       input                                      projections
========== ========================================== ==================
attn_in    normed hidden state entering attention     q, k, v
attn_out   concatenated head outputs (o_proj input)   o
mlp_in     normed hidden state entering the MLP       gate, up
mlp_out    MLP activation (down_proj input)           down
========== ========================================== ==================

A :class:`SiteRule` decides, for every projection ``P`` of its site, which channels ``P`` reads:
``P`` keeps channel ``j`` iff ``keep[j]`` (when a fixed mask is given) and
``|x_j - center_j| * scale_P_j > threshold_P`` (when ``P`` has a threshold), and computes
``y = sum_{j kept by P} W_P[:, j] (x_j - center_j) + bias[P]`` (plus the layer's own bias).
``threshold_P`` is ``thresholds[P]`` when given, else the site's ``threshold``; ``scale_P`` is
``scales[P]`` when given, else the site's ``scale`` (None: 1). Without ``thresholds`` / ``scales``
every projection of a site makes the same decision (a *shared* rule: the engine decides the input
once); with them each projection of attn_in (q, k, v) and mlp_in (gate, up) decides on its own, as
TEAL's and WINA's per-projection thresholds and scales do. The center and the fixed mask are one
per site. Skipped channels read no weights: a projection reads ``kept_P * outputs_P`` weights.
Static unit masks are the same thing: MLP neuron ``i`` is channel ``i`` of ``mlp_out``; query head
``h`` is channels ``h*head_dim:(h+1)*head_dim`` of ``attn_out`` (:meth:`ChannelRules.from_unit_masks`).

An engine file packed with an input-major head (``pack(..., head_layout="input")``) also runs the
LM head as an input-sparse linear: :attr:`ChannelRules.head` is then the rule of its input (the
final normed hidden state) with the one projection ``head`` (the vocabulary's logits).

Vectors may be lists, tuples, numpy arrays or torch tensors (anything with ``tolist`` or
iterable); nothing here imports numpy or torch.
"""

from __future__ import annotations

import base64
import binascii
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import UserError

SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
SITE_PROJECTIONS = {"attn_in": ("q", "k", "v"), "attn_out": ("o",), "mlp_in": ("gate", "up"),
                    "mlp_out": ("down",)}
HEAD_PROJECTION = "head"  # the one projection of the head's input (ChannelRules.head)
# every projection of a layer, in the order of the engine's kept counts (Engine.kept, EngStep.kept)
PROJECTIONS = tuple(p for site in SITES for p in SITE_PROJECTIONS[site])


def as_list(values: Any) -> list:
    """A plain list from a list, tuple, numpy array or torch tensor (1-D)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        values = values.tolist()
    return list(values)


@dataclass
class SiteRule:
    """The rule of one site of one layer (see the module docstring). All fields are optional:
    ``SiteRule()`` is dense."""

    threshold: float | None = None
    scale: Sequence[float] | None = None     # a_j >= 0, None = 1
    center: Sequence[float] | None = None    # m_j, None = 0
    keep: Sequence[bool] | None = None       # fixed keep-mask, None = all
    bias: Mapping[str, Sequence[float]] = field(default_factory=dict)  # projection -> compensation
    thresholds: Mapping[str, float] = field(default_factory=dict)  # projection -> its own threshold
    scales: Mapping[str, Sequence[float]] = field(default_factory=dict)  # projection -> its own scale

    def is_dense(self) -> bool:
        return (self.threshold is None and not self.thresholds and self.center is None and self.keep is None
                and not self.bias)

    def projection_test(self, projection: str) -> tuple[float | None, Sequence[float] | None]:
        """``(threshold, scale)`` of ``projection``'s test (threshold None: no test)."""
        threshold = self.thresholds.get(projection, self.threshold)
        return (None if threshold is None else float(threshold)), self.scales.get(projection, self.scale)


@dataclass
class ChannelRules:
    """Rules per ``(layer, site)``; missing entries are dense. ``head``: the rule of the LM head's
    input (projection ``"head"``), for engine files whose head is stored input-major."""

    sites: dict[tuple[int, str], SiteRule] = field(default_factory=dict)
    head: SiteRule | None = None

    def get(self, layer: int, site: str) -> SiteRule | None:
        return self.sites.get((layer, site))

    @classmethod
    def from_thresholds(cls, thresholds: Mapping[tuple[int, str], float]) -> ChannelRules:
        """TEAL-style rules: keep channel j iff |x_j| > t, one t per (layer, site)."""
        return cls({key: SiteRule(threshold=float(t)) for key, t in thresholds.items()})

    @classmethod
    def from_unit_masks(cls, mlp: Sequence[Sequence[bool]] | None = None,
                        heads: Sequence[Sequence[bool]] | None = None, *, head_dim: int) -> ChannelRules:
        """Static unit masks as fixed keep-masks: ``mlp[l][i]`` keeps MLP neuron i (channel i of
        mlp_out), ``heads[l][h]`` keeps query head h (its head_dim channels of attn_out)."""
        sites: dict[tuple[int, str], SiteRule] = {}
        for layer, row in enumerate(mlp or []):
            sites[(layer, "mlp_out")] = SiteRule(keep=[bool(k) for k in as_list(row)])
        for layer, row in enumerate(heads or []):
            sites[(layer, "attn_out")] = SiteRule(keep=[bool(k) for k in as_list(row) for _ in range(head_dim)])
        return cls(sites)

    def validate(self, config: dict) -> None:
        """Raise :class:`UserError` when a rule does not fit the model (layer, site, lengths)."""
        dims = site_dims(config)
        for (layer, site), rule in self.sites.items():
            where = f"channel rule ({layer}, {site!r})"
            if site not in dims:
                raise UserError(f"{where}: unknown site; sites are {', '.join(SITES)}")
            if not 0 <= layer < config["n_layers"]:
                raise UserError(f"{where}: the model has {config['n_layers']} layers")
            _check_rule(where, rule, *dims[site])
        if self.head is not None:
            _check_rule("the head's channel rule", self.head, config["hidden"], {HEAD_PROJECTION: config["vocab"]})


def _check_rule(where: str, rule: SiteRule, n_in: int, outs: dict[str, int]) -> None:
    """:class:`UserError` when ``rule``'s vectors do not fit an input of ``n_in`` channels feeding
    the projections ``outs`` (name -> outputs)."""
    for name in ("scale", "center", "keep"):
        values = getattr(rule, name)
        if values is not None and len(as_list(values)) != n_in:
            raise UserError(f"{where}: {name} has {len(as_list(values))} entries, the input has {n_in}")
    for name in ("thresholds", "scales"):
        for proj in getattr(rule, name):
            if proj not in outs:
                raise UserError(f"{where}: {name} for {proj!r}; this site feeds {', '.join(outs)}")
    for proj, values in rule.scales.items():
        if len(as_list(values)) != n_in:
            raise UserError(f"{where}: scales[{proj!r}] has {len(as_list(values))} entries, "
                            f"the input has {n_in}")
    for proj, values in rule.bias.items():
        if proj not in outs:
            raise UserError(f"{where}: bias for {proj!r}; this site feeds {', '.join(outs)}")
        if len(as_list(values)) != outs[proj]:
            raise UserError(f"{where}: bias[{proj!r}] has {len(as_list(values))} entries, "
                            f"{proj} has {outs[proj]} outputs")


def site_dims(config: dict) -> dict[str, tuple[int, dict[str, int]]]:
    """``site -> (input channels, {projection: outputs})`` for one layer of an engine config."""
    d, hd = config["hidden"], config["head_dim"]
    q, kv, inter = config["n_heads"] * hd, config["n_kv"] * hd, config["inter"]
    return {"attn_in": (d, {"q": q, "k": kv, "v": kv}), "attn_out": (q, {"o": d}),
            "mlp_in": (d, {"gate": inter, "up": inter}), "mlp_out": (inter, {"down": d})}


def physical_bias(rule: SiteRule, site: str, config: dict) -> list[float] | None:
    """The site's compensation biases concatenated in the engine's physical output order (q | k | v,
    gate | up), or None."""
    if not rule.bias:
        return None
    _, outs = site_dims(config)[site]
    flat: list[float] = []
    for proj, n in outs.items():
        flat.extend(float(v) for v in as_list(rule.bias[proj])) if proj in rule.bias else flat.extend([0.0] * n)
    return flat


RULES_FORMAT = 4  # 2: per-projection thresholds and scales; 3: vectors as base64 float32; 4: the head's rule (1 to 3 read the same)


def _b64(values) -> str:
    """A vector as base64 of its little-endian float32 bytes (exact for the engine, which reads
    float32; a worker decodes it without one Python float per value)."""
    buf = array("f", [float(v) for v in as_list(values)])
    if sys.byteorder != "little":
        buf.byteswap()
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _floats(values) -> array | None:
    """A vector of a rules file (base64 float32, or a JSON list in formats 1 and 2) as float32."""
    if values is None:
        return None
    if isinstance(values, str):
        buf = array("f")
        buf.frombytes(base64.b64decode(values, validate=True))
        if sys.byteorder != "little":
            buf.byteswap()
        return buf
    return array("f", values)


def _rule_json(r: SiteRule) -> dict:
    entry: dict = {}
    if r.threshold is not None:
        entry["threshold"] = float(r.threshold)
    for name in ("scale", "center"):
        if getattr(r, name) is not None:
            entry[name] = _b64(getattr(r, name))
    if r.keep is not None:
        entry["keep"] = [bool(v) for v in as_list(r.keep)]
    if r.bias:
        entry["bias"] = {p: _b64(b) for p, b in r.bias.items()}
    if r.thresholds:
        entry["thresholds"] = {p: float(t) for p, t in r.thresholds.items()}
    if r.scales:
        entry["scales"] = {p: _b64(a) for p, a in r.scales.items()}
    return entry


def _rule_from(e: dict) -> SiteRule:
    return SiteRule(threshold=e.get("threshold"), scale=_floats(e.get("scale")), center=_floats(e.get("center")),
                    keep=None if e.get("keep") is None else array("B", [1 if k else 0 for k in e["keep"]]),
                    bias={p: _floats(b) for p, b in e.get("bias", {}).items()}, thresholds=e.get("thresholds", {}),
                    scales={p: _floats(a) for p, a in e.get("scales", {}).items()})


def rules_to_json(rules: ChannelRules) -> dict:
    """A JSON-able dict of ``rules`` (for files and worker processes); see :func:`rules_from_json`."""
    out = {"format": RULES_FORMAT,
           "sites": [{"layer": layer, "site": site, **_rule_json(r)} for (layer, site), r in sorted(rules.sites.items())]}
    if rules.head is not None:
        out["head"] = _rule_json(rules.head)
    return out


def rules_from_json(data: dict) -> ChannelRules:
    """The rules of :func:`rules_to_json`'s dict; vectors held as float32 arrays (what the engine
    receives), keep-masks as byte arrays."""
    try:
        if data.get("format", 1) not in (1, 2, 3, RULES_FORMAT):
            raise ValueError(f"format {data.get('format')!r}; this attrsparse reads 1 to {RULES_FORMAT}")
        return ChannelRules({(int(e["layer"]), str(e["site"])): _rule_from(e) for e in data["sites"]},
                            head=None if data.get("head") is None else _rule_from(data["head"]))
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise UserError(f"not a channel-rules file: {exc}") from None
