"""lm-evaluation-harness model type ``attrsparse``: a stock Hugging Face model under a sparsity policy.

Importing this module registers ``attrsparse`` in lm-eval's model registry. lm-eval 0.4 finds a
plugin model type only once it is imported, so the command line is lm-eval's own CLI started
through this module (same arguments as ``lm_eval``)::

    python -m attrsparse.evaluation.lm_eval_model --model attrsparse \\
        --model_args pretrained=smollm2-135m,selector=teal,ratio=0.5 \\
        --tasks arc_easy_local --include_path docs/lm_eval/tasks --limit 50 --device cpu

and in Python::

    import attrsparse.evaluation.lm_eval_model, lm_eval
    lm_eval.simple_evaluate(model="attrsparse", model_args="pretrained=...,selector=wina,ratio=0.5",
                            tasks=[...])

``model_args`` (besides HFLM's own, e.g. ``batch_size``):

* ``pretrained``: anything :func:`attrsparse.load_model` takes (packaged alias such as
  ``smollm2-135m``, checkpoint directory, hub id, ``.gguf``), or a loaded model with ``tokenizer``;
* ``selector`` (default ``dense``) and ``ratio``: :func:`attrsparse.policies.make_policy`
  (any registered metric, selector or baseline, ``static:PATH``, ``predictor:PATH``); ratio 1.0 is
  the dense model, identical to ``--model hf``;
* ``scope`` (top-k scope of attribution selectors: ``per_layer``, ``global``, ``threshold``; the
  old name ``policy`` is accepted),
  ``head_reduction``, ``seed`` (``random``);
* ``calib`` (``wikitext2`` default, ``truthfulqa`` or a text file), ``calib_sequences`` (16),
  ``calib_len`` (128): calibration of ``teal``, ``cats``, ``wanda``;
* ``dtype`` (``float32``).

Every forward pass runs through the policy (:meth:`SparsityPolicy.forward` for log-likelihoods;
the same hooks during ``generate`` for online, static and dense policies), and the masks it really
executed are accounted over the real tokens (:func:`attrsparse.policies.account`):
:attr:`AttrsparseLM.executed`, logged and written to the results' ``config.attrsparse``. Online rules
on the unit inputs also report ``executed_ratio_with_decision_cost`` (gate/up and query/key/value
rows that had to run before the rule could skip a unit). Oracle selectors need a backward pass per
sequence, so they run with gradients enabled inside lm-eval's loop; they cannot generate.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..core.accounting import ReadRatio
from ..core.errors import UserError
from ..core.models import load_model
from ..core.units import ExecutedRatio, unit_map
from ..data.calibration import calibration_sequences
from ..deploy.sparsify import sparsify
from ..policies import account, make_policy, with_decision_cost

log = logging.getLogger("lm_eval.models.attrsparse")  # shown with lm-eval's own logging


def right_padding_mask(ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Real positions of rows right-padded with ``pad_id`` (lm-eval pads log-likelihood batches with
    0 and does not pass their lengths): ``[B, S]`` bool, up to each row's last non-pad token (at
    least one). A real trailing ``pad_id`` token is counted as padding: accounting only."""
    real = ids != pad_id
    last = ids.shape[1] - 1 - real.flip(-1).int().argmax(-1)
    length = torch.where(real.any(-1), last + 1, torch.ones_like(last))
    return torch.arange(ids.shape[1], device=ids.device) < length[:, None]


@register_model("attrsparse")
class AttrsparseLM(HFLM):
    """HFLM whose forward passes run under an attrsparse sparsity policy (module docstring)."""

    def __init__(self, pretrained="smollm2-135m", selector: str = "dense", ratio: float = 1.0,
                 scope: str = "per_layer", head_reduction: str = "sum", seed: int = 0,
                 calib: str = "wikitext2", calib_sequences: int = 16, calib_len: int = 128,
                 dtype: str = "float32", device: str | None = None, tokenizer=None, **kwargs):
        scope = kwargs.pop("policy", scope)  # the old name of the scope
        if isinstance(pretrained, str):
            model, tokenizer = load_model(pretrained, dtype=dtype, device=_device(device))
        elif tokenizer is None:
            raise UserError("a loaded model as `pretrained` needs its `tokenizer`")
        else:
            model = pretrained
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.attrsparse_model = str(pretrained) if isinstance(pretrained, str) else type(model).__name__
        self.units = unit_map(self.model)
        self.sparsity = make_policy(str(selector), ratio, scope=scope, head_reduction=head_reduction,
                                    seed=seed)
        calibration = None
        if getattr(self.sparsity, "needs_calibration", False):
            calibration = calibration_sequences(self.tokenizer, str(calib), int(calib_sequences),
                                                int(calib_len))
        self.sparsity.prepare(self.model, calibration)
        self.executed = ExecutedRatio()
        self.read = ReadRatio.of(self.model)
        self._accounting = True

    # -- accounting --------------------------------------------------------------------------
    def _account(self, out, real: torch.Tensor | None) -> None:
        if not self._accounting:
            return
        real = None if real is None else real.to(out.read.device)
        self.executed = self.executed.add(account(out.masks, real, self.units))
        self.read.add(out.read if real is None else out.read[real])

    def executed_summary(self) -> dict:
        """The policy, and the ratios really executed so far over the real (unpadded) tokens."""
        out = {**self.sparsity.describe(), "model": self.attrsparse_model, **self.executed.as_dict(),
               **self.read.as_dict()}
        read = with_decision_cost(out, self.units, self.sparsity.prepaid_params(self.units)) \
            if self.executed.tokens else None
        if read is not None:
            out["executed_ratio_with_decision_cost"] = read
        return out

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        summary = self.executed_summary()
        log.info("attrsparse: %s", summary)
        return {**info, "attrsparse": summary}

    def _detect_batch_size(self, *args, **kwargs):
        self._accounting = False  # probe batches are not part of the evaluation
        try:
            return super()._detect_batch_size(*args, **kwargs)
        finally:
            self._accounting = True

    # -- forward passes ----------------------------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits ``[B, S, V]`` of right-padded ``inps [B, S]`` under the policy (float32)."""
        if attn_mask is not None or labels is not None:
            raise UserError("the attrsparse model type supports causal (decoder-only) models only")
        # the oracle attributes each position by a backward pass w.r.t. the unit activations
        grad = torch.enable_grad() if self.sparsity.mode == "oracle" else torch.no_grad()
        with grad:
            out = self.sparsity.forward(self.model, inps, None)
        self._account(out, right_padding_mask(inps))
        return out.logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with sparsify(self.model, self.sparsity) as applied:  # the policy on every call of generate
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        if self._accounting:
            self.executed = self.executed.add(applied.executed)
            self.read.values += applied.read.values
        return out


def _device(device: str | None) -> str:
    """The requested device, or the CPU when CUDA is requested (lm-eval's default) but absent."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        chosen = "cuda" if torch.cuda.is_available() else "cpu"
        if device is not None:
            log.warning("attrsparse: device %s is not available; using %s", device, chosen)
        return chosen
    return str(device)


if __name__ == "__main__":  # lm-eval's command line with the `attrsparse` model type registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
