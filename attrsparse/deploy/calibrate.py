"""Calibrated static sparsity: importance averaged over calibration tokens, and the sparsity file.

**Scores.** For each calibration sequence ``x [S]`` one trace
(``trace_gradients(model, x[:1], x[1:], labels=y)``, one forward + one backward) gives the metric's
per-token scores at the ``S - 1`` predicting positions; the calibrated importance of a unit is their
mean over every calibration token: ``mlp [L, N]``, ``heads [L, H]``. The labels ``y`` are, by default
(``labels="text"``), the text's own next tokens (the language-modelling loss); ``labels="dense"``
uses the dense model's greedy predictions, as the paper's oracle does. Text labels were chosen by
measurement: on SmolLM2 (16 x 128 WikiText-2 valid tokens, KL from the dense model on 4 other
windows, best head structure) they gave 3.29 / 2.13 / 1.09 at ratios 0.3 / 0.5 / 0.7 against
3.41 / 2.16 / 1.15 for dense labels. A plausible reason: a confident dense prediction has a
near-zero gradient, so dense labels average over the few uncertain tokens only.

**Masks** at several ratios come from the same scores (:mod:`attrsparse.deploy.allocation`).

**Sparsity directory** (``attrsparse calibrate --out DIR``), written atomically:

* ``static.safetensors``: ``scores.mlp [L, N]``, ``scores.heads [L, H]`` (float32) and per ratio
  ``masks.<ratio>.mlp [L, N]``, ``masks.<ratio>.heads [L, H]`` (bool);
* ``static.json`` (written last): format, model spec and fingerprint, unit structure, metric,
  labels, calibration source, the sha256 of ``static.safetensors``, and per ratio the allocation,
  executed ratios and per-layer counts.

:func:`load_static_policy` (``make_policy("static:DIR", ratio)``) returns a
:class:`CalibratedStaticPolicy`; a missing, corrupt or mismatched file is a :class:`UserError`.
A ratio the file does not hold is derived from the stored scores when it uses ``uniform``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.architectures import UnitMap, accelerator_tag, model_device, unit_map
from ..core.errors import UserError, check_ratio
from ..core.io import atomic_save_tensors, atomic_write_json, load_tensors, sha256_file, stable_hash
from ..scores.base import Metric, get_metric, register_metric
from ..policies.base import StaticPolicy, model_logits
from ..core.trace import to_ids, trace_gradients
from ..core.units import UnitMasks, UnitScores
from ..selectors import allocation as alloc

FORMAT = "attrsparse-static/1"
JSON_NAME, TENSORS_NAME = "static.json", "static.safetensors"
LABELS = ("dense", "text")
_UNIT_FIELDS = [f.name for f in dataclasses.fields(UnitMap) if f.name not in
                ("layer_modules", "down_modules", "out_modules", "attn_in_modules", "mlp_in_modules")]


@dataclass
class CalibratedScores:
    """Mean per-token importance over ``tokens`` calibration tokens: ``mlp [L, N]``, ``heads [L, H]``."""

    scores: UnitScores
    tokens: int
    metric: str
    labels: str
    head_reduction: str = "sum"


def weights_fingerprint(model: nn.Module) -> str:
    """Identity of a model's structure and weights that does not depend on its dtype (float32 and
    bfloat16 copies agree): unit structure, parameter count, bf16-rounded sums of three tensors."""
    units = unit_map(model)
    params = list(model.parameters())
    probe = [f"{float(p.detach().to(torch.bfloat16).double().sum()):.9g}"
             for p in (params[0], params[len(params) // 2], params[-1])]
    return stable_hash([units.model_type, units.num_layers, units.mlp_size, units.num_heads,
                        units.num_kv_heads, units.head_dim, sum(p.numel() for p in params), probe])


def _sequence_sums(model, metric: Metric, seq: torch.Tensor, labels: str, head_reduction: str):
    """Per-sequence sums of the per-token scores: (mlp ``[L, N]``, heads ``[L, H]``) float64, CPU."""
    prompt, target = seq[:1], seq[1:]
    y = None
    if labels == "dense":
        with torch.no_grad():
            y = model_logits(model, seq[:-1].unsqueeze(0), None)[0].argmax(-1)
    trace = trace_gradients(model, prompt, target, labels=y).row(0)
    scores = metric.from_model(model, prompt, target, trace, head_reduction=head_reduction)
    return scores.mlp.double().sum(0).cpu(), scores.heads.double().sum(0).cpu()


def calibrate(model: nn.Module, sequences: list[torch.Tensor], metric: str = "corrected_gxo",
              labels: str = "text", head_reduction: str = "sum", progress: bool = False,
              parts_dir: Path | None = None, ctx=None) -> CalibratedScores | None:
    """Mean per-token scores of ``metric`` over ``sequences`` (1-D id tensors, >= 2 tokens each).

    With ``parts_dir`` every sequence's score sums are written there (one safetensors file per
    sequence, keyed by its ids and the settings) and reused by a re-run, and under ``torchrun``
    the sequences are sharded round-robin over the ranks (:mod:`attrsparse.distributed`): rank 0
    adds the parts in sequence order, so the result is bitwise the single-process one; the other
    ranks return None.
    """
    m = get_metric(metric)
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
        from ..core.distributed import init_distributed

        ctx = ctx or init_distributed(model_device(model))
        settings = [weights_fingerprint(model), m.name, labels, head_reduction]
        if accelerator_tag(model):
            settings.append(accelerator_tag(model))
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


# -- the sparsity directory --------------------------------------------------------------------

def _key(ratio: float) -> str:
    return f"{ratio:g}"


def check_same_model(model: nn.Module, want_units: dict, want_model: dict, name: str, verb: str) -> None:
    """UserError unless ``model`` has the units (``want_units``, see :func:`_units_dict`) and the
    weights (``want_model["fingerprint"]``) a sparsity or predictor file was ``verb`` for."""
    have = _units_dict(unit_map(model))
    core = ("model_type", "num_layers", "mlp_size", "num_heads", "num_kv_heads", "head_dim")
    diff = [k for k in dict.fromkeys(core + tuple(want_units)) if k in have and want_units.get(k) != have[k]]
    if diff:
        raise UserError(f"{name} was {verb} for another model ("
                        + ", ".join(f"{k} {want_units.get(k)} != {have[k]}" for k in diff) + ")")
    fingerprint = want_model.get("fingerprint")
    if fingerprint and fingerprint != weights_fingerprint(model):
        raise UserError(f"{name} was {verb} on different weights (fingerprint mismatch; "
                        f"model {want_model.get('spec', '?')})")


def _units_dict(units: UnitMap) -> dict:
    return {name: getattr(units, name) for name in _UNIT_FIELDS}


def save_static(out: str | Path, model: nn.Module, cal: CalibratedScores,
                chosen: dict[float, tuple[UnitMasks, dict]], meta: dict | None = None) -> dict:
    """Write (or extend) the sparsity directory ``out``; returns the JSON written."""
    out = Path(out)
    units = unit_map(model)
    try:
        existing = _read_json(out / JSON_NAME) if (out / JSON_NAME).exists() else None
    except UserError:
        existing = None  # a corrupt file is replaced
    tensors = (load_tensors(out / TENSORS_NAME) or {}) if existing else {}
    fingerprint = weights_fingerprint(model)
    same = existing is not None and existing.get("model", {}).get("fingerprint") == fingerprint \
        and existing.get("metric") == cal.metric and existing.get("labels") == cal.labels \
        and existing.get("calibration") == (meta or {}).get("calibration")
    entries = dict(existing.get("ratios", {})) if same else {}
    if not same:
        tensors = {}
    tensors["scores.mlp"], tensors["scores.heads"] = cal.scores.mlp.float(), cal.scores.heads.float()
    for ratio, (masks, record) in chosen.items():
        tensors[f"masks.{_key(ratio)}.mlp"] = masks.mlp.bool()
        tensors[f"masks.{_key(ratio)}.heads"] = masks.heads.bool()
        entries[_key(ratio)] = record
    doc = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "model": {**(meta or {}).get("model", {}), "fingerprint": fingerprint},
           "units": _units_dict(units), "metric": cal.metric, "labels": cal.labels,
           "head_reduction": cal.head_reduction, "calibration_tokens": cal.tokens,
           **{k: v for k, v in (meta or {}).items() if k != "model"},
           "ratios": dict(sorted(entries.items(), key=lambda kv: float(kv[0])))}
    atomic_save_tensors(out / TENSORS_NAME, tensors)
    doc["tensors_sha256"] = sha256_file(out / TENSORS_NAME)  # ties the two files together
    atomic_write_json(out / JSON_NAME, doc)
    return doc


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no sparsity file {path} (write one with `attrsparse calibrate --out DIR`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"sparsity file {path} is unreadable or corrupt ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path} is not an attrsparse sparsity file (format {FORMAT} expected)")
    return doc


def _sparsity_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path.parent if path.name in (JSON_NAME, TENSORS_NAME) else path


def read_static(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(json, tensors)`` of a sparsity directory, checked for completeness and shapes."""
    folder = _sparsity_dir(path)
    doc = _read_json(folder / JSON_NAME)
    if not (folder / TENSORS_NAME).exists():
        raise UserError(f"sparsity directory {folder} lacks {TENSORS_NAME}")
    tensors = load_tensors(folder / TENSORS_NAME)
    if tensors is None:
        raise UserError(f"{folder / TENSORS_NAME} is unreadable or corrupt")
    if doc.get("tensors_sha256") not in (None, sha256_file(folder / TENSORS_NAME)):
        raise UserError(f"{folder / TENSORS_NAME} does not belong to {JSON_NAME} (changed or partly "
                        "written); recalibrate")
    try:
        u = doc["units"]
        shapes = {"mlp": (u["num_layers"], u["mlp_size"]), "heads": (u["num_layers"], u["num_heads"])}
        names = ["scores.mlp", "scores.heads"] + [f"masks.{k}.{p}" for k in doc["ratios"] for p in ("mlp", "heads")]
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{folder / JSON_NAME} is incomplete (units or ratios missing)") from None
    for name in names:
        if name not in tensors:
            raise UserError(f"{folder / TENSORS_NAME} lacks '{name}'")
        if tuple(tensors[name].shape) != shapes[name.rsplit(".", 1)[1]]:
            raise UserError(f"{folder / TENSORS_NAME}: '{name}' has shape {tuple(tensors[name].shape)}, "
                            f"expected {shapes[name.rsplit('.', 1)[1]]}")
    return doc, tensors


class CalibratedStaticPolicy(StaticPolicy):
    """A :class:`StaticPolicy` read from a sparsity directory; checks the model it runs on."""

    def __init__(self, path: str, ratio: float, masks: UnitMasks, doc: dict):
        super().__init__(f"static:{path}", ratio, masks)
        self.doc = doc
        self.entry = doc["ratios"].get(_key(ratio), {})
        self._checked: set[int] = set()

    def check_model(self, model: nn.Module) -> None:
        """UserError unless ``model`` has the units and weights the masks were calibrated on."""
        if id(model) in self._checked:
            return
        check_same_model(model, self.doc["units"], self.doc.get("model", {}), self.name, "calibrated")
        device = next(model.parameters()).device
        self.masks = UnitMasks(self.masks.mlp.to(device), self.masks.heads.to(device))
        self._checked.add(id(model))

    def prepare(self, model, calibration=None) -> None:
        self.check_model(model)

    def forward(self, model, ids, attention_mask=None, **model_kwargs):
        self.check_model(model)
        return super().forward(model, ids, attention_mask, **model_kwargs)

    def describe(self) -> dict:
        return {**super().describe(), "metric": self.doc.get("metric"),
                "allocation": self.entry.get("allocation", "uniform"),
                "executed_ratio": self.entry.get("executed_ratio")}


def load_static_policy(path: str | Path, ratio: float | None = None) -> CalibratedStaticPolicy:
    """The static policy at ``ratio`` from a sparsity directory (or its ``static.json``)."""
    doc, tensors = read_static(path)
    available = sorted(float(k) for k in doc["ratios"])
    if ratio is None:
        if len(available) != 1:
            raise UserError(f"{path} holds ratios {', '.join(f'{r:g}' for r in available)}; choose one with --ratio")
        ratio = available[0]
    ratio = check_ratio(ratio)
    key = _key(ratio)
    if key in doc["ratios"]:
        masks = UnitMasks(tensors[f"masks.{key}.mlp"].bool(), tensors[f"masks.{key}.heads"].bool())
    elif all(e.get("allocation") == "uniform" for e in doc["ratios"].values()):
        try:
            units = UnitMap(**{k: doc["units"][k] for k in _UNIT_FIELDS})
        except (KeyError, TypeError):
            raise UserError(f"{path}: the unit description is incomplete; recalibrate") from None
        scores = UnitScores(tensors["scores.mlp"].float(), tensors["scores.heads"].float())
        head_power = next(iter(doc["ratios"].values()), {}).get("head_power", alloc.HEAD_POWER)
        masks = alloc.uniform_masks(scores, ratio, units, head_power=head_power)
        doc = {**doc, "ratios": {**doc["ratios"], key: {"requested_ratio": ratio, "allocation": "uniform",
                                                        **alloc.describe_masks(masks, units)}}}
    else:
        raise UserError(f"{path} has no masks at ratio {ratio:g} (available: "
                        f"{', '.join(f'{r:g}' for r in available)}); calibrate that ratio")
    return CalibratedStaticPolicy(str(path), ratio, masks, doc)


def run_calibration(model: nn.Module, tokenizer, out: str | Path, *, ratios, metric: str = "corrected_gxo",
                    allocation: str = "uniform", calib: str = "wikitext2", n_sequences: int = 32,
                    seq_len: int = 128, search_sequences: int = 2, labels: str = "text",
                    head_power: float = alloc.HEAD_POWER, spec: str | None = None,
                    data: str | None = None, progress: bool = True) -> dict:
    """Calibrate, choose masks at ``ratios`` and write the sparsity directory ``out``.

    Scores already stored in ``out`` for the same model, metric, labels and calibration are
    reused (a rerun with more ratios costs no tracing).
    """
    from ..data.calibration import calibration_sequences

    seqs = calibration_sequences(tokenizer, calib, n_sequences, seq_len, data=data)
    calibration = {"source": calib, "n_sequences": len(seqs), "seq_len": seq_len,
                   "tokens_hash": stable_hash([s.tolist() for s in seqs])}
    cal = None
    json_path = Path(out) / JSON_NAME
    if json_path.exists():
        try:
            doc, tensors = read_static(out)
            if (doc.get("model", {}).get("fingerprint") == weights_fingerprint(model)
                    and doc.get("metric") == get_metric(metric).name and doc.get("labels") == labels
                    and doc.get("calibration") == calibration):
                cal = CalibratedScores(UnitScores(tensors["scores.mlp"], tensors["scores.heads"]),
                                       doc["calibration_tokens"], doc["metric"], labels)
        except UserError:
            cal = None  # unreadable or foreign: recompute and overwrite
    if cal is None:
        cal = calibrate(model, seqs, metric, labels=labels, progress=progress, parts_dir=Path(out) / "parts")
        if cal is None:  # a non-main rank under torchrun: rank 0 chooses the masks and writes
            return None
    chosen = static_masks(model, cal.scores, ratios, allocation, search_sequences=seqs[:search_sequences],
                          head_power=head_power, progress=progress)
    return save_static(out, model, cal, chosen, {"model": {"spec": spec}, "calibration": calibration})


# -- reachable by name: a registered selector that calibrates when a policy is prepared -------

_CALIBRATED: dict[tuple, CalibratedScores] = {}


def _cached_calibration(model: nn.Module, sequences: list[torch.Tensor]) -> CalibratedScores:
    key = (weights_fingerprint(model), stable_hash([to_ids(s).tolist() for s in sequences]))
    if key not in _CALIBRATED:
        _CALIBRATED[key] = calibrate(model, sequences)
    return _CALIBRATED[key]


class CalibratingStaticPolicy(StaticPolicy):
    """``static_gxo`` in task evaluations: calibrates corrected GxO in :meth:`prepare`, then one
    uniform static mask at the ratio (deployable: no labels, no per-token work)."""

    needs_calibration = True

    def __init__(self, ratio: float):
        super().__init__("static_gxo", ratio)

    def prepare(self, model, calibration=None) -> None:
        if not calibration:
            raise UserError("static_gxo: the static mask needs calibration sequences")
        cal = _cached_calibration(model, list(calibration))
        masks = alloc.uniform_masks(cal.scores, self.ratio, unit_map(model))
        device = next(model.parameters()).device
        self.masks = UnitMasks(masks.mlp.to(device), masks.heads.to(device))


@register_metric
class StaticGxO(Metric):
    name = "static_gxo"
    description = ("deployable: static masks, corrected GxO averaged over calibration tokens, "
                   "parameter budget with whole key/value groups (attrsparse calibrate)")
    kind = "selector"
    single_pass = False

    def masks_for_many(self, scores, ratios, policy="per_layer", *, model=None, trace=None, units=None,
                       **context) -> list[UnitMasks]:
        """The static masks repeated at each of the T target tokens (``[T, L, *]``)."""
        try:
            from ..selectors.thresholds import resolve_calibration
        except ImportError:  # pragma: no cover - the field baselines' helper is optional
            resolve_calibration = None
        seqs = context.get("calibration")
        if seqs is None and resolve_calibration is not None:
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

    def masks_for(self, scores, ratio, policy="per_layer", **context) -> UnitMasks:
        return self.masks_for_many(scores, [ratio], policy, **context)[0]

    def make_policy(self, ratio: float, **_) -> CalibratingStaticPolicy:
        return CalibratingStaticPolicy(ratio)
