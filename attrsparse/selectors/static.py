"""Calibrated static sparsity: importance averaged over calibration tokens, and static masks.

**Scores.** For each calibration sequence ``x [S]`` one trace
(``trace_gradients(model, x[:1], x[1:], labels=y)``, one forward + one backward) gives the score's
per-token values at the ``S - 1`` predicting positions; the calibrated importance of a unit is their
mean over every calibration token: ``mlp [L, N]``, ``heads [L, H]``. The labels ``y`` are, by default
(``labels="text"``), the text's own next tokens (the language-modelling loss); ``labels="dense"``
uses the dense model's greedy predictions, as the paper's oracle does. Text labels were chosen by
measurement: on SmolLM2 (16 x 128 WikiText-2 valid tokens, KL from the dense model on 4 other
windows, best head structure) they gave 3.29 / 2.13 / 1.09 at ratios 0.3 / 0.5 / 0.7 against
3.41 / 2.16 / 1.15 for dense labels. A plausible reason: a confident dense prediction has a
near-zero gradient, so dense labels average over the few uncertain tokens only.

**Masks** at several ratios come from the same scores (:mod:`attrsparse.selectors.allocation`).
The sparsity directory that stores them is written by :mod:`attrsparse.deploy.calibrate` and read
by :mod:`attrsparse.policies.static`. ``static_gxo`` is the same selection reachable by name: it
calibrates when its policy is prepared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.architectures import model_device
from ..core.distributed import init_distributed
from ..core.errors import UserError, check_ratio
from ..core.fingerprint import model_key
from ..core.io import atomic_save_tensors, load_tensors, stable_hash
from ..core.trace import model_logits, to_ids, trace_gradients
from ..core.units import UnitMasks, UnitScores, unit_map
from . import allocation as alloc
from .base import Selector, get_selector, register_selector
from .thresholds import resolve_calibration

LABELS = ("dense", "text")


@dataclass
class CalibratedScores:
    """Mean per-token importance over ``tokens`` calibration tokens: ``mlp [L, N]``, ``heads [L, H]``."""

    scores: UnitScores
    tokens: int
    metric: str
    labels: str
    head_reduction: str = "sum"


def _sequence_sums(model, metric: Selector, seq: torch.Tensor, labels: str, head_reduction: str):
    """Per-sequence sums of the per-token scores: (mlp ``[L, N]``, heads ``[L, H]``) float64, CPU."""
    prompt, target = seq[:1], seq[1:]
    y = None
    if labels == "dense":
        with torch.no_grad():
            y = model_logits(model, seq[:-1].unsqueeze(0), None)[0].argmax(-1)
    trace = trace_gradients(model, prompt, target, labels=y).row(0)
    scores = metric.scores(model, prompt, target, trace, head_reduction=head_reduction)
    return scores.mlp.double().sum(0).cpu(), scores.heads.double().sum(0).cpu()


def calibrate(model: nn.Module, sequences: list[torch.Tensor], metric: str = "corrected_gxo",
              labels: str = "text", head_reduction: str = "sum", progress: bool = False,
              parts_dir: Path | None = None, ctx=None) -> CalibratedScores | None:
    """Mean per-token scores of ``metric`` over ``sequences`` (1-D id tensors, >= 2 tokens each).

    With ``parts_dir`` every sequence's score sums are written there (one safetensors file per
    sequence, keyed by its ids and the settings) and reused by a re-run, and under ``torchrun``
    the sequences are sharded round-robin over the ranks (:mod:`attrsparse.core.distributed`): rank 0
    adds the parts in sequence order, so the result is bitwise the single-process one; the other
    ranks return None.
    """
    m = get_selector(metric)
    if m.kind == "selector":
        raise UserError(f"{metric} is a selector, not a score; calibrate with an attribution metric "
                        "(e.g. corrected_gxo)")
    if labels not in LABELS:
        raise UserError(f"labels must be one of {', '.join(LABELS)}, got '{labels}'")
    seqs = [s for s in map(to_ids, sequences) if s.numel() >= 2]
    if not seqs:
        raise UserError("calibration needs at least one sequence of at least 2 tokens")
    units = unit_map(model)
    if parts_dir is not None:
        ctx = ctx or init_distributed(model_device(model))
        settings = [model_key(model), m.name, labels, head_reduction]
        paths = [Path(parts_dir) / f"seq{i:05d}-{stable_hash([settings, s.tolist()])}.safetensors"
                 for i, s in enumerate(seqs)]
        mine = ctx.shard_positions(len(seqs))
    else:
        paths, mine = [None] * len(seqs), list(range(len(seqs)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"calibrating {metric}", unit="seq")
    sums = {}
    for i in mine:
        stored = load_tensors(paths[i]) if paths[i] is not None else None
        if stored is None:
            mlp_i, heads_i = _sequence_sums(model, m, seqs[i], labels, head_reduction)
            if paths[i] is not None:
                atomic_save_tensors(paths[i], {"mlp": mlp_i, "heads": heads_i})
        else:
            mlp_i, heads_i = stored["mlp"], stored["heads"]
        sums[i] = (mlp_i, heads_i)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if parts_dir is not None and ctx.distributed:
        ctx.barrier()  # every part is on disk
        if not ctx.is_main:
            return None
        sums = {i: (t["mlp"], t["heads"]) for i, t in ((i, load_tensors(p)) for i, p in enumerate(paths))}
    mlp = torch.zeros(units.num_layers, units.mlp_size, dtype=torch.float64, device="cpu")
    heads = torch.zeros(units.num_layers, units.num_heads, dtype=torch.float64, device="cpu")
    for i in range(len(seqs)):  # in sequence order, whoever computed them
        mlp += sums[i][0]
        heads += sums[i][1]
    tokens = sum(s.numel() - 1 for s in seqs)
    return CalibratedScores(UnitScores((mlp / tokens).float(), (heads / tokens).float()), tokens,
                            m.name, labels, head_reduction)


def static_masks(model: nn.Module, scores: UnitScores, ratios, allocation: str = "uniform", *,
                 search_sequences: list[torch.Tensor] | None = None, head_power: float = alloc.HEAD_POWER,
                 progress: bool = False) -> dict[float, tuple[UnitMasks, dict]]:
    """``{ratio: (masks [L, *], record)}`` for every ratio (``greedy`` needs ``search_sequences``)."""
    if allocation not in alloc.ALLOCATIONS:
        raise UserError(f"unknown allocation '{allocation}' (use {' or '.join(alloc.ALLOCATIONS)})")
    units = unit_map(model)
    out = {}
    probe = sens = None
    if allocation == "greedy":
        if not search_sequences:
            raise UserError("the greedy allocation needs calibration sequences to measure the loss on")
        probe = alloc.LossProbe(model, search_sequences)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=units.num_layers, desc="layer sensitivity", unit="layer")
        sens = alloc.mlp_sensitivity(probe, scores, units, progress=bar.update if bar else None)
        if bar is not None:
            bar.close()
    for ratio in ratios:
        ratio = check_ratio(ratio)
        if allocation == "uniform":
            structure = alloc.power_structure(units, ratio, head_power)
            masks = alloc.uniform_masks(scores, ratio, units, structure)
            record = {"heads": {"kv_groups": structure[0], "heads_per_group": structure[1]},
                      "head_power": head_power}
        else:
            masks, record = alloc.greedy_masks(probe, scores, ratio, units, sens)
        out[ratio] = (masks, {"requested_ratio": ratio, "allocation": allocation, **record,
                              **alloc.describe_masks(masks, units)})
    if probe is not None:
        for _, record in out.values():
            record["search"] = {"sequences": len(probe.sequences), "tokens": probe.tokens,
                                "passes": probe.passes, "loss": "mean KL(dense || masked)"}
    return out


_CALIBRATED: dict[tuple, CalibratedScores] = {}


def _cached_calibration(model: nn.Module, sequences: list[torch.Tensor]) -> CalibratedScores:
    key = (model_key(model), stable_hash([to_ids(s).tolist() for s in sequences]))
    if key not in _CALIBRATED:
        _CALIBRATED[key] = calibrate(model, sequences)
    return _CALIBRATED[key]


@register_selector
class StaticGxO(Selector):
    name = "static_gxo"
    description = ("deployable: static masks, corrected GxO averaged over calibration tokens, "
                   "parameter budget with whole key/value groups (attrsparse calibrate)")
    kind = "selector"
    mode = "static"
    single_pass = False
    needs_calibration = True

    def masks_for_many(self, scores, ratios, scope="per_layer", *, model=None, trace=None, units=None,
                       **context) -> list[UnitMasks]:
        """The static masks repeated at each of the T target tokens (``[T, L, *]``)."""
        seqs = context.get("calibration")
        if seqs is None:
            seqs = resolve_calibration(model, context)
        if seqs is None:
            raise UserError("static_gxo needs calibration sequences (a tokenizer beside the model)")
        cal = _cached_calibration(model, list(seqs))
        t = trace.mlp_x.shape[0]
        out = []
        for ratio in ratios:
            m = alloc.uniform_masks(cal.scores, ratio, units)
            out.append(UnitMasks(m.mlp.expand(t, *m.mlp.shape), m.heads.expand(t, *m.heads.shape)))
        return out

    def static_masks(self, model, calibration, ratio, **_) -> UnitMasks:
        """Calibrates corrected GxO on ``calibration``, then one uniform static mask at the ratio
        (deployable: no labels, no per-token work)."""
        if not calibration:
            raise UserError("static_gxo: the static mask needs calibration sequences")
        cal = _cached_calibration(model, list(calibration))
        masks = alloc.uniform_masks(cal.scores, ratio, unit_map(model))
        device = next(model.parameters()).device
        return UnitMasks(masks.mlp.to(device), masks.heads.to(device))
