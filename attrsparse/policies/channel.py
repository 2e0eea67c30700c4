"""Channel policies: the input channels of every decoder linear decided from the live input.

A :class:`ChannelPolicy` applies a calibrated :class:`~attrsparse.selectors.channels.ChannelRuleSet`
through :class:`~attrsparse.core.channel_hooks.ChannelHooks`; its outputs carry the weights every
position read (no unit masks: these rules skip input channels, not units). It calibrates itself in
:meth:`ChannelPolicy.prepare` (selectors by name) or reads a channel file.

**Channel file** (``attrsparse calibrate --selector <rule> --out DIR``): ``channels.safetensors``
holds, per calibrated read ratio ``r``, every site rule's tensors under ``r<ratio>/``;
``channels.json`` the selector, the model fingerprint and units, the calibration source and per
ratio what was measured on the calibration text; ``attrsparse.json`` (the manifest, kind
``channel``) is written last. A file for another model is refused with one line.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.artifacts import check_same_model
from ..core.channel_hooks import ChannelHooks
from ..core.errors import UserError, check_ratio
from ..core.io import load_tensors, sha256_file
from ..core.sites import site_map
from ..selectors.base import Selector
from ..selectors.channels import ChannelRuleSet
from .base import Applied, SparsityPolicy

FORMAT = "attrsparse-channels/1"
JSON_NAME, TENSORS_NAME = "channels.json", "channels.safetensors"


def ratio_prefix(ratio: float) -> str:
    return f"r{ratio:g}/"


class _ChannelApplied(Applied):
    def __init__(self, model, hooks: ChannelHooks):
        super().__init__(model)
        self.hooks = hooks
        self.decoder = site_map(model).decoder_params

    def last_masks(self, batch, q):
        return None

    def last_read(self, batch, q):
        return (self.hooks.read / self.decoder).view(batch, q)


class ChannelPolicy(SparsityPolicy):
    """Input-channel sparsity on every decoder linear, by a calibrated rule."""

    mode = "channel"
    prefix_cache = True

    def __init__(self, name: str, ratio: float, rule: ChannelRuleSet | None = None,
                 selector: Selector | None = None, doc: dict | None = None):
        super().__init__(name, ratio)
        self.rule, self.selector, self.doc = rule, selector, doc or {}
        self.needs_calibration = rule is None

    def prepare(self, model, calibration=None) -> None:
        if self.rule is None:
            if not calibration:
                raise UserError(f"{self.name}: channel thresholds need calibration sequences")
            self.rule = self.selector.channel_rules(model, list(calibration), [self.ratio])[self.ratio]
        elif self.doc:
            check_same_model(model, self.doc.get("units", {}), self.doc.get("model", {}), self.name, "calibrated")
        self.rule.bind(model)

    @contextmanager
    def apply(self, model):
        if self.rule is None:
            raise RuntimeError(f"{self.name}: thresholds are not calibrated; call prepare() first")
        if self.rule._smap is None or self.rule._smap is not site_map(model):
            self.prepare(model)
        with ChannelHooks(model, self.rule) as hooks, self.rule.live_state(model):
            yield _ChannelApplied(model, hooks)

    def describe(self) -> dict:
        meta = self.rule.meta if self.rule is not None else {}
        return {**super().describe(), **{k: meta[k] for k in ("allocation", "calibration_read_ratio") if k in meta}}


def read_channels(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(json, tensors)`` of a channel directory, checked for completeness."""
    folder = Path(path).expanduser()
    folder = folder.parent if folder.name in (JSON_NAME, TENSORS_NAME) else folder
    try:
        doc = json.loads((folder / JSON_NAME).read_text())
    except FileNotFoundError:
        raise UserError(f"no channel file {folder / JSON_NAME} (write one with `attrsparse calibrate "
                        "--selector <rule> --out DIR`)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"channel file {folder / JSON_NAME} is unreadable or corrupt ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{folder / JSON_NAME} is not an attrsparse channel file ({FORMAT} expected)")
    tensors = load_tensors(folder / TENSORS_NAME)
    if tensors is None:
        raise UserError(f"{folder / TENSORS_NAME} is missing, unreadable or corrupt")
    if doc.get("tensors_sha256") != sha256_file(folder / TENSORS_NAME):
        raise UserError(f"{folder / TENSORS_NAME} does not belong to {JSON_NAME}; calibrate again")
    return doc, tensors


def load_channel_policy(path: str | Path, ratio: float | None = None) -> ChannelPolicy:
    """The :class:`ChannelPolicy` at ``ratio`` from a channel directory."""
    doc, tensors = read_channels(path)
    available = sorted(float(r) for r in doc.get("ratios", {}))
    if ratio is None:
        if len(available) != 1:
            raise UserError(f"{path} holds ratios {', '.join(f'{r:g}' for r in available)}; choose one with --ratio")
        ratio = available[0]
    ratio = check_ratio(ratio)
    if ratio not in available:
        raise UserError(f"{path} has no rule at read ratio {ratio:g} (available: "
                        f"{', '.join(f'{r:g}' for r in available)}); calibrate that ratio")
    prefix = ratio_prefix(ratio)
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    rule = ChannelRuleSet.from_tensors(doc["selector"], sub, doc["ratios"][f"{ratio:g}"])
    return ChannelPolicy(f"channel:{path}", ratio, rule, doc=doc)
