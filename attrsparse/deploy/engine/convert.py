"""Calibrated channel rules (:class:`~attrsparse.selectors.channels.ChannelRuleSet`, torch) as the
engine's :class:`~.sites.ChannelRules`: the same decisions and the same outputs as
:class:`~attrsparse.core.channel_hooks.ChannelHooks` applying the original rule set.

Under the hooks, consumer ``c`` of a site keeps channel ``j`` iff
``|x_j - center_j| * scale_c_j > thresholds[c]`` (strictly; ``center`` None: 0, ``scale`` None: 1;
``scale_c`` is row ``c`` of a ``[C, in]`` scale or the one ``[in]`` scale) and reads ``x'_j = x_j``
when kept, ``fill_j`` (None: 0) when not, so
``y = W x' + b = sum_{j kept by c} W[:, j] (x_j - fill_j) + W fill + b``. The engine's projection
``P`` keeps ``j`` iff ``|x_j - m_j| * a_P_j > t_P`` and computes
``y = sum_{j kept by P} W_P[:, j] (x_j - m_j) + bias_P + b``, so the conversion is exact when

* the decision center equals the fill (either may be absent when the other is 0): then
  ``m = fill`` and ``bias_P = W_P fill`` for every projection ``P`` of the site, computed from the
  weights as the engine stores them in ``precision`` (bf16 / int8 dequantised);
* there is no low-rank path (R-Sparse) and no gate decision (CATS).

Consumers with one threshold and one scale row become a shared rule (``threshold``, ``scale``: the
engine decides the site's input once); different thresholds (TEAL, WINA, attr_channel per consumer)
become ``thresholds`` per projection and a ``[C, in]`` scale with different rows (WINA's column
norms) ``scales`` per projection: each projection then decides, and reads, on its own.

Anything else raises :class:`UserError` naming the rule, the site and why (``attrsparse bench``
records that engine and selector as skipped with that line). Needs torch; the runner does not.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import UserError
from ...core.sites import SITE_NAMES, site_map
from ...selectors.channels import ChannelRuleSet, site_key
from ...selectors.channels import SiteRule as TorchSiteRule
from .fmt import PRECISIONS
from .pack import engine_arch, input_major, quantize
from .sites import SITE_PROJECTIONS, ChannelRules, SiteRule


def _fmt(values: torch.Tensor) -> str:
    return ", ".join(f"{float(v):.4g}" for v in values.flatten()[:4]) + (", ..." if values.numel() > 4 else "")


def _site_rule(rule: TorchSiteRule, modules: list[nn.Module], site: str, precision: str) -> SiteRule:
    """One site's engine rule, or a :class:`ValueError` saying why it cannot be one."""
    projections = SITE_PROJECTIONS[site]
    if rule.gate:
        raise ValueError("a CATS gate decision (mlp_out kept from |act(gate x)|), which the engine does not compute")
    if rule.lowrank:
        raise ValueError("an R-Sparse low-rank path for the dropped channels, which the engine does not have")
    thresholds = rule.thresholds.detach().float().flatten()
    if thresholds.numel() != len(projections):
        raise ValueError(f"{thresholds.numel()} thresholds for the site's {len(projections)} projections")
    scale = rule.scale
    scales: dict[str, list[float]] = {}
    if scale is not None:
        scale = scale.detach().float()
        if scale.dim() == 2:
            if scale.shape[0] != len(projections):
                raise ValueError(f"a scale of {scale.shape[0]} rows for the site's {len(projections)} projections")
            if bool((scale == scale[0]).all()):
                scale = scale[0]
            else:
                scales = {p: row.tolist() for p, row in zip(projections, scale)}
                scale = None
    center = None if rule.center is None else rule.center.detach().float().flatten()
    fill = None if rule.fill is None else rule.fill.detach().float().flatten()
    zero = lambda v: v is None or not bool(v.ne(0).any())  # noqa: E731
    if not (zero(center) and zero(fill)) and (center is None or fill is None or not torch.equal(center, fill)):
        what = ("a decision center but no fill" if fill is None else "a fill but no decision center"
                if center is None else f"a decision center ({_fmt(center)}) other than its fill ({_fmt(fill)})")
        raise ValueError(f"{what}; the engine shifts kept channels by the center it decides on")
    out = SiteRule(scale=None if scale is None else scale.tolist(), scales=scales)
    if bool((thresholds == thresholds[0]).all()):
        out.threshold = float(thresholds[0])
    else:
        out.thresholds = {p: float(t) for p, t in zip(projections, thresholds)}
    if not zero(fill):
        out.center = fill.tolist()
        for proj, module in zip(projections, modules):
            w = quantize(input_major([module.weight]), precision, dim=1)[2]  # [in, out] as stored
            out.bias[proj] = (fill.double() @ w.double()).float().tolist()
    return out


def convert_rules(rule_set: ChannelRuleSet, model: nn.Module, precision: str = "fp32") -> ChannelRules:
    """The engine rules computing what ``ChannelHooks(model, rule_set)`` computes (module docstring);
    ``precision``: the engine file's weights, for the compensation biases ``W fill``."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    engine_arch(model)
    layers = site_map(model).layers
    known = {site_key(l, s): (l, s) for l in range(len(layers)) for s in SITE_NAMES}
    sites: dict[tuple[int, str], SiteRule] = {}
    for key, rule in sorted(rule_set.sites.items()):
        where = f"channel rule {rule_set.name} at {key}"
        if key not in known:
            raise UserError(f"{where}: the native engine has no such site (its sites: the four of each "
                            f"of the {len(layers)} decoder layers)")
        layer, site = known[key]
        try:
            sites[(layer, site)] = _site_rule(rule, layers[layer][site].modules, site, precision)
        except ValueError as exc:
            raise UserError(f"{where} cannot run in the native engine: it has {exc}") from None
    return ChannelRules(sites)
