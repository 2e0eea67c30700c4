"""Sparsity policies: how the units of every forward pass are chosen, for evaluation and serving.

A *policy* is a sparsity mode applied to a model at one ratio. It runs a padded batch of token ids
through the model under unit masks and returns the logits together with the masks it really
executed (:meth:`SparsityPolicy.forward`), and it can apply itself to plain forward calls of the
model (:meth:`SparsityPolicy.apply`: ``model.generate``, a KV cache), so every evaluation
(multiple choice by log-likelihood, perplexity, generation, lm-evaluation-harness) runs any policy
and accounts it honestly. Every position of every sequence is masked, prompt included.

Modes (``SparsityPolicy.mode``):

* ``dense``: all units.
* ``oracle`` (the paper's protocol): per-position masks from an attribution selector, scored along
  the dense model's own greedy prediction at each position (never the ground truth); needs a dense
  pass and a backward pass per sequence, so it is a quality bound, not a deployable mode
  (:mod:`.oracle`).
* ``online`` (TEAL, CATS, WINA): masks decided inside the pass from the live unit inputs
  (:mod:`.online`).
* ``static`` (Wanda-style, calibrated attribution masks): one fixed mask ``[L, *]`` (:mod:`.static`).
* ``predictor``: masks predicted from each layer's input hidden state (:mod:`.predictor`).
* ``channel`` (TEAL, WINA, CATS, R-Sparse, SCAP, ``attr_channel``): input channels of every decoder
  linear skipped from the live input by calibrated thresholds (:mod:`.channel`).

Build one from a spec string with :func:`attrsparse.policies.make_policy`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..core.accounting import unit_read
from ..core.architectures import model_device
from ..core.errors import check_ratio
from ..core.trace import model_logits
from ..core.units import ExecutedRatio, UnitMasks, executed_ratio, unit_map

MODES = ("dense", "oracle", "online", "static", "predictor", "channel")


@dataclass
class PolicyOutput:
    """``logits [B, S, V]`` (float32), the executed unit keep-masks ``mlp [B, S, L, N]``,
    ``heads [B, S, L, H]`` (None for channel rules, which keep input channels, not units) and
    ``read [B, S]``, the fraction of the decoder-linear weights each position read
    (:mod:`attrsparse.core.accounting`); padding positions included (the caller drops them)."""

    logits: torch.Tensor
    masks: UnitMasks | None
    read: torch.Tensor


class Applied:
    """What :meth:`SparsityPolicy.apply` yields: the masks and the reads of the last forward call."""

    def __init__(self, model: nn.Module, prepaid: tuple[int, int, bool] | None = None):
        self.model = model
        self.units = unit_map(model)
        self.device = model_device(model)
        self.prepaid = prepaid

    def last_masks(self, batch: int, q: int) -> UnitMasks | None:
        """Unit masks ``[B, q, L, *]`` of the last forward call over ``q`` new positions."""
        return UnitMasks.dense(self.units, batch, q, device=self.device)

    def last_read(self, batch: int, q: int) -> torch.Tensor:
        """Read fraction ``[B, q]`` of the last call (the unit masks' parameters, plus an online
        rule's decision cost)."""
        return unit_read(self.last_masks(batch, q), self.model, self.prepaid)


class SparsityPolicy:
    """Chooses the units of each forward pass at one target ratio (see the module docstring)."""

    mode: str = "dense"
    deployable: bool = True  # masks decided before the skipped work, without labels
    prefix_cache: bool = False  # forward() takes ``cache``/``position_ids`` (shared contexts)
    needs_calibration: bool = False  # prepare() needs calibration sequences

    def __init__(self, name: str = "dense", ratio: float = 1.0):
        self.name = name
        self.ratio = check_ratio(ratio)

    def prepare(self, model: nn.Module, calibration: list[torch.Tensor] | None = None) -> None:
        """Calibrate on ``calibration`` sequences (1-D id tensors); default: nothing to do."""

    @contextmanager
    def apply(self, model: nn.Module) -> Iterator[Applied]:
        """Run every forward call of ``model`` inside the block under this policy."""
        yield Applied(model)

    @torch.no_grad()
    def forward(self, model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **model_kwargs) -> PolicyOutput:
        """Logits of ``ids [B, S]`` under this policy's masks. Policies with ``prefix_cache`` accept
        ``cache``, ``use_cache`` and ``position_ids`` in ``model_kwargs`` (then
        ``attention_mask`` covers the cached positions too; logits and masks cover ``ids`` only)."""
        with self.apply(model) as applied:
            logits = model_logits(model, ids, attention_mask, **model_kwargs)
            masks, read = applied.last_masks(*ids.shape), applied.last_read(*ids.shape)
        return PolicyOutput(logits, masks, read)

    def describe(self) -> dict:
        return {"selector": self.name, "mode": self.mode, "requested_ratio": self.ratio,
                "deployable": self.deployable}

    def prepaid_params(self, units) -> tuple[int, int, bool] | None:
        """What must run before this policy can skip a unit: (parameters of a skipped MLP unit,
        of a skipped head, whether every key/value head runs); None when masks are decided before
        the unit's work (static, predictor). Online rules on the down-projection input must compute
        the unit's gate/up rows first."""
        return None


def with_decision_cost(executed: dict, units, prepaid: tuple[int, int, bool] | None) -> float | None:
    """Parameter-weighted ratio really *read*: the executed ratio plus what an online rule had to
    compute for the units it then skipped (exact from the mean unit ratios, since every layer has
    the same size). ``executed`` holds the keys of :meth:`ExecutedRatio.as_dict`."""
    if prepaid is None:
        return None
    mlp_prepaid, head_prepaid, all_kv = prepaid
    extra = (1 - executed["executed_ratio_mlp"]) * units.mlp_size * mlp_prepaid \
        + (1 - executed["executed_ratio_heads"]) * units.num_heads * head_prepaid
    if all_kv:
        extra += (1 - executed["executed_ratio_kv_heads"]) * units.num_kv_heads * units.kv_group_params
    return executed["executed_ratio"] + extra / units.layer_params


class DensePolicy(SparsityPolicy):
    """All units; the reference every other policy is compared with."""

    mode = "dense"
    prefix_cache = True


def account(masks: UnitMasks | None, attention_mask: torch.Tensor | None, units) -> ExecutedRatio:
    """Executed ratio of masks ``[B, S, L, *]`` over the real (unpadded) positions (nothing for
    channel rules, which have no unit masks)."""
    if masks is None:
        return ExecutedRatio()
    if attention_mask is None:
        return executed_ratio(masks, units)
    keep = attention_mask.bool()
    return executed_ratio(UnitMasks(masks.mlp[keep], masks.heads[keep]), units)
