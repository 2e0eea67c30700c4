"""Calibration shared by the field's calibrated baselines (``teal``, ``cats``, ``wanda``).

* :func:`resolve_calibration`: the calibration token sequences of a model: ``calibration`` given in
  the context, else WikiText-2 *valid* windows (:func:`attrsparse.data.calibration.calibration_sequences`)
  through ``tokenizer`` in the context or the tokenizer saved beside the model's weights; None
  when no tokenizer is reachable (the callers then say what they fall back to).
* :func:`exact_thresholds`: per-stream thresholds ``tau`` such that exactly
  ``k = keep_count(ratio, M)`` of the M calibration values are ``> tau`` (fewer only when values tie
  at ``tau``), from two streamed passes: a log2 histogram locates the bin of the (k+1)-th largest
  value, the second pass reads only that bin's values. Memory is a histogram per stream, never all
  activations (SmolLM2: 30 layers x 1536 units x 2048 tokens would be 377 MB).
* :class:`ThresholdSelector` / :class:`ThresholdRule`: a selector that keeps a unit when a live
  statistic (TEAL ``|x|``, CATS ``|act(gate x)|``) exceeds its layer's calibrated threshold, both in
  the oracle sweep (:meth:`Selector.masks_for_many`) and online in task evaluations.
* :func:`decision_cost_fraction`: the parameters an online rule must run *before* it can decide
  (a rule on the down-projection input needs gate/up computed), which the unit accounting counts as
  skipped.

Thresholds are calibrated on dense activations (as TEAL does); under sparsity upstream the live
distributions shift, so the executed ratio differs from the requested one and is reported as
executed. Thresholds are cached in memory per (selector, model fingerprint, calibration tokens).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..core.accounting import decision_cost
from ..core.architectures import linear_dims
from ..core.errors import UserError
from ..core.fingerprint import model_key
from ..core.hooks import UnitHooks
from ..core.io import stable_hash
from ..core.trace import teacher_forced_ids, to_ids
from ..core.units import UnitMasks, UnitScores, unit_map
from ..data.calibration import calibration_sequences
from .base import OnlineRule, Selector
from .topk import keep_count

CALIBRATION = {"source": "wikitext2", "n_sequences": 16, "seq_len": 128}
_BINS = 8192
_LOG2_LO, _LOG2_HI = -48.0, 16.0  # values outside [2^-48, 2^16] fall into the end bins
_SEQUENCES: dict[str, list[torch.Tensor] | None] = {}  # (model, CALIBRATION) -> sequences
_THRESHOLDS: dict[tuple, torch.Tensor] = {}  # (name, fingerprint, calibration hash, ratio) -> [S]
_NOTED: set[str] = set()


def note_once(key: str, message: str) -> None:
    """Print ``attrsparse: message`` on stderr the first time ``key`` is seen."""
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"attrsparse: {message}", file=sys.stderr, flush=True)


def _saved_tokenizer(model: nn.Module):
    """The tokenizer saved beside a model loaded from a local directory, else None."""
    path = str(getattr(model, "name_or_path", "") or "")
    if not path or not Path(path).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def resolve_calibration(model: nn.Module, context: dict) -> list[torch.Tensor] | None:
    """Calibration sequences (1-D id tensors) for ``model``, or None (see the module docstring)."""
    if context.get("calibration") is not None:
        return list(context["calibration"])
    key = stable_hash([model_key(model), str(getattr(model, "name_or_path", "")), CALIBRATION])
    if key not in _SEQUENCES:
        tokenizer = context.get("tokenizer") or _saved_tokenizer(model)
        seqs = None
        if tokenizer is not None:
            try:
                seqs = calibration_sequences(tokenizer, **CALIBRATION)
            except UserError as err:
                note_once(f"calib-{err}", f"no calibration data ({err})")
        _SEQUENCES[key] = seqs
    return _SEQUENCES[key]


def calibration_hash(sequences: list[torch.Tensor]) -> str:
    return stable_hash([to_ids(s).tolist() for s in sequences])


# -- exact thresholds ---------------------------------------------------------------------------
def _bins(values: torch.Tensor) -> torch.Tensor:
    """Log2-histogram bin of each non-negative value (flattened), long ``[M]``."""
    logs = torch.log2(values.detach().reshape(-1).float().clamp_min(2.0 ** _LOG2_LO))
    idx = ((logs - _LOG2_LO) * (_BINS / (_LOG2_HI - _LOG2_LO))).long()
    return idx.clamp_(0, _BINS - 1).cpu()


def exact_thresholds(batches: Callable[[], Iterable[list[torch.Tensor]]],
                     ratios: list[float]) -> dict[float, torch.Tensor]:
    """``{ratio: tau [S]}`` over S value streams.

    ``batches()`` yields, per calibration batch, a list of S tensors of non-negative values (one
    per stream, e.g. per layer); it is called twice. ``tau[s]`` is the (k+1)-th largest value of
    stream s (``k = keep_count(ratio, M_s)``), so ``values > tau`` keeps k of the M_s values when
    nothing ties at tau; ``-inf`` when k = M_s (keep everything). The counting runs on the CPU.
    """
    counts = None
    for streams in batches():
        if counts is None:
            counts = torch.zeros(len(streams), _BINS, dtype=torch.long, device="cpu")
        for s, values in enumerate(streams):
            counts[s] += torch.bincount(_bins(values), minlength=_BINS)
    if counts is None:
        raise UserError("calibration is empty: no sequences")
    totals = counts.sum(-1)
    at_or_above = counts.flip(-1).cumsum(-1).flip(-1)  # [S, BINS]: values in bins >= b
    plans = {}
    for ratio in ratios:
        rank = torch.tensor([keep_count(ratio, int(m)) + 1 for m in totals], device="cpu")  # (k+1)-th largest
        bin_of = (at_or_above >= rank[:, None]).sum(-1) - 1  # [S]; -1: k = M, keep all
        above = torch.where(bin_of + 1 < _BINS,
                            at_or_above.gather(1, (bin_of + 1).clamp(0, _BINS - 1)[:, None])[:, 0], 0)
        plans[ratio] = (bin_of, rank - above)  # the (rank - above)-th largest inside bin_of
    wanted = [sorted({int(plans[r][0][s]) for r in ratios} - {-1}) for s in range(len(totals))]
    found: list[dict[int, list]] = [{b: [] for b in bins} for bins in wanted]
    for streams in batches():
        for s, values in enumerate(streams):
            if wanted[s]:
                flat, idx = values.detach().reshape(-1).float().cpu(), _bins(values)
                for b in wanted[s]:
                    found[s][b].append(flat[idx == b])
    out = {}
    for ratio in ratios:
        bin_of, within = plans[ratio]
        tau = torch.full((len(totals),), float("-inf"), device="cpu")
        for s in range(len(totals)):
            b = int(bin_of[s])
            if b >= 0 and sum(v.numel() for v in found[s][b]):
                vals = torch.sort(torch.cat(found[s][b]), descending=True).values
                tau[s] = vals[min(int(within[s]), vals.numel()) - 1]
            elif b >= 0:  # the second pass did not reproduce the bin: use its lower edge
                tau[s] = 2.0 ** (_LOG2_LO + b * (_LOG2_HI - _LOG2_LO) / _BINS)
        out[ratio] = tau
    return out


# -- threshold selectors --------------------------------------------------------------------------
class ThresholdSelector(Selector):
    """Keep unit i of layer l when its statistic exceeds the layer's calibrated threshold.

    Subclasses define the statistic: :meth:`mlp_values` from the down-projection input
    ``x [..., N]`` (and the live state of :meth:`live_state`, e.g. captured activations),
    :meth:`head_values` from the head outputs ``o [..., H, D]``; ``sparsify_heads = False`` keeps
    every head. The selection ``policy`` of the sweep is ignored: the masks are the thresholds'.
    """

    kind = "baseline"
    mode = "online"
    needs_calibration = True
    sparsify_heads = True

    @contextmanager
    def live_state(self, model: nn.Module) -> Iterator[object]:
        yield None

    def mlp_values(self, layer: int, x: torch.Tensor, state) -> torch.Tensor:
        return x.detach().abs().float()

    def head_values(self, layer: int, o: torch.Tensor, state) -> torch.Tensor:
        return o.detach().float().norm(dim=-1)

    def values(self, model: nn.Module, ids: torch.Tensor) -> UnitScores:
        """Statistics of one dense pass over ``ids [B, S]``: ``mlp [B, S, L, N]``, ``heads [B, S, L, H]``
        (heads all ones when they are not sparsified)."""
        units = unit_map(model)
        with torch.no_grad(), UnitHooks(model, capture=True) as hooks, self.live_state(model) as state:
            model(input_ids=ids, use_cache=False)
            mlp = torch.stack([self.mlp_values(l, hooks.mlp_inputs[l], state)
                               for l in range(units.num_layers)], dim=-2)
            heads = torch.stack([self.head_values(l, hooks.head_inputs[l], state)
                                 for l in range(units.num_layers)], dim=-2)
        if not self.sparsify_heads:
            heads = torch.ones_like(heads)
        return UnitScores(mlp, heads)

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        """Statistics at the T target positions ``[T, L, *]``, from one dense pass."""
        ids, p, t = teacher_forced_ids(prompt_ids, target_ids)
        return self.values(model, ids.unsqueeze(0).to(model.device)).map(
            lambda v: v[0, p - 1:p - 1 + t].cpu())

    # -- thresholds ------------------------------------------------------------------------------
    def _streams(self, scores: UnitScores) -> list[torch.Tensor]:
        """One value stream per layer (MLP), then per layer (heads) when heads are sparsified."""
        layers = scores.mlp.shape[-2]
        out = [scores.mlp[..., l, :] for l in range(layers)]
        if self.sparsify_heads:
            out += [scores.heads[..., l, :] for l in range(layers)]
        return out

    def thresholds(self, model: nn.Module, sequences: list[torch.Tensor],
                   ratios: list[float]) -> dict[float, torch.Tensor]:
        """``{ratio: tau [L] or [2L]}`` (MLP layers, then heads) on dense calibration passes; cached."""
        base = (self.name, model_key(model), calibration_hash(sequences))
        missing = [r for r in ratios if base + (round(r, 6),) not in _THRESHOLDS]
        if missing:
            device = next(model.parameters()).device

            def batches():
                for seq in sequences:
                    yield self._streams(self.values(model, to_ids(seq, device).view(1, -1)))

            for r, tau in exact_thresholds(batches, missing).items():
                _THRESHOLDS[base + (round(r, 6),)] = tau
        return {r: _THRESHOLDS[base + (round(r, 6),)] for r in ratios}

    def apply(self, scores: UnitScores, tau: torch.Tensor) -> UnitMasks:
        """Masks ``[..., L, *]``: statistic > its layer's threshold (heads all kept if not sparsified)."""
        layers = scores.mlp.shape[-2]
        mlp = scores.mlp > tau[:layers].to(scores.mlp.device).unsqueeze(-1)
        if not self.sparsify_heads:
            return UnitMasks(mlp, torch.ones_like(scores.heads, dtype=torch.bool))
        return UnitMasks(mlp, scores.heads > tau[layers:].to(scores.heads.device).unsqueeze(-1))

    def masks_for_many(self, scores, ratios, scope="per_layer", *, model=None, **context):
        """Calibrated thresholds (WikiText-2 valid, dense) applied to ``scores [T, L, *]``; without a
        reachable tokenizer the thresholds are per-layer quantiles over ``scores``' own T tokens."""
        sequences = resolve_calibration(model, context) if model is not None else None
        if sequences is None:
            note_once(f"fallback-{self.name}", f"{self.name}: no tokenizer reachable; thresholds are "
                                               "per-layer quantiles over each question's own tokens")
            taus = exact_thresholds(lambda: [self._streams(scores)], [r for r in ratios if r < 1.0])
        else:
            taus = self.thresholds(model, sequences, [r for r in ratios if r < 1.0])
        dense = UnitMasks(torch.ones_like(scores.mlp, dtype=torch.bool),
                          torch.ones_like(scores.heads, dtype=torch.bool))
        return [dense if r >= 1.0 else self.apply(scores, taus[r]) for r in ratios]

    def online_rule(self, model, calibration, ratio) -> "ThresholdRule":
        """Thresholds calibrated on dense passes over ``calibration`` so that the kept fraction per
        layer equals ``ratio`` there; live statistics come from the (masked) pass itself."""
        if not calibration:
            raise UserError(f"{self.name}: thresholds need calibration sequences")
        tau = self.thresholds(model, list(calibration), [ratio])[ratio]
        return ThresholdRule(self, tau.tolist(), unit_map(model).num_layers)

    def prepaid_params(self, units) -> tuple[int, int, bool]:
        """What runs before the rule can decide: see :func:`prepaid_on_unit_inputs`."""
        return prepaid_on_unit_inputs(units)


class ThresholdRule(OnlineRule):
    """Unit kept when its live statistic exceeds the calibrated per-layer threshold
    (``tau``: ``[L]`` MLP thresholds, then ``[L]`` heads when heads are sparsified)."""

    def __init__(self, selector: ThresholdSelector, tau: list[float], layers: int):
        self.selector, self.tau, self._layers = selector, tau, layers
        self._state = None

    def mlp_keep(self, layer, x):
        return self.selector.mlp_values(layer, x, self._state) > self.tau[layer]

    def head_keep(self, layer, o):
        if not self.selector.sparsify_heads:
            return torch.ones(o.shape[:-1], dtype=torch.bool, device=o.device)
        return self.selector.head_values(layer, o, self._state) > self.tau[self._layers + layer]

    @contextmanager
    def live_state(self, model):
        with self.selector.live_state(model) as state:
            self._state = state
            try:
                yield state
            finally:
                self._state = None


def prepaid_on_unit_inputs(units) -> tuple[int, int, bool]:
    """(parameters of one MLP unit, of one head, whether all key/value heads) that must run before a
    rule on the down / output-projection input can decide: everything of an MLP unit but its
    down-projection column; a head's query rows, and every key/value head."""
    hidden = linear_dims(units.down_modules[0])[1]
    out_cols = units.head_dim * linear_dims(units.out_modules[0])[1]
    return units.mlp_unit_params - hidden, units.head_params - out_cols, True


def decision_cost_fraction(masks: UnitMasks, units, mlp_prepaid: int, head_prepaid: int,
                           all_kv: bool) -> torch.Tensor:
    """Per row ``[...]`` (masks ``[..., L, *]``): :func:`attrsparse.core.accounting.decision_cost`
    averaged over layers. Adding it to the unit accounting gives the parameters really read."""
    return decision_cost(masks, units, (mlp_prepaid, head_prepaid, all_kv)).mean(-1)
