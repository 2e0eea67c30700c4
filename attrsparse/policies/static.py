"""Static policies: one fixed mask ``mlp [L, N]``, ``heads [L, H]`` at every position.

* :class:`StaticPolicy`: masks given;
* :class:`SelectorStaticPolicy`: masks chosen by a static selector (``random``, ``wanda``,
  ``static_gxo``) when the policy is prepared;
* :class:`CalibratedStaticPolicy`: masks read from a sparsity directory written by
  ``attrsparse calibrate`` (:func:`load_static_policy`, ``make_policy("static:DIR", ratio)``).

**Sparsity directory** (written atomically by :mod:`attrsparse.deploy.calibrate`):

* ``static.safetensors``: ``scores.mlp [L, N]``, ``scores.heads [L, H]`` (float32) and per ratio
  ``masks.<ratio>.mlp [L, N]``, ``masks.<ratio>.heads [L, H]`` (bool);
* ``static.json``: format, model spec and fingerprint, unit structure, metric, labels, calibration
  source, the sha256 of ``static.safetensors``, and per ratio the allocation, executed ratios and
  per-layer counts;
* ``attrsparse.json`` (written last): the manifest, kind ``static``
  (:mod:`attrsparse.core.artifacts`).

A missing, corrupt or mismatched file is a :class:`UserError`. A ratio the file does not hold is
derived from the stored scores when it uses ``uniform``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..core.architectures import model_device
from ..core.artifacts import check_same_model
from ..core.errors import UserError, check_ratio
from ..core.hooks import UnitHooks
from ..core.io import load_tensors, sha256_file
from ..core.units import UnitMap, UnitMasks, UnitScores
from ..selectors import allocation as alloc
from ..selectors.base import Selector
from ..selectors.budget import HEAD_POWER
from .base import Applied, SparsityPolicy

FORMAT = "attrsparse-static/1"
JSON_NAME, TENSORS_NAME = "static.json", "static.safetensors"


def ratio_key(ratio: float) -> str:
    """How a ratio names its masks in the sparsity directory (``0.5``)."""
    return f"{ratio:g}"


class _StaticApplied(Applied):
    def __init__(self, model, masks: UnitMasks):
        super().__init__(model)
        self.masks = masks

    def last_masks(self, batch, q):
        return UnitMasks(self.masks.mlp.expand(batch, q, *self.masks.mlp.shape),
                         self.masks.heads.expand(batch, q, *self.masks.heads.shape))


class StaticPolicy(SparsityPolicy):
    """One fixed mask ``mlp [L, N]``, ``heads [L, H]`` at every position."""

    mode = "static"
    prefix_cache = True

    def __init__(self, name: str, ratio: float, masks: UnitMasks | None = None):
        super().__init__(name, ratio)
        self.masks = masks

    def _ready(self, model: nn.Module) -> UnitMasks:
        if self.masks is None:
            raise RuntimeError(f"{self.name}: static masks are not prepared; call prepare() first")
        return self.masks

    @contextmanager
    def apply(self, model):
        masks = self._ready(model)
        with UnitHooks(model) as hooks:
            hooks.mlp_mult, hooks.head_mult = masks.mlp, masks.heads
            yield _StaticApplied(model, masks)


class SelectorStaticPolicy(StaticPolicy):
    """The masks of a static :class:`~attrsparse.selectors.base.Selector`, chosen in :meth:`prepare`
    (on the calibration sequences when the selector needs them; lazily otherwise)."""

    def __init__(self, selector: Selector, ratio: float, **options):
        super().__init__(selector.name, ratio)
        self.selector, self.options = selector, options
        self.needs_calibration = selector.needs_calibration

    def prepare(self, model, calibration=None) -> None:
        self.masks = self.selector.static_masks(model, calibration, self.ratio, **self.options)

    def _ready(self, model):
        if self.masks is None and not self.needs_calibration:
            self.prepare(model)
        return super()._ready(model)


def read_static_json(path: Path) -> dict:
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
    doc = read_static_json(folder / JSON_NAME)
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
        self.entry = doc["ratios"].get(ratio_key(ratio), {})
        self._checked: set[int] = set()

    def check_model(self, model: nn.Module) -> None:
        """UserError unless ``model`` has the units and weights the masks were calibrated on."""
        if id(model) in self._checked:
            return
        check_same_model(model, self.doc["units"], self.doc.get("model", {}), self.name, "calibrated")
        device = model_device(model)
        self.masks = UnitMasks(self.masks.mlp.to(device), self.masks.heads.to(device))
        self._checked.add(id(model))

    def prepare(self, model, calibration=None) -> None:
        self.check_model(model)

    def _ready(self, model):
        self.check_model(model)
        return super()._ready(model)

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
    key = ratio_key(ratio)
    if key in doc["ratios"]:
        masks = UnitMasks(tensors[f"masks.{key}.mlp"].bool(), tensors[f"masks.{key}.heads"].bool())
    elif all(e.get("allocation") == "uniform" for e in doc["ratios"].values()):
        try:
            units = UnitMap(**{k: doc["units"][k] for k in UnitMap.structure_fields()})
        except (KeyError, TypeError):
            raise UserError(f"{path}: the unit description is incomplete; recalibrate") from None
        scores = UnitScores(tensors["scores.mlp"].float(), tensors["scores.heads"].float())
        head_power = next(iter(doc["ratios"].values()), {}).get("head_power", HEAD_POWER)
        masks = alloc.uniform_masks(scores, ratio, units, head_power=head_power)
        doc = {**doc, "ratios": {**doc["ratios"], key: {"requested_ratio": ratio, "allocation": "uniform",
                                                        **alloc.describe_masks(masks, units)}}}
    else:
        raise UserError(f"{path} has no masks at ratio {ratio:g} (available: "
                        f"{', '.join(f'{r:g}' for r in available)}); calibrate that ratio")
    return CalibratedStaticPolicy(str(path), ratio, masks, doc)
