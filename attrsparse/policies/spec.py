"""The one parser of sparsity specs, and the registry of what a spec can name.

A spec is:

* ``"dense"``;
* a selector name (``"teal"``, ``"corrected_gxo"``, ``"progressive_gxo"``, ...; see
  ``attrsparse selectors``): the policy of the selector's mode;
* ``"<kind>:PATH"`` with a registered artifact kind (``static:DIR`` and ``channel:DIR`` from
  ``attrsparse calibrate``, ``predictor:DIR`` from ``attrsparse train-predictor``);
* a path to an artifact directory: its kind is read from the manifest the command that made it
  wrote (:mod:`attrsparse.core.artifacts`), never guessed from the files in it.

:func:`make_policy` is the one place specs become policies; the user-facing verb is
:func:`attrsparse.sparsify`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..core.artifacts import MANIFEST, artifact_kind
from ..core.errors import UserError, check_ratio
from ..selectors.base import get_selector, list_selectors
from .base import DensePolicy, SparsityPolicy
from .channel import ChannelPolicy, load_channel_policy
from .online import OnlinePolicy
from .oracle import OraclePolicy
from .predictor import load_predictor_policy
from .static import SelectorStaticPolicy, load_static_policy

#: artifact kinds a spec may name: ``kind -> loader(path, ratio, **options)``
ARTIFACTS: dict[str, Callable[..., SparsityPolicy]] = {
    "static": lambda path, ratio, **_: load_static_policy(path, ratio),
    "predictor": lambda path, ratio, layer_ratios=None, head_power=None, **_:
        load_predictor_policy(path, ratio, layer_ratios, head_power),
    "channel": lambda path, ratio, **_: load_channel_policy(path, ratio),
}


def register_artifact(kind: str, loader: Callable[..., SparsityPolicy]) -> None:
    """Make ``"<kind>:PATH"`` (and directories whose manifest says ``kind``) a spec."""
    ARTIFACTS[kind] = loader


def parse_spec(spec: str) -> tuple[str, str]:
    """``(kind, value)``: ``("dense", "dense")``, ``("selector", name)`` or ``(artifact kind, path)``."""
    text = str(spec).strip()
    if not text:
        raise UserError("empty sparsity spec")
    if text == "dense":
        return "dense", "dense"
    if text in list_selectors():
        return "selector", text
    kind, sep, rest = text.partition(":")
    if sep and kind in ARTIFACTS:
        if not rest:
            raise UserError(f"'{text}' names no path (use {kind}:PATH)")
        return kind, rest
    path = Path(text).expanduser()
    if path.exists():
        kind = artifact_kind(path if path.is_dir() else path.parent)
        if kind is None:
            raise UserError(f"{text} has no {MANIFEST} saying what it holds; name it static:{text} or "
                            f"predictor:{text}, or write it again with the command that made it")
        if kind not in ARTIFACTS:
            raise UserError(f"{text} holds a '{kind}' artifact, which is not a sparsity "
                            f"(known: {', '.join(sorted(ARTIFACTS))})")
        return kind, text
    if sep and not text.startswith(("/", ".", "~")):
        raise UserError(f"unknown sparsity prefix '{kind}:' (use {', '.join(k + ':PATH' for k in ARTIFACTS)})")
    if "/" in text or text.startswith((".", "~")):
        raise UserError(f"{text}: no such file or directory")
    return "selector", get_selector(text).name


def make_policy(spec: str, ratio: float | None = None, **options) -> SparsityPolicy:
    """The policy a spec names at ``ratio`` (see the module docstring; an artifact that holds one
    ratio needs none). ``options`` go to the policy: ``scope`` and ``head_reduction`` (oracle),
    ``seed`` (``random``), ``layer_ratios`` and ``head_power`` (predictors)."""
    ratio = None if ratio is None else check_ratio(ratio)
    kind, value = parse_spec(spec)
    if kind == "dense":
        return DensePolicy("dense", 1.0)
    if kind in ARTIFACTS:
        return ARTIFACTS[kind](value, ratio, **options)
    selector = get_selector(value)
    if ratio is None:
        raise UserError(f"{selector.name} needs a ratio in (0, 1]")
    if ratio >= 1.0:
        return DensePolicy(selector.name, 1.0)
    if selector.mode == "online":
        return OnlinePolicy(selector, ratio)
    if selector.mode == "channel":
        return ChannelPolicy(selector.name, ratio, selector=selector)
    if selector.mode == "static":
        return SelectorStaticPolicy(selector, ratio, **{k: v for k, v in options.items() if k in ("seed", "scope")})
    return OraclePolicy(selector, ratio, **options)
