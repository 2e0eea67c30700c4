"""``teal_units``: a unit-space stand-in for TEAL (Liu et al., 2024, "Training-Free Activation Sparsity in
Large Language Models"); the faithful rule on every linear's input channels is ``teal``
(:mod:`.channels`).

TEAL zeroes low-magnitude entries of the *hidden-state input of every linear layer*: a channel j of
the input x is kept when ``|x_j| > tau``, one threshold per weight matrix, calibrated from histograms
of dense activations so that the matrix reaches its target sparsity; a greedy block-wise search
then allocates sparsity across the matrices of a block.

Here, on the paper's units:

* MLP unit i of layer l is kept when ``|x_i| > tau_mlp[l]``, x = the down-projection input (TEAL's
  rule for ``down_proj``); head h when ``||o_h||_2 > tau_head[l]``, o = the head's slice of the
  output-projection input (TEAL thresholds each of those channels separately; a head is our unit).
* One threshold per layer and unit kind, calibrated on dense activations of WikiText-2 valid
  windows (:data:`~attrsparse.selectors.thresholds.CALIBRATION`) so that exactly the requested
  fraction of that layer's calibration values exceeds it (exact quantile, not a histogram bin).
  Every layer gets the same ratio: no greedy allocation.
* The inputs of q/k/v and gate/up (the normed hidden state) are *not* sparsified: those savings of
  TEAL are outside the unit space. The reverse also holds: a unit skipped by a rule on the
  down-projection input still needed its gate/up rows to decide, and a skipped head its query and
  key/value rows. The unit accounting (``executed_ratio``) counts them as skipped, as for every
  selector; the policy's ``prepaid_params`` and
  :func:`attrsparse.policies.base.with_decision_cost` give what must really run, which evaluations,
  ``compare`` and the lm-eval model report beside it.

In the oracle sweep, scores are the same statistics along the dense label and the masks apply the
calibrated thresholds (the tokenizer saved beside the model gives the calibration text); without a
reachable tokenizer the thresholds are per-layer quantiles over each question's own tokens.
In task evaluations (``make_policy``) the rule runs online on the live, already sparsified inputs.
"""

from __future__ import annotations

from ..core.units import UnitScores
from .base import register_selector
from .thresholds import ThresholdSelector


@register_selector
class Teal(ThresholdSelector):
    name = "teal_units"
    description = ("unit-space stand-in for TEAL (not the paper's rule): |x| of the down-projection input and ||o_h|| above per-layer "
                   "thresholds calibrated on dense WikiText-2 activations")

    def scores(self, model, prompt_ids, target_ids, trace, head_reduction="sum", **options):
        return UnitScores(trace.mlp_x.abs(), trace.head_x.norm(dim=-1))  # the trace holds x and o already
