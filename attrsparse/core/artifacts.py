"""Artifact directories: what made them, for which model.

Every command that writes a directory other commands read (``calibrate``, ``train-predictor``,
``export``) records a manifest, ``attrsparse.json``, written last::

    {"kind": "static" | "predictor" | "export" | ..., "format": 1,
     "model": {"fingerprint": ..., "spec": ...}, "units": {...}, "created": ...}

The kind of a directory is read from its manifest (:func:`artifact_kind`), never guessed from the
files in it; :func:`check_same_model` refuses a model other than the one recorded, in one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch import nn

from .errors import UserError
from .fingerprint import model_fingerprint
from .io import atomic_write_json
from .units import unit_map

MANIFEST = "attrsparse.json"
FORMAT = 1
_CORE_UNITS = ("model_type", "num_layers", "mlp_size", "num_heads", "num_kv_heads", "head_dim")


def write_manifest(folder: str | Path, kind: str, model: nn.Module | None = None, spec: str | None = None,
                   **extra) -> dict:
    """Record ``kind`` (and the model's fingerprint and units) in ``folder/attrsparse.json``."""
    doc = {"kind": kind, "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if model is not None:
        doc["model"] = {"fingerprint": model_fingerprint(model), "spec": spec}
        doc["units"] = unit_map(model).structure()
    doc.update(extra)
    atomic_write_json(Path(folder) / MANIFEST, doc)
    return doc


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of ``folder``, None when it has none; a corrupt one is a :class:`UserError`."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is unreadable or corrupt ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        raise UserError(f"{path} is not an attrsparse manifest (no 'kind')")
    return doc


def artifact_kind(folder: str | Path) -> str | None:
    """The kind recorded in ``folder``'s manifest, or None (no manifest)."""
    doc = read_manifest(folder)
    return None if doc is None else doc["kind"]


def check_same_model(model: nn.Module, want_units: dict, want_model: dict, name: str, verb: str) -> None:
    """UserError unless ``model`` has the units (``want_units``, see :meth:`UnitMap.structure`) and the
    weights (``want_model["fingerprint"]``) an artifact was ``verb`` for."""
    have = unit_map(model).structure()
    diff = [k for k in dict.fromkeys(_CORE_UNITS + tuple(want_units)) if k in have and want_units.get(k) != have[k]]
    if diff:
        raise UserError(f"{name} was {verb} for another model ("
                        + ", ".join(f"{k} {want_units.get(k)} != {have[k]}" for k in diff) + ")")
    fingerprint = want_model.get("fingerprint")
    if fingerprint and fingerprint != model_fingerprint(model):
        raise UserError(f"{name} was {verb} on different weights (fingerprint mismatch; "
                        f"model {want_model.get('spec', '?')})")
