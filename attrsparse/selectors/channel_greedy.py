"""TEAL's block-wise greedy allocation of sparsity across the projections of each decoder layer.

As in TEAL's ``greedyopt.py``: per layer, every projection starts dense; at each step every
projection is tried one step sparser (step ``GREEDY_STEP / w_p``, ``w_p`` its weights relative to
the attention output projection's, so every step saves the same weights) and the one whose block
output error on dense calibration inputs grows least is kept, until the layer's effective sparsity
(weight-weighted) reaches :data:`MAX_SPARSITY`. The error is TEAL's: ``||y - y'||`` over the
positions of the last quarter of each sequence, averaged over batch rows and features. A read ratio
``r`` then takes, in every layer, the step whose effective sparsity is closest to ``1 - r``.

Differences from TEAL's code: thresholds come from our log histograms of the calibration values
(TEAL: its histogram's inverse CDF assuming a zero-mean symmetric distribution); the base step is
0.1 (TEAL: 0.05) and the block errors are measured on :data:`GREEDY_TOKENS` tokens, to keep the
search to minutes on two CPU cores.

The search is the long part of calibrating TEAL or WINA (about two hours for Qwen2.5-0.5B on one
core), so each finished layer's steps are written to a checkpoint file (atomically) and a search
with the same key starts from the layers already there: an interrupted run resumes, a finished one
is reused by every later command on the same model, text and selector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.architectures import model_device
from ..core.channel_hooks import ChannelHooks
from ..core.io import atomic_write_json, read_json, stable_hash
from ..core.paths import cache_root
from .channel_stats import LogHistogram, leading_batch

GREEDY_STEP = 0.1
GREEDY_TOKENS = 512
MAX_SPARSITY = 0.7
LAST_FRACTION = 0.25
CHECKPOINT_VERSION = 1


def checkpoint_path(key: str, max_sparsity: float) -> Path:
    """The checkpoint file of the greedy search for ``key`` (a description of the model, text and
    scores: :func:`.channel_calibration.calibrator_key`) up to ``max_sparsity``, under
    ``<cache root>/greedy``; the search's own constants are part of its name."""
    name = stable_hash([CHECKPOINT_VERSION, key, max_sparsity, GREEDY_STEP, GREEDY_TOKENS, LAST_FRACTION])
    return cache_root() / "greedy" / f"{name}.json"


@dataclass
class GreedyPath:
    """Per layer, the greedy steps: ``(effective sparsity, kept fraction of each of its streams)``."""

    streams: list[list[int]]  # per layer: the calibrator's stream indices
    steps: list[list[tuple[float, list[float]]]]
    total_streams: int

    def keep_at(self, ratio: float) -> list[float]:
        """Kept fraction of every stream at read ratio ``ratio`` (the closest step of each layer)."""
        return self.keep_for([1.0 - ratio] * len(self.steps))

    def keep_for(self, sparsity: list[float]) -> list[float]:
        """Kept fraction of every stream with layer l at the step closest to ``sparsity[l]``."""
        keep = [1.0] * self.total_streams
        for idx, steps, target in zip(self.streams, self.steps, sparsity):
            _, layer_keep = min(steps, key=lambda p: abs(p[0] - target))
            for i, k in zip(idx, layer_keep):
                keep[i] = k
        return keep


def _capture(cal) -> tuple[list, list]:
    """Every decoder layer's call (args, kwargs) on a dense pass over about GREEDY_TOKENS tokens."""
    layers = cal.layer_modules
    calls: list = [None] * len(layers)

    def hook(l):
        def record(_m, args, kwargs):
            calls[l] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                        {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
        return record

    handles = [m.register_forward_pre_hook(hook(l), with_kwargs=True) for l, m in enumerate(layers)]
    try:
        with torch.no_grad():
            ids = leading_batch(cal.sequences, GREEDY_TOKENS)
            cal.model(input_ids=ids.to(model_device(cal.model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return layers, calls


def _out(result):
    return result[0] if isinstance(result, tuple) else result


def _error(target: torch.Tensor, new: torch.Tensor) -> float:
    start = int(new.shape[1] * (1 - LAST_FRACTION))
    return float(torch.norm(target[:, start:] - new[:, start:], dim=1).mean())


def _read_checkpoint(path: Path | None, key: str | None, n_layers: int) -> list:
    """The finished layers' steps of the search ``key`` in ``path`` (None for a layer not there)."""
    doc = read_json(path, ("key", "layers")) if path is not None else None
    if doc is None or doc["key"] != key or len(doc["layers"]) != n_layers:
        return [None] * n_layers
    return [None if pts is None else [(float(sp), [float(k) for k in keep]) for sp, keep in pts]
            for pts in doc["layers"]]


def greedy_keep(cal, hist: LogHistogram, max_sparsity: float = MAX_SPARSITY, key: str | None = None) -> GreedyPath:
    """TEAL's greedy path for every layer (module docstring), up to ``max_sparsity``; ``cal`` is a
    :class:`~.channel_calibration.Calibrator` (one stream per consumer for TEAL and WINA; a stream
    may also be a shared site). With ``key``, the layers already in its checkpoint file
    (:func:`checkpoint_path`) are taken from it and every layer searched is added to it as soon as
    it is done."""
    checkpoint = None if key is None else checkpoint_path(key, max_sparsity)
    weights = cal.stream_weights()
    n_layers = len(cal.layer_modules)
    steps_all = _read_checkpoint(checkpoint, key, n_layers)
    layers, calls = _capture(cal) if None in steps_all else (cal.layer_modules, [None] * n_layers)
    per_layer = [[i for i, s in enumerate(cal.streams) if s.layer == l] for l in range(n_layers)]
    unit = min(weights[i] for i in per_layer[0] if cal.streams[i].site == "attn_out")
    for l, (layer, call) in enumerate(zip(layers, calls)):
        if steps_all[l] is not None:
            cal.progress(l)
            continue
        args, kwargs = call
        idx = per_layer[l]
        w = [weights[i] for i in idx]
        step = [GREEDY_STEP * unit / wi for wi in w]
        sparsity = [0.0] * len(idx)

        def run(sp):  # every consumer of the layer's sites is a stream of idx: all set
            rule_set = cal.partial_rule({i: 1.0 - sp[j] for j, i in enumerate(idx)}, hist)
            with torch.no_grad(), ChannelHooks(cal.model, rule_set), rule_set.live_state(cal.model):
                return _out(layer(*args, **kwargs))

        with torch.no_grad():
            target = _out(layer(*args, **kwargs))
        points = [(0.0, [1.0] * len(idx))]
        total = sum(w)
        while sum(s * wi for s, wi in zip(sparsity, w)) / total < max_sparsity:
            best = None
            for j in range(len(idx)):
                if sparsity[j] >= 1.0:
                    continue
                trial = list(sparsity)
                trial[j] = min(1.0, trial[j] + step[j])
                err = _error(target, run(trial))
                if best is None or err < best[0]:
                    best = (err, j, trial)
            if best is None:
                break
            sparsity = best[2]
            points.append((sum(s * wi for s, wi in zip(sparsity, w)) / total, [1.0 - s for s in sparsity]))
        steps_all[l] = points
        if checkpoint is not None:
            atomic_write_json(checkpoint, {"key": key, "layers": steps_all})
        cal.progress(l)
    return GreedyPath(per_layer, steps_all, len(cal.streams))
