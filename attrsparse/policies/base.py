"""Sparsity policies: how the units of every forward pass are chosen, for evaluation and serving.

A policy runs a padded batch of token ids through the model under unit masks and returns the
logits together with the masks it really executed, so every evaluation (multiple choice by
log-likelihood, perplexity, lm-evaluation-harness) runs any policy and accounts it honestly.
Every position of every sequence is masked, prompt included (no dense prefill).

Modes (``SparsityPolicy.mode``):

* ``dense``: all units.
* ``oracle`` (the paper's protocol): per-position masks from an attribution metric, scored along
  the dense model's own greedy prediction at each position (never the ground truth); needs a dense
  pass and a backward pass per sequence, so it is a quality bound, not a deployable mode.
* ``online`` (TEAL, CATS): masks decided inside the pass from the live unit inputs by thresholds
  calibrated beforehand (:meth:`SparsityPolicy.prepare`).
* ``static`` (Wanda-style, calibrated attribution masks): one fixed mask ``[L, *]``.
* ``predictor``: masks predicted from each layer's input hidden state (:mod:`attrsparse.deploy`).

Build one with :func:`make_policy`; a metric chooses its mode through :meth:`Metric.make_policy`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..core.architectures import model_device, unit_map
from ..core.errors import UserError, check_ratio
from ..core.hooks import UnitHooks
from ..core.units import ExecutedRatio, UnitMasks, executed_ratio

MODES = ("dense", "oracle", "online", "static", "predictor")


@dataclass
class PolicyOutput:
    """``logits [B, S, V]`` (float32) and the executed keep-masks ``mlp [B, S, L, N]``,
    ``heads [B, S, L, H]`` (padding positions included; the caller drops them)."""

    logits: torch.Tensor
    masks: UnitMasks


class SparsityPolicy:
    """Chooses the units of each forward pass at one target ratio (see the module docstring)."""

    mode: str = "dense"
    deployable: bool = True  # masks decided before the skipped work, without labels
    prefix_cache: bool = False  # forward() takes ``cache``/``position_ids`` (shared contexts)

    def __init__(self, name: str = "dense", ratio: float = 1.0):
        self.name = name
        self.ratio = check_ratio(ratio)

    def prepare(self, model: nn.Module, calibration: list[torch.Tensor] | None = None) -> None:
        """Calibrate on ``calibration`` sequences (1-D id tensors); default: nothing to do."""

    def forward(self, model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **model_kwargs) -> PolicyOutput:
        """Logits of ``ids [B, S]`` under this policy's masks. Policies with ``prefix_cache`` accept
        ``cache``, ``use_cache`` and ``position_ids`` in ``model_kwargs`` (then
        ``attention_mask`` covers the cached positions too; logits and masks cover ``ids`` only)."""
        raise NotImplementedError

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
    return executed["executed_ratio"] + extra / (units.mlp_params_per_layer + units.attn_params_per_layer)


def model_logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 **model_kwargs) -> torch.Tensor:
    """Plain forward (no cache unless ``model_kwargs`` give one): ``[B, S, V]`` float32, on the
    model's device (where ``ids`` and ``attention_mask`` are moved)."""
    model_kwargs.setdefault("use_cache", False)
    device = model_device(model)
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    return model(input_ids=ids.to(device), attention_mask=attention_mask, **model_kwargs).logits.float()


def _dense_masks(model: nn.Module, batch: int, seq: int) -> UnitMasks:
    return UnitMasks.dense(unit_map(model), batch, seq, device=model_device(model))


class DensePolicy(SparsityPolicy):
    """All units; the reference every other policy is compared with."""

    mode = "dense"
    prefix_cache = True

    @torch.no_grad()
    def forward(self, model, ids, attention_mask=None, **model_kwargs):
        return PolicyOutput(model_logits(model, ids, attention_mask, **model_kwargs),
                            _dense_masks(model, *ids.shape))


class StaticPolicy(SparsityPolicy):
    """One fixed mask ``mlp [L, N]``, ``heads [L, H]`` at every position."""

    mode = "static"
    prefix_cache = True

    def __init__(self, name: str, ratio: float, masks: UnitMasks | None = None):
        super().__init__(name, ratio)
        self.masks = masks

    @torch.no_grad()
    def forward(self, model, ids, attention_mask=None, **model_kwargs):
        if self.masks is None:
            raise RuntimeError(f"{self.name}: static masks are not prepared; call prepare() first")
        with UnitHooks(model) as hooks:
            hooks.mlp_mult, hooks.head_mult = self.masks.mlp, self.masks.heads
            logits = model_logits(model, ids, attention_mask, **model_kwargs)
        b, s = ids.shape
        return PolicyOutput(logits, UnitMasks(self.masks.mlp.expand(b, s, *self.masks.mlp.shape),
                                              self.masks.heads.expand(b, s, *self.masks.heads.shape)))


class OnlinePolicy(SparsityPolicy):
    """Masks decided in the pass by :meth:`mlp_keep` / :meth:`head_keep` from the live inputs."""

    mode = "online"
    prefix_cache = True

    def mlp_keep(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x [B, q, N]`` -> keep ``[B, q, N]`` (bool)."""
        raise NotImplementedError

    def head_keep(self, layer: int, o: torch.Tensor) -> torch.Tensor:
        """``o [B, q, H, D]`` -> keep ``[B, q, H]`` (bool)."""
        raise NotImplementedError

    def install(self, hooks: UnitHooks) -> None:
        hooks.mlp_rule, hooks.head_rule = self.mlp_keep, self.head_keep

    @contextmanager
    def hooks(self, model: nn.Module) -> Iterator[UnitHooks]:
        """Unit hooks with this policy's rules installed, for any forward calls in the block
        (subclasses add the state their rules read)."""
        with UnitHooks(model) as hooks:
            self.install(hooks)
            yield hooks

    @torch.no_grad()
    def forward(self, model, ids, attention_mask=None, **model_kwargs):
        with self.hooks(model) as hooks:
            logits = model_logits(model, ids, attention_mask, **model_kwargs)
            masks = UnitMasks(torch.stack([m.bool() for m in hooks.rule_mlp], dim=2),
                              torch.stack([m.bool() for m in hooks.rule_heads], dim=2))
        return PolicyOutput(logits, masks)


def account(masks: UnitMasks, attention_mask: torch.Tensor | None, units) -> ExecutedRatio:
    """Executed ratio of masks ``[B, S, L, *]`` over the real (unpadded) positions."""
    if attention_mask is None:
        return executed_ratio(masks, units)
    keep = attention_mask.bool()
    return executed_ratio(UnitMasks(masks.mlp[keep], masks.heads[keep]), units)


def make_policy(selector: str, ratio: float, **options) -> SparsityPolicy:
    """Build the policy for ``selector`` at ``ratio``.

    ``selector`` is ``dense``, any registered metric or selector name (it picks its own mode via
    ``Metric.make_policy``), ``static:PATH`` (masks written by ``attrsparse calibrate``) or
    ``predictor:PATH`` (predictors written by ``attrsparse train-predictor``). ``options`` go to the
    policy (e.g. ``policy="per_layer"``, ``head_reduction``).
    """
    ratio = check_ratio(ratio)
    if selector == "dense" or ratio >= 1.0 and selector.split(":")[0] not in ("static", "predictor"):
        return DensePolicy("dense" if selector == "dense" else selector, 1.0)
    if ":" in selector:
        kind, path = selector.split(":", 1)
        if kind == "static":
            from ..deploy.calibrate import load_static_policy

            return load_static_policy(path, ratio)
        if kind == "predictor":
            from ..deploy.predictor import load_predictor_policy

            return load_predictor_policy(path, ratio)
        raise UserError(f"unknown selector prefix '{kind}:' (use static:PATH or predictor:PATH)")
    from ..scores import get_metric

    return get_metric(selector).make_policy(ratio, **options)
