"""Calibrating the input-channel rules of :mod:`.channels` on calibration text.

:func:`calibrate_channels` builds one :class:`~.channels.ChannelRuleSet` per requested read ratio:

1. what does not depend on the ratio: WINA's column norms, SCAP's per-channel modes, R-Sparse's
   SVD factors, ``attr_channel``'s attribution (:func:`.channel_stats.attribution`);
2. histograms of every stream's score on dense passes over the calibration text;
3. the allocation: the fraction each stream keeps (uniform per site; TEAL's block-wise greedy search
   for ``teal``/``wina``; one global threshold on loss-per-parameter for ``attr_channel``);
4. thresholds read off the histograms, then refined on passes *under* the rule (later layers see the
   sparse upstream states they will see at run time), so the read ratio measured on the calibration
   text is the requested one; it is recorded with each rule (``meta["calibration_read_ratio"]``).

The read ratio counts the decoder linears' weights (:mod:`attrsparse.core.accounting`).
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.architectures import find_arch, model_device
from ..core.channel_hooks import ChannelHooks
from ..core.errors import UserError
from ..core.fingerprint import model_key
from ..core.io import stable_hash
from ..core.sites import SITE_NAMES, site_map
from ..core.trace import to_ids
from ..core.units import unit_map
from .base import Selector, register_selector
from .channel_budget import SensitivityCurves
from .channel_greedy import MAX_SPARSITY, GreedyPath, greedy_keep
from .channel_stats import LABELS, X_WEIGHTS, LogHistogram, attribution, batches, site_inputs
from .channels import CHANNEL_RULES, ChannelRuleSet, SiteRule, site_key

GREEDY_ALLOCATIONS = ("greedy", "greedy_global")  # attr_channel allocations that search TEAL's greedy path
GREEDY_MAX_ATTR = 0.9  # attr_channel's greedy allocations: the path reaches this layer sparsity
LOWRANK_FRACTION = 1 / 16  # R-Sparse: rank = this fraction of min(in, out) per linear
#: attr_channel: which gradient (per_token: token t's own loss; else every later token's too), its
#: statistic ("abs": E|g|, "rms": sqrt(E[g^2]), the Fisher diagonal's root), the power of the
#: weights per channel it is divided by, and whether scores and fills are centred (True: on E[x];
#: "mode": on SCAP's per-channel mode, the gradient RMS then weighted by (x - m)^2); the
#: defaults measured best on calibration-side text (docs/results/channels/README.md, variants)
ATTR = {"per_token": False, "statistic": "rms", "param_power": 0.5, "center": False, "per_consumer": True,
        "allocation": "global", "at_rule": 0, "grad_power": 1.0, "x_weight": 2, "labels": "text", "skip_first": 0}
#: per_consumer: True, False or a list of the sites (e.g. ["attn_in"]) whose consumers decide
#: separately; allocation: "global" (one threshold over every stream), "layer" (one threshold over the
#: streams of each layer, every layer reading the same fraction), "uniform" (one kept fraction),
#: "sensitivity" (channel_budget), "greedy" (TEAL's block-wise greedy path, every layer at the same
#: sparsity), "greedy_global" (the global threshold's budget per layer, the greedy path's split inside it);
#: at_rule: how many times the attribution is measured again under the ratio's rule (0: dense only);
#: x_weight p (statistic "rms"): sqrt(E[|x|^p g^2] / E[|x|^p]), the RMS of g weighted by |x|^p
#: (p = 2: E[(s_j x_j)^2] = E[(x_j g_j)^2]; one of 0 and channel_stats.X_WEIGHTS);
#: grad_power: the scale is the statistic to this power (0: |x| alone, over p^param_power);
#: labels: the gradient of the text's next-token loss ("text", the empirical Fisher) or of the loss
#: of one token sampled from the model's own prediction at each position ("sampled", the true Fisher:
#: what the KL divergence from the dense model's predictions weighs); skip_first: the first positions of
#: every calibration window left out of the attribution statistics (the window's attention sink)


#: what a rule recorded before a key existed did (records that lack the key are read with these)
ATTR_BEFORE = {"per_consumer": False, "allocation": "global", "at_rule": 0, "grad_power": 1.0, "x_weight": 0,
               "labels": "text", "skip_first": 0}


def same_attr(recorded: dict, options: dict) -> bool:
    """Whether a rule's recorded ``meta["attr"]`` is the same configuration as ``options``."""
    return {**ATTR_BEFORE, **recorded} == options


ATTR_CHOICES = {"statistic": ("abs", "rms"), "x_weight": (0, *X_WEIGHTS), "labels": LABELS,
                "allocation": ("global", "layer", "uniform", "sensitivity", *GREEDY_ALLOCATIONS)}


def check_attr(options: dict) -> dict:
    """``options`` for :data:`ATTR`, checked: a :class:`UserError` names the first bad key or value."""
    out = {}
    for key, value in options.items():
        bad = f"attr_channel option {key}={value!r}"
        if key not in ATTR:
            raise UserError(f"unknown attr_channel option '{key}' (available: {', '.join(ATTR)})")
        if key in ATTR_CHOICES:
            if isinstance(value, bool) or value not in ATTR_CHOICES[key]:
                raise UserError(f"{bad}: use one of {', '.join(map(str, ATTR_CHOICES[key]))}")
        elif key == "center":
            if not isinstance(value, bool) and value != "mode":
                raise UserError(f"{bad}: use true, false or mode")
        elif key == "per_token":
            if not isinstance(value, bool):
                raise UserError(f"{bad}: use true or false")
        elif key == "per_consumer":
            if not isinstance(value, bool) and not (isinstance(value, list) and set(value) <= set(SITE_NAMES)):
                raise UserError(f"{bad}: use true, false or a list of sites ({', '.join(SITE_NAMES)})")
        elif key == "skip_first":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16:
                raise UserError(f"{bad}: use an integer from 0 to 16")
        elif key == "at_rule":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
                raise UserError(f"{bad}: use an integer from 0 to 5")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UserError(f"{bad}: use a finite number >= 0")
        out[key] = value
    return out


@contextmanager
def attr_options(options: dict | None):
    """:data:`ATTR` updated with ``options`` (checked by :func:`check_attr`) inside the block."""
    checked = check_attr(options or {})
    saved = dict(ATTR)
    ATTR.update(checked)
    try:
        yield dict(ATTR)
    finally:
        ATTR.clear()
        ATTR.update(saved)


def attr_per_consumer(site: str) -> bool:
    """Whether ``attr_channel`` gives each consumer of ``site`` its own decision (``ATTR["per_consumer"]``)."""
    pc = ATTR["per_consumer"]
    return bool(pc) if isinstance(pc, bool) else site in pc


def column_norms(module: nn.Module) -> torch.Tensor:
    """``||W[:, j]||_2`` for every input channel j of an ``nn.Linear`` or GPT-2 ``Conv1D``."""
    w = module.weight.detach().float()
    return w.norm(dim=0) if isinstance(module, nn.Linear) else w.norm(dim=1)


def as_out_in(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().float()
    return w if isinstance(module, nn.Linear) else w.t()


@dataclass
class Stream:
    layer: int
    site: str
    consumer: int  # -1: one score for every consumer of the site


class Calibrator:
    """The ratio-independent pieces of one selector on one model (steps 1-2 of the module docstring)."""

    def __init__(self, model: nn.Module, sequences: list[torch.Tensor], selector: str, batch_size: int = 4,
                 progress=None):
        if selector not in CHANNEL_RULES:
            raise UserError(f"unknown channel rule '{selector}' (available: {', '.join(CHANNEL_RULES)})")
        self.model, self.selector, self.batch_size = model, selector, batch_size
        self.sequences = [s for s in sequences if s.numel() >= 2]
        if not self.sequences:
            raise UserError("channel calibration needs at least one calibration sequence of 2+ tokens")
        self.smap = site_map(model)
        self.layer_modules = unit_map(model).layer_modules
        self.gated = find_arch(model.config.model_type).mlp_gated
        self.progress = progress or (lambda *_: None)
        self.base = self._base_rules()
        self.streams = self._streams()

    # -- step 1 ------------------------------------------------------------------------------------
    def _base_rules(self, rule: ChannelRuleSet | None = None) -> dict[str, SiteRule]:
        """Per site, a rule with everything but its thresholds (attribution measured under ``rule``)."""
        out = {}
        stats = attribution(self.model, self.sequences, self.batch_size, ATTR["per_token"], ATTR["per_consumer"] is not False,
                            rule, labels=ATTR["labels"], skip_first=ATTR["skip_first"]) if self.selector == "attr_channel" else {}
        modes = self._modes() if self.selector == "scap" or (self.selector == "attr_channel" and ATTR["center"] == "mode") else {}
        for l, layer in enumerate(self.smap.layers):
            for name in SITE_NAMES:
                site = layer[name]
                c = len(site.modules)
                rule = SiteRule(torch.zeros(c))
                if self.selector == "cats":
                    if name not in ("mlp_in", "mlp_out"):
                        continue
                    rule.gate = True
                elif self.selector == "wina":
                    rule.scale = torch.stack([column_norms(m) for m in site.modules])
                elif self.selector == "scap":
                    rule.center = rule.fill = modes[(l, name)].float()
                elif self.selector == "r_sparse":
                    rule.lowrank = [self._svd(m) for m in site.modules]
                elif self.selector == "attr_channel":
                    mode = modes[(l, name)].double() if ATTR["center"] == "mode" else None
                    rule.scale = self._attr_scale(stats, l, name, mode)
                    if ATTR["center"]:  # the mode, or E[x]
                        rule.center = rule.fill = (mode if mode is not None else stats[(l, name)]["mean"]).float()
                out[site_key(l, name)] = rule
        return out

    def _attr_scale(self, stats: dict, layer: int, name: str, center: torch.Tensor | None = None) -> torch.Tensor:
        """``g_j / p^power``: one row per consumer (``[C, in]``) or one for the site (``[in]``).
        With ``center`` m (``center="mode"``, x_weight 2), the RMS of g is weighted by (x - m)², the
        shifted input the rule decides on."""
        site = self.smap.layers[layer][name]

        def stat(st):
            if ATTR["statistic"] == "abs":
                return st["abs_grad"]
            p = ATTR["x_weight"]
            if center is not None and p == 2:
                m = center
                num = st["x2_sq_grad"] - 2 * m * st["x_sq_grad"] + m * m * st["sq_grad"]
                den = st["x2"] - 2 * m * st["mean"] + m * m
                return (num.clamp_min(0) / den.clamp_min(1e-30)).sqrt()
            if p:  # the |x|^p-weighted RMS of g
                return (st[f"x{p}_sq_grad"] / st[f"x{p}"].clamp_min(1e-30)).sqrt()
            return st["sq_grad"].sqrt()

        if attr_per_consumer(name):
            return torch.stack([stat(stats[(layer, name, c)]) ** ATTR["grad_power"] / out ** ATTR["param_power"]
                                for c, out in enumerate(site.out_features)]).float()
        return (stat(stats[(layer, name)]) ** ATTR["grad_power"] / site.params_per_channel ** ATTR["param_power"]).float()

    def _svd(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        w = as_out_in(module)
        r = max(1, int(min(w.shape) * LOWRANK_FRACTION))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()

    def _modes(self, bins: int = 128) -> dict:
        """SCAP's per-channel mode of every site input (dense calibration passes, a 128-bin
        histogram per channel between its minimum and maximum)."""
        values: dict = {}
        with torch.no_grad(), site_inputs(self.model) as cap:
            for ids in batches(self.sequences, self.batch_size):
                self.model(input_ids=ids.to(model_device(self.model)), use_cache=False)
                for key, x in cap.items():
                    values.setdefault(key, []).append(x.detach().float().reshape(-1, x.shape[-1]).cpu())
        modes = {}
        for key, parts in values.items():
            x = torch.cat(parts)  # [T, in]
            lo, hi = x.min(0).values, x.max(0).values
            width = (hi - lo).clamp_min(1e-12)
            idx = ((x - lo) / width * (bins - 1)).round().long().clamp_(0, bins - 1)
            counts = torch.zeros(x.shape[1], bins).scatter_add_(1, idx.t(), torch.ones_like(idx.t(), dtype=torch.float))
            modes[key] = lo + counts.argmax(1).float() * width / (bins - 1)
        return modes

    def at_rule(self, rule: ChannelRuleSet) -> "Calibrator":
        """This calibrator with ``attr_channel``'s attribution measured under ``rule`` (the sparse
        model it will run in) instead of the dense model; the same streams."""
        other = copy.copy(self)
        other.base = self._base_rules(rule.bind(self.model))
        return other

    # -- step 2 ------------------------------------------------------------------------------------
    def _streams(self) -> list[Stream]:
        out = []
        for key, rule in self.base.items():
            l, name = int(key[1:4]), key.split(".", 1)[1]
            if rule.gate and name == "mlp_in":
                continue  # CATS reads the gate in full
            per = self.selector in ("teal", "wina") or (self.selector == "attr_channel" and attr_per_consumer(name))
            out += [Stream(l, name, c) for c in range(len(self.smap.layers[l][name].modules))] if per \
                else [Stream(l, name, -1)]
        return out

    def histograms(self, rule: ChannelRuleSet | None = None) -> LogHistogram:
        """Score histograms of every stream on passes over the calibration text, dense or under ``rule``."""
        hist = LogHistogram(len(self.streams))
        probe = ChannelRuleSet(self.selector, self.base).bind(self.model)
        index = {(s.layer, s.site, s.consumer): i for i, s in enumerate(self.streams)}
        live = ChannelHooks(self.model, rule.bind(self.model)) if rule is not None else None
        with torch.no_grad(), site_inputs(self.model) as cap, probe.live_state(self.model) as acts:
            for ids in batches(self.sequences, self.batch_size):
                if live is not None:
                    with live, rule.live_state(self.model):
                        self._forward(ids, probe, cap, hist, index)
                else:
                    self._forward(ids, probe, cap, hist, index, acts)
        return hist

    def _forward(self, ids, probe, cap, hist, index, acts=None):
        self.model(input_ids=ids.to(model_device(self.model)), use_cache=False)
        acts = acts if acts is not None else getattr(probe, "_acts", None)
        for (l, name), x in cap.items():
            key = site_key(l, name)
            rule = self.base.get(key)
            if rule is None or (rule.gate and name == "mlp_in"):
                continue
            if rule.gate:  # CATS: |act(gate x)| of the layer (the down input itself when not gated)
                a = acts[l] if acts is not None and acts[l] is not None else x
                hist.add(index[(l, name, -1)], a.detach().float().abs().reshape(x.shape))
                continue
            for c in range(len(self.smap.layers[l][name].modules)):
                if (l, name, c) in index:
                    hist.add(index[(l, name, c)], rule.score(x, c))
                elif c == 0:
                    hist.add(index[(l, name, -1)], rule.score(x, 0))

    # -- step 3-4 ----------------------------------------------------------------------------------
    def stream_names(self) -> list[str]:
        """Per stream, ``layer.site`` or, for a consumer's own stream, ``layer.site.projection``."""
        names = {m: n.rsplit(".", 1)[-1] for n, m in self.model.named_modules()}
        return [f"{s.layer}.{s.site}" if s.consumer < 0 else
                f"{s.layer}.{s.site}.{names.get(self.smap.layers[s.layer][s.site].modules[s.consumer], s.consumer)}"
                for s in self.streams]

    def stream_weights(self) -> list[float]:
        """Weights one kept channel of each stream costs (a shared stream: all its consumers;
        CATS: a kept unit's down column and, gated, its up row)."""
        out = []
        for s in self.streams:
            site = self.smap.layers[s.layer][s.site]
            w = site.out_features[s.consumer] if s.consumer >= 0 else site.params_per_channel
            if self.base[site_key(s.layer, s.site)].gate and self.gated:
                w += self.smap.layers[s.layer]["mlp_in"].in_features
            out.append(float(w * site.in_features))  # times the stream's channels
        return out

    def fixed_read(self) -> float:
        """Weights read whatever the thresholds (sites without a rule, CATS's gate rows, low-rank paths)."""
        covered = {(s.layer, s.site) for s in self.streams}
        total = 0.0
        for l, layer in enumerate(self.smap.layers):
            for name, site in layer.items():
                rule = self.base.get(site_key(l, name))
                if (l, name) not in covered:
                    if rule is not None and rule.gate:  # CATS mlp_in: the gate (or fc1) rows in full
                        rows = site.out_features[0] // (2 if self.gated and len(site.modules) == 1 else 1)
                        total += rows * site.in_features
                    else:
                        total += site.weight_params
                if rule is not None and rule.lowrank:
                    total += sum(u.shape[1] * (u.shape[0] + v.shape[1]) for u, v in rule.lowrank)
        return total

    def rule_from_keep(self, keep: list[float], hist: LogHistogram, ratio: float, extra: dict | None = None) -> ChannelRuleSet:
        """Thresholds keeping ``keep[i]`` of stream i's calibration values."""
        sites = {k: SiteRule(r.thresholds.clone(), r.scale, r.center, r.fill, r.lowrank, r.gate)
                 for k, r in self.base.items()}
        for i, s in enumerate(self.streams):
            t = hist.threshold(i, keep[i])
            rule = sites[site_key(s.layer, s.site)]
            if s.consumer >= 0:
                rule.thresholds[s.consumer] = t
            else:
                rule.thresholds[:] = t
        return ChannelRuleSet(self.selector, sites, {"requested_ratio": ratio, **(extra or {})})

    def partial_rule(self, keep: dict[int, float], hist: LogHistogram) -> ChannelRuleSet:
        """A rule (bound to the model) on the sites of the streams in ``keep`` only, stream i
        keeping ``keep[i]`` of its calibration values; their other consumers keep everything and
        every other site runs dense (the probes of the greedy and sensitivity allocations)."""
        sites: dict[str, SiteRule] = {}
        for i, k in keep.items():
            s = self.streams[i]
            key = site_key(s.layer, s.site)
            base = self.base[key]
            rule = sites.setdefault(key, SiteRule(torch.full_like(base.thresholds, -1.0), base.scale, base.center,
                                                  base.fill, base.lowrank, base.gate))
            rule.thresholds[s.consumer if s.consumer >= 0 else slice(None)] = hist.threshold(i, k)
        return ChannelRuleSet(self.selector, sites).bind(self.model)

    def read_ratio(self, keep: list[float]) -> float:
        weights = self.stream_weights()
        return (self.fixed_read() + sum(k * w for k, w in zip(keep, weights))) / self.smap.decoder_params

    def uniform_keep(self, ratio: float) -> list[float]:
        """One kept fraction for every stream that gives ``ratio`` (clamped to [0, 1])."""
        weights = self.stream_weights()
        k = (ratio * self.smap.decoder_params - self.fixed_read()) / sum(weights)
        return [min(1.0, max(0.0, k))] * len(self.streams)

    def global_keep(self, hist: LogHistogram, ratio: float) -> list[float]:
        """One threshold over every stream (scores comparable across sites), set for ``ratio``."""
        weights = self.stream_weights()
        target = ratio * self.smap.decoder_params - self.fixed_read()

        def read(log_t: float) -> float:
            t = 2.0 ** log_t
            return sum(w * hist.kept(i, t) for i, w in enumerate(weights))

        t = 2.0 ** log_threshold_for(read, target, 60)
        return [hist.kept(i, t) for i in range(len(self.streams))]

    def layer_keep(self, hist: LogHistogram, ratio: float) -> list[float]:
        """One threshold over the streams of each layer (scores comparable across its sites), set
        so that every layer's streams read ``ratio`` of their weights (TEAL's equal sparsity per
        layer, the split inside a layer by the scores)."""
        weights = self.stream_weights()
        keep = [1.0] * len(weights)
        for l in range(len(self.smap.layers)):
            idx = [i for i, s in enumerate(self.streams) if s.layer == l]

            def read(log_t: float) -> float:
                return sum(weights[i] * hist.kept(i, 2.0 ** log_t) for i in idx)

            t = 2.0 ** log_threshold_for(read, ratio * sum(weights[i] for i in idx), 60)
            for i in idx:
                keep[i] = hist.kept(i, t)
        return keep

    def layer_sparsity(self, keep: list[float]) -> list[float]:
        """Effective (weight-weighted) sparsity of every layer's streams under ``keep``."""
        weights = self.stream_weights()
        out = []
        for l in range(len(self.smap.layers)):
            idx = [i for i, s in enumerate(self.streams) if s.layer == l]
            total = sum(weights[i] for i in idx)
            out.append(1.0 - sum(keep[i] * weights[i] for i in idx) / total)
        return out

    def greedy_global_keep(self, path: GreedyPath, hist: LogHistogram, ratio: float) -> list[float]:
        """Across layers the global threshold's budgets, inside each layer the greedy path's split:
        one threshold over every stream's scores gives each layer a sparsity, the layer takes its
        greedy step closest to it, and the threshold is set so that the result reads ``ratio``."""
        weights = self.stream_weights()

        def keep_at(log_t: float) -> list[float]:
            t = 2.0 ** log_t
            return path.keep_for(self.layer_sparsity([hist.kept(i, t) for i in range(len(weights))]))

        return keep_at(log_threshold_for(lambda log_t: self.read_ratio(keep_at(log_t)), ratio, 40))


def log_threshold_for(read, target: float, steps: int) -> float:
    """The log2 threshold (bisection over [-40, 24] in ``steps`` halvings) at which ``read``,
    decreasing in it, comes down to ``target``: the upper end of the last bracket."""
    lo, hi = -40.0, 24.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if read(mid) > target else (lo, mid)
    return hi


def measure_read(model: nn.Module, rule: ChannelRuleSet, sequences: list[torch.Tensor], batch_size: int = 4) -> float:
    """Mean read ratio of ``rule`` over the tokens of ``sequences`` (the decoder linears)."""
    rule.bind(model)
    total = count = 0.0
    decoder = site_map(model).decoder_params
    with torch.no_grad(), ChannelHooks(model, rule) as hooks, rule.live_state(model):
        for ids in batches(sequences, batch_size):
            model(input_ids=ids.to(model_device(model)), use_cache=False)
            total += float(hooks.read.sum())
            count += hooks.read.numel()
    return total / count / decoder


_CALIBRATORS: dict = {}  # (selector, model key, calibration hash) -> (Calibrator, dense histograms, greedy path)


def calibrator_key(model: nn.Module, sequences: list[torch.Tensor], selector: str, attr: dict | None = None) -> tuple:
    """The key of :data:`_CALIBRATORS` for this model, text and selector (``attr``: attr_channel's
    options, default :data:`ATTR`)."""
    return (selector, model_key(model), stable_hash([to_ids(s).tolist() for s in sequences]),
            stable_hash(ATTR if attr is None else attr) if selector == "attr_channel" else None)


def searches_greedy(selector: str) -> bool:
    """Whether calibrating ``selector`` searches TEAL's greedy path (TEAL, WINA, attr_channel's greedy
    allocations): the long calibrations, whose progress is counted layer by layer."""
    return selector in ("teal", "wina") or (selector == "attr_channel" and ATTR["allocation"] in GREEDY_ALLOCATIONS)


def _calibrator(model: nn.Module, sequences: list[torch.Tensor], selector: str, progress=None):
    key = calibrator_key(model, sequences, selector)
    if key not in _CALIBRATORS:
        cal = Calibrator(model, sequences, selector, progress=progress)
        dense = cal.histograms()
        if searches_greedy(selector):
            path = greedy_keep(cal, dense, GREEDY_MAX_ATTR if selector == "attr_channel" else MAX_SPARSITY,
                               key=json.dumps(list(key)))
        elif selector == "attr_channel" and ATTR["allocation"] == "sensitivity":
            path = SensitivityCurves(cal, dense)
        else:
            path = None
        _CALIBRATORS[key] = (cal, dense, path)
    return _CALIBRATORS[key]


def calibrate_channels(model: nn.Module, sequences: list[torch.Tensor], selector: str, ratios,
                       refine: int = 2, progress=None) -> dict[float, ChannelRuleSet]:
    """``{ratio: rule}`` for ``selector`` at every read ratio (see the module docstring); the
    ratio-independent work is done once per model, selector and calibration text."""
    cal, dense, path = _calibrator(model, sequences, selector, progress)
    allocation = ("greedy (TEAL)" if selector in ("teal", "wina") else
                  ATTR["allocation"] if selector == "attr_channel" else "uniform")
    out = {}
    for ratio in ratios:
        if isinstance(path, GreedyPath) and allocation == "greedy_global":
            keep = cal.greedy_global_keep(path, dense, ratio)
        elif isinstance(path, GreedyPath):
            keep = path.keep_at(ratio)
        elif isinstance(path, SensitivityCurves):
            keep = path.keep_for(ratio)
        elif allocation == "global":
            keep = cal.global_keep(dense, ratio)
        elif allocation == "layer":
            keep = cal.layer_keep(dense, ratio)
        else:
            keep = cal.uniform_keep(ratio)
        rule = cal.rule_from_keep(keep, dense, ratio)

        def refit(here: Calibrator, rule: ChannelRuleSet, keep: list[float]):
            """Thresholds (and global budgets) from the live (sparse upstream) distributions under ``rule``."""
            live = here.histograms(rule)
            if allocation == "global":
                keep = here.global_keep(live, ratio)
            elif allocation == "layer":
                keep = here.layer_keep(live, ratio)
            return here.rule_from_keep(keep, live, ratio), keep

        here = cal
        for _ in range(ATTR["at_rule"] if selector == "attr_channel" else 0):  # attribution of the sparse model
            here = cal.at_rule(rule)
            rule, keep = refit(here, rule, keep)
        for _ in range(refine):
            rule, keep = refit(here, rule, keep)
        rule.meta["calibration_read_ratio"] = measure_read(model, rule, cal.sequences)
        rule.meta["kept_fraction"] = {n: round(float(k), 4) for n, k in zip(cal.stream_names(), keep)}
        rule.meta["allocation"] = allocation
        if selector == "attr_channel":
            rule.meta["attr"] = dict(ATTR)
        out[ratio] = rule
    return out


def calibrate_channels_shown(model: nn.Module, sequences: list[torch.Tensor], selector: str, ratios,
                             show: bool = True) -> dict[float, ChannelRuleSet]:
    """:func:`calibrate_channels` with a progress bar (ETA): layer by layer for the greedy searches
    (:func:`searches_greedy`), else ratio by ratio (the first ratio also measures what every ratio
    shares)."""
    if searches_greedy(selector):
        with tqdm(total=site_map(model).num_layers, desc=f"calibrating {selector}", unit="layer",
                  disable=not show) as bar:
            return calibrate_channels(model, sequences, selector, ratios, progress=lambda _l: bar.update(1))
    rules = {}
    for ratio in tqdm(list(ratios), desc=f"calibrating {selector}", unit="ratio", disable=not show):
        rules.update(calibrate_channels(model, sequences, selector, [ratio]))
    return rules


class ChannelSelector(Selector):
    """An input-channel rule by name: mode ``channel`` (it runs on tasks, not in the oracle sweep)."""

    kind = "baseline"
    mode = "channel"
    needs_calibration = True

    def channel_rules(self, model, calibration, ratios) -> dict[float, ChannelRuleSet]:
        return calibrate_channels_shown(model, list(calibration), self.name, ratios)

    def masks_for_many(self, scores, ratios, scope="per_layer", **context):
        raise UserError(f"{self.name} decides the input channels of every linear from the live input, not "
                        "units along a label: evaluate it on tasks (evaluate, compare, bench)")


def _channel_selector(name: str, description: str, kind: str = "baseline") -> None:
    register_selector(type(f"Channel_{name}", (ChannelSelector,),
                           {"name": name, "description": description, "kind": kind}))


_channel_selector("teal", "baseline (TEAL): |x_j| on the input of every linear, per-projection thresholds, "
                          "TEAL's block-wise greedy allocation")
_channel_selector("wina", "baseline (WINA): |x_j| * ||W[:, j]|| on the input of every linear, TEAL's allocation")
_channel_selector("cats", "baseline (CATS): |act(gate x)| of the MLP units; gate in full, up rows and down "
                          "columns of the kept units; attention dense")
_channel_selector("r_sparse", "baseline (R-Sparse): |x_j| on every linear, dropped channels through a "
                              "rank-min(in,out)/16 SVD path (counted as read)")
_channel_selector("scap", "baseline (SCAP): |x_j - mode_j| on every linear, the mode folded into a bias")
_channel_selector("attr_channel", "ours: |x_j| * g_cj / sqrt(outputs of projection c), g_cj the x^2-weighted RMS of "
                                  "dL/dx_j through projection c (the whole calibration window's loss), one threshold "
                                  "over every linear of every layer", kind="selector")
