"""The selector interface and registry: every rule that turns scores or live activations into
keep-masks, by name.

A selector has a ``kind`` (what it is, for listings: ``attribution`` = a score of
:mod:`attrsparse.scores` under top-k, ``selector`` = one of ours, ``baseline`` = the field's) and a
``mode`` (how it runs on tasks, see :mod:`attrsparse.policies`):

* ``oracle``: per-position masks from scores along the dense model's own predictions
  (:meth:`Selector.scores` then :meth:`Selector.masks_for`);
* ``online``: masks decided inside the pass from the live unit inputs (:meth:`Selector.online_rule`);
* ``static``: one fixed mask chosen before any pass (:meth:`Selector.static_masks`).

In the paper's sweep every selector works under the oracle protocol: :meth:`Selector.scores` along
the label (None for selectors that choose masks directly), then :meth:`Selector.masks_for_many`
at every ratio. Every registered score is registered here too, as its top-k
(:class:`ScoreSelector`); ``get_metric``/``list_metrics``/``register_metric`` are the documented
names of the same registry.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..core.registry import lookup
from ..core.units import UnitMasks, UnitScores
from ..scores import PAPER_SCORES, Score, get_score, list_scores, register_score
from .topk import select


class Selector:
    """One selection rule. Subclasses set ``name``, ``description``, ``kind``, ``mode`` and the
    methods of their mode (module docstring)."""

    name: str = ""
    description: str = ""
    kind: str = "selector"  # "attribution", "selector" or "baseline"
    mode: str = "oracle"  # "oracle", "online" or "static"
    single_pass: bool = True  # masks from one trace (MC1 under per-candidate masks runs only these)
    is_ig: bool = False  # Integrated Gradients (costly; limited by --ig-questions)
    needs_calibration: bool = False  # its policy's prepare() needs calibration sequences

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction: str = "sum",
               **options) -> UnitScores | None:
        """Per-token scores ``[T, L, *]`` along the label, or None when :meth:`masks_for` chooses
        without them."""
        return None

    def masks_for(self, scores: UnitScores | None, ratio: float, scope: str = "per_layer",
                  **context) -> UnitMasks:
        """Keep-masks ``[T, L, *]`` at ``ratio`` (context: model, prompt_ids, target_ids, trace,
        units, labels, head_reduction, calibration, tokenizer)."""
        return self.masks_for_many(scores, [ratio], scope, **context)[0]

    def masks_for_many(self, scores: UnitScores | None, ratios, scope: str = "per_layer",
                       **context) -> list[UnitMasks]:
        """:meth:`masks_for` at several ratios (selectors batch them)."""
        return [self.masks_for(scores, r, scope, **context) for r in ratios]

    def static_masks(self, model: nn.Module, calibration: list[torch.Tensor] | None, ratio: float,
                     **options) -> UnitMasks:
        """``mode == "static"``: the masks ``[L, *]`` at ``ratio``, on the model's device."""
        raise NotImplementedError(f"{self.name} has no static masks")

    def online_rule(self, model: nn.Module, calibration: list[torch.Tensor] | None,
                    ratio: float) -> "OnlineRule":
        """``mode == "online"``: the rule that decides from the live inputs at ``ratio``."""
        raise NotImplementedError(f"{self.name} has no online rule")

    def prepaid_params(self, units) -> tuple[int, int, bool] | None:
        """What must run before the online rule can skip a unit: (parameters of a skipped MLP
        unit, of a skipped head, whether every key/value head runs); None when nothing does."""
        return None


class OnlineRule:
    """What an online selector decides inside a pass (see :class:`attrsparse.core.hooks.UnitHooks`)."""

    def mlp_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Down-projection input ``x [B, q, N]`` -> keep ``[B, q, N]`` (bool)."""
        raise NotImplementedError

    def head_keep(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        """Head outputs ``o [B, q, H, D]`` -> keep ``[B, q, H]`` (bool)."""
        raise NotImplementedError

    @contextmanager
    def live_state(self, model: nn.Module) -> Iterator[None]:
        """State the rule reads during a pass (e.g. captured activations); default: none."""
        yield None


class TopKSelector(Selector):
    """A selector whose sweep masks are the top-k of its scores (:func:`~.topk.select`)."""

    def masks_for(self, scores, ratio, scope="per_layer", **context):
        return select(scores, ratio, scope)


class ScoreSelector(TopKSelector):
    """A score of :mod:`attrsparse.scores` under top-k (the paper's oracle)."""

    kind = "attribution"
    mode = "oracle"

    def __init__(self, score: Score):
        self.score = score
        self.name, self.description = score.name, score.description
        self.single_pass, self.is_ig = score.single_pass, score.is_ig

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        return self.score.from_model(model, prompt_ids, target_ids, trace, head_reduction=head_reduction,
                                     **options)


_REGISTRY: dict[str, Selector] = {}


def _add(selector: Selector) -> None:
    if not selector.name or selector.name in _REGISTRY:
        raise ValueError(f"selector name {selector.name!r} is empty or taken")
    _REGISTRY[selector.name] = selector


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Class decorator: register an instance under ``cls.name``."""
    _add(cls())
    return cls


def register_metric(cls):
    """Register a :class:`~attrsparse.scores.Score` (as a score and as its top-k selector) or a
    :class:`Selector` class."""
    if issubclass(cls, Score):
        register_score(cls)
        _add(ScoreSelector(get_score(cls.name)))
        return cls
    return register_selector(cls)


def get_selector(name: str) -> Selector:
    return lookup(_REGISTRY, name, "metric")


def list_selectors(kind: str | None = None) -> list[str]:
    return [n for n, s in _REGISTRY.items() if kind is None or s.kind == kind]


for _name in list_scores():  # the scores registered so far (the paper's, and variants)
    _add(ScoreSelector(get_score(_name)))

RECOMMENDED = "progressive_gxo"  # the best selector we have (see docs/results)
ALIASES = {"paper": PAPER_SCORES, "recommended": (RECOMMENDED,),
           "ablation": ("corrected_gxo", "budget_gxo", "progressive_uniform_gxo", RECOMMENDED)}


def resolve_selector_names(names) -> list[str]:
    """Expand aliases (``paper``, ``recommended``, ``ablation``) and check each name."""
    out: list[str] = []
    for name in names:
        for resolved in ALIASES.get(name, (name,)):
            if resolved not in out:
                out.append(get_selector(resolved).name)
    return out


# the documented names of the same registry
get_metric, list_metrics, resolve_metric_names = get_selector, list_selectors, resolve_selector_names
