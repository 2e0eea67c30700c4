"""``attrsparse calibrate``: calibrated static masks written to a sparsity directory.

The scores (mean per-token importance over calibration text) and the masks at several ratios
come from :mod:`attrsparse.selectors.static` and :mod:`attrsparse.selectors.allocation`; the
directory's format is :mod:`attrsparse.policies.static`, which reads it. :func:`run_calibration`
reuses scores already stored for the same model, metric, labels and calibration (a rerun with
more ratios costs no tracing); :func:`save_static` writes the tensors, then ``static.json``, then
the manifest (kind ``static``), each atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from ..core.artifacts import write_manifest
from ..core.errors import UserError
from ..core.fingerprint import model_fingerprint
from ..core.io import atomic_save_tensors, atomic_write_json, load_tensors, sha256_file, stable_hash
from ..core.units import UnitMasks, UnitScores, unit_map
from ..data.calibration import calibration_sequences
from ..policies.channel import FORMAT as CHANNEL_FORMAT
from ..policies.channel import JSON_NAME as CHANNEL_JSON
from ..policies.channel import TENSORS_NAME as CHANNEL_TENSORS
from ..policies.channel import ratio_prefix, read_channels
from ..policies.static import FORMAT, JSON_NAME, TENSORS_NAME, ratio_key, read_static, read_static_json
from ..selectors.base import get_selector
from ..selectors.budget import HEAD_POWER
from ..selectors.channel_calibration import attr_options, calibrate_channels_shown, same_attr
from ..selectors.static import CalibratedScores, calibrate, static_masks


def save_static(out: str | Path, model: nn.Module, cal: CalibratedScores,
                chosen: dict[float, tuple[UnitMasks, dict]], meta: dict | None = None) -> dict:
    """Write (or extend) the sparsity directory ``out``; returns the JSON written."""
    out = Path(out)
    units = unit_map(model)
    try:
        existing = read_static_json(out / JSON_NAME) if (out / JSON_NAME).exists() else None
    except UserError:
        existing = None  # a corrupt file is replaced
    tensors = (load_tensors(out / TENSORS_NAME) or {}) if existing else {}
    fingerprint = model_fingerprint(model)
    same = existing is not None and existing.get("model", {}).get("fingerprint") == fingerprint \
        and existing.get("metric") == cal.metric and existing.get("labels") == cal.labels \
        and existing.get("calibration") == (meta or {}).get("calibration")
    entries = dict(existing.get("ratios", {})) if same else {}
    if not same:
        tensors = {}
    tensors["scores.mlp"], tensors["scores.heads"] = cal.scores.mlp.float(), cal.scores.heads.float()
    for ratio, (masks, record) in chosen.items():
        tensors[f"masks.{ratio_key(ratio)}.mlp"] = masks.mlp.bool()
        tensors[f"masks.{ratio_key(ratio)}.heads"] = masks.heads.bool()
        entries[ratio_key(ratio)] = record
    doc = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "model": {**(meta or {}).get("model", {}), "fingerprint": fingerprint},
           "units": units.structure(), "metric": cal.metric, "labels": cal.labels,
           "head_reduction": cal.head_reduction, "calibration_tokens": cal.tokens,
           **{k: v for k, v in (meta or {}).items() if k != "model"},
           "ratios": dict(sorted(entries.items(), key=lambda kv: float(kv[0])))}
    atomic_save_tensors(out / TENSORS_NAME, tensors)
    doc["tensors_sha256"] = sha256_file(out / TENSORS_NAME)  # ties the two files together
    atomic_write_json(out / JSON_NAME, doc)
    write_manifest(out, "static", model, (meta or {}).get("model", {}).get("spec"), format=FORMAT)
    return doc


def _refuse_other(out, doc: dict, model: nn.Module, metric: str, labels: str, calibration: dict,
                  spec: str | None) -> None:
    """The one-line refusal to write over the sparsity files of another configuration."""
    theirs = doc.get("model", {})
    differ = []
    if theirs.get("fingerprint") != model_fingerprint(model):
        differ.append(f"model {theirs.get('spec') or '?'} there, {spec or 'this model'} now")
    differ += [f"{name} {a} there, {b} now" for name, a, b in (
        ("metric", doc.get("metric"), metric), ("labels", doc.get("labels"), labels)) if a != b]
    if doc.get("calibration") != calibration:
        differ.append("calibration text or sizes differ")
    raise UserError(f"{out} holds static masks of another configuration ({'; '.join(differ)}); choose "
                    "another --out, or pass --overwrite to replace them")


def run_calibration(model: nn.Module, tokenizer, out: str | Path, *, ratios, metric: str = "corrected_gxo",
                    allocation: str = "uniform", calib: str = "wikitext2", n_sequences: int = 32,
                    seq_len: int = 128, search_sequences: int = 2, labels: str = "text",
                    head_power: float = HEAD_POWER, spec: str | None = None,
                    data: str | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Calibrate, choose masks at ``ratios`` and write the sparsity directory ``out``.

    Scores already stored in ``out`` for the same model, metric, labels and calibration are
    reused (a rerun with more ratios costs no tracing). Sparsity files of another model, metric,
    labels or calibration in ``out`` are a :class:`UserError` before any work, unless
    ``overwrite`` (then they are replaced).
    """
    seqs = calibration_sequences(tokenizer, calib, n_sequences, seq_len, data=data)
    calibration = {"source": calib, "n_sequences": len(seqs), "seq_len": seq_len,
                   "tokens_hash": stable_hash([s.tolist() for s in seqs])}
    cal = None
    json_path = Path(out) / JSON_NAME
    if json_path.exists():
        try:
            doc, tensors = read_static(out)
        except UserError:
            doc = None  # unreadable or foreign: recompute and overwrite
        if doc is not None and (doc.get("model", {}).get("fingerprint") == model_fingerprint(model)
                                and doc.get("metric") == get_selector(metric).name and doc.get("labels") == labels
                                and doc.get("calibration") == calibration):
            cal = CalibratedScores(UnitScores(tensors["scores.mlp"], tensors["scores.heads"]),
                                   doc["calibration_tokens"], doc["metric"], labels)
        elif doc is not None and not overwrite:  # another configuration's masks: never replaced silently
            _refuse_other(out, doc, model, get_selector(metric).name, labels, calibration, spec)
    if cal is None:
        cal = calibrate(model, seqs, metric, labels=labels, progress=progress, parts_dir=Path(out) / "parts")
        if cal is None:  # a non-main rank under torchrun: rank 0 chooses the masks and writes
            return None
    chosen = static_masks(model, cal.scores, ratios, allocation, search_sequences=seqs[:search_sequences],
                          head_power=head_power, progress=progress)
    return save_static(out, model, cal, chosen, {"model": {"spec": spec}, "calibration": calibration})


# -- input-channel rules: the channel file ----------------------------------------------------------

def _channel_folder_to_extend(out: Path, selector: str, fingerprint: str, calibration: dict,
                             options: dict) -> tuple[dict, dict]:
    """``(json, tensors)`` of the channel directory ``out`` when a new calibration may add ratios to
    it (same model, selector, calibration text and, for ``attr_channel``, options), ``({}, {})``
    when it holds none; another configuration's rules are refused with one line."""
    if not (out / CHANNEL_JSON).exists():
        return {}, {}
    try:
        old, tensors = read_channels(out)
    except UserError:
        old, tensors = None, {}
    if old is None or old.get("selector") != selector or old.get("model", {}).get("fingerprint") != fingerprint:
        raise UserError(f"{out} holds channel rules of another model or selector; choose another --out, "
                        "or pass --overwrite to replace them")
    olds = [e.get("attr") for e in old.get("ratios", {}).values()]
    if selector == "attr_channel" and any(o is not None and not same_attr(o, options) for o in olds):
        raise UserError(f"{out} holds attr_channel rules calibrated with other options; choose another "
                        "--out, or pass --overwrite to replace them")
    if old.get("calibration") != calibration:
        raise UserError(f"{out} holds rules calibrated on other text (or another number or length of windows); "
                        "choose another --out, or pass --overwrite to replace them")
    return old, tensors


def run_channel_calibration(model: nn.Module, tokenizer, out: str | Path, *, selector: str, ratios,
                            calib: str = "wikitext2", n_sequences: int = 16, seq_len: int = 128,
                            data: str | None = None, spec: str | None = None, overwrite: bool = False,
                            progress: bool = True, attr: dict | None = None) -> dict:
    """Calibrate the channel rule ``selector`` at every read ratio and write the channel directory
    ``out`` (:mod:`attrsparse.policies.channel`): tensors, then ``channels.json``, then the manifest.
    ``attr``: options of ``attr_channel`` over its defaults (:func:`~attrsparse.selectors.channel_calibration.attr_options`).
    A directory holding rules of the same configuration keeps its other ratios (a ratio calibrated
    again is replaced); one holding another model's or selector's rules, rules calibrated on other
    text, or ``attr_channel`` rules with other options is refused unless ``overwrite``."""
    out = Path(out)
    fingerprint = model_fingerprint(model)
    if attr and selector != "attr_channel":
        raise UserError(f"attr_channel options were given for the selector '{selector}'")
    with attr_options(attr) as options:
        seqs = calibration_sequences(tokenizer, calib, n_sequences, seq_len, data=data)
        calibration = {"source": calib, "data": data, "n_sequences": len(seqs), "seq_len": seq_len,
                       "tokens_hash": stable_hash([s.tolist() for s in seqs])}
        kept_doc, kept_tensors = ({}, {}) if overwrite else _channel_folder_to_extend(
            out, selector, fingerprint, calibration, options)
        rules = calibrate_channels_shown(model, seqs, selector, ratios, show=progress)
    new = {f"{ratio:g}" for ratio in rules}
    tensors = {k: v for k, v in kept_tensors.items() if k.split("/", 1)[0][1:] not in new}
    entries = {k: v for k, v in kept_doc.get("ratios", {}).items() if k not in new}
    for ratio, rule in rules.items():
        tensors.update({ratio_prefix(ratio) + k: v for k, v in rule.tensors().items()})
        entries[f"{ratio:g}"] = rule.meta
    entries = dict(sorted(entries.items(), key=lambda kv: float(kv[0])))
    atomic_save_tensors(out / CHANNEL_TENSORS, tensors)
    doc = {"format": CHANNEL_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "selector": selector,
           "model": {"spec": spec, "fingerprint": fingerprint}, "units": unit_map(model).structure(),
           "calibration": calibration, "ratios": entries, "tensors_sha256": sha256_file(out / CHANNEL_TENSORS)}
    atomic_write_json(out / CHANNEL_JSON, doc)
    write_manifest(out, "channel", model, spec, selector=selector)
    return doc
