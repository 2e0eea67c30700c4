"""``attrsparse.sparsify``: the one verb that makes a stock Hugging Face model sparse.

::

    sp = attrsparse.sparsify(model, "teal", ratio=0.5, tokenizer=tok)   # a selector by name
    sp = attrsparse.sparsify(model, "runs/static", ratio=0.5)           # an artifact directory
    sp = attrsparse.sparsify(model, masks)                             # UnitMasks [L,*] or [T,L,*]

    with sp:                        # plain forward calls / model.generate run sparse
        model(input_ids)
    sp.executed.param               # parameter-weighted ratio really executed (every call inside)
    sp.read.as_dict()               # weights read per token: read ratio (mean, p10, p90), total
    out = sp.forward(ids)           # logits + executed masks (any policy, oracle included)
    res = sp.generate(["Why is the sky blue?"], tokenizer=tok)  # fastest deployable runtime

What a spec may be is decided by one parser (:func:`attrsparse.policies.make_policy`): ``dense``, a
selector name (oracle, online or static selectors), ``static:DIR`` / ``predictor:DIR`` or a
directory whose manifest says what it holds. Policies that need calibration (``teal``, ``cats``,
``wanda``, ``static_gxo``) are calibrated here on ``calibration`` sequences or, given a
``tokenizer``, on WikiText-2 *valid* windows (:data:`CALIBRATION`, disjoint from every evaluation).
Masks go through :func:`attrsparse.core.masking.apply_masks` (static masks and the paper's
per-token schedules), policies through :meth:`~attrsparse.policies.SparsityPolicy.apply`, decoding
through :func:`attrsparse.deploy.runtime.generate`.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from ..core.accounting import ReadRatio
from ..core.errors import UserError
from ..core.masking import apply_masks
from ..core.units import ExecutedRatio, UnitMasks, unit_map
from ..data.calibration import calibration_sequences
from ..policies import PolicyOutput, SparsityPolicy, account, make_policy
from .runtime import GenerationResult, generate

CALIBRATION = {"source": "wikitext2", "n_sequences": 16, "seq_len": 128}


class Sparsified:
    """The handle :func:`sparsify` returns (see the module docstring)."""

    def __init__(self, model: nn.Module, policy: SparsityPolicy | None, masks: UnitMasks | None = None,
                 mask_prefill: bool = False):
        self.model, self.policy, self.masks, self.mask_prefill = model, policy, masks, mask_prefill
        self.executed = ExecutedRatio()
        self.read = ReadRatio.of(model)
        self._stack: ExitStack | None = None
        self._handle = None

    @property
    def name(self) -> str:
        return "masks" if self.policy is None else self.policy.name

    def __enter__(self) -> "Sparsified":
        stack = ExitStack()
        try:
            if self.policy is None:
                self._handle = stack.enter_context(apply_masks(self.model, self.masks, self.mask_prefill))
            else:
                applied = stack.enter_context(self.policy.apply(self.model))

                def after(module, args, kwargs, output):
                    ids = kwargs.get("input_ids", args[0] if args else None)
                    ids = kwargs.get("inputs_embeds") if ids is None else ids
                    b, q = ids.shape[:2]
                    mask = kwargs.get("attention_mask")
                    real = None if mask is None else mask[:, -q:].bool()
                    masks, read = applied.last_masks(b, q), applied.last_read(b, q)
                    real = None if real is None else real.to(read.device)
                    self.executed = self.executed.add(account(masks, real, applied.units))
                    self.read.add(read if real is None else read[real])

                stack.callback(self.model.register_forward_hook(after, with_kwargs=True).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self.executed = self.executed.add(self._handle.executed)
            self._handle = None
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **model_kwargs) -> PolicyOutput:
        """Logits of ``ids [B, S]`` under the sparsity, and the masks that ran (accounted)."""
        if self.policy is None:
            raise UserError("sparsify(model, masks): run the model inside `with` (masks follow the "
                            "paper's per-token schedule)")
        out = self.policy.forward(self.model, ids, attention_mask, **model_kwargs)
        real = None if attention_mask is None else attention_mask[:, -ids.shape[1]:].bool().to(out.read.device)
        self.executed = self.executed.add(account(out.masks, real, unit_map(self.model)))
        self.read.add(out.read if real is None else out.read[real])
        return out

    def generate(self, prompts, tokenizer=None, **options) -> GenerationResult:
        """Greedy decoding under the sparsity (:func:`attrsparse.deploy.runtime.generate`: sliced
        static models, gathered kernels for predictors, rules applied per call for online policies)."""
        sparsity = self.masks if self.policy is None else self.policy
        return generate(self.model, prompts, sparsity, tokenizer=tokenizer, **options)


def sparsify(model: nn.Module, spec, ratio: float | None = None, *, calibration=None, tokenizer=None,
             mask_prefill: bool = False, **options) -> Sparsified:
    """Make ``model`` sparse with ``spec`` at ``ratio`` (see the module docstring).

    Args:
        spec: ``"dense"``, a selector name, an artifact spec or directory, a prepared
            :class:`~attrsparse.policies.SparsityPolicy`, or :class:`~attrsparse.core.units.UnitMasks`.
        ratio: target ratio in (0, 1] (an artifact holding one ratio needs none).
        calibration: 1-D id tensors for policies that calibrate (default: WikiText-2 valid windows
            through ``tokenizer``).
        mask_prefill: masks only: mask the whole prompt with step 0's masks.
        options: for the policy (``scope``, ``head_reduction``, ``seed``, ``layer_ratios``, ``head_power``).
    """
    if isinstance(spec, UnitMasks):
        return Sparsified(model, None, spec, mask_prefill)
    if isinstance(spec, SparsityPolicy):  # prepared by the caller
        return Sparsified(model, spec)
    policy = make_policy(str(spec), ratio, **options)
    if policy.needs_calibration and calibration is None:
        if tokenizer is None:
            raise UserError(f"{policy.name} calibrates on text: pass calibration= (id sequences) or tokenizer=")
        calibration = calibration_sequences(tokenizer, **CALIBRATION)
    policy.prepare(model, calibration)
    return Sparsified(model, policy)
