"""Evaluate one task under one sparsity policy, with the executed activation ratio beside it.

Every registered task kind runs through :meth:`SparsityPolicy.forward` (teacher-forced logits):

* ``multiple_choice``: each choice is scored by the summed log-probability of its tokens after the
  context (``acc``), and by that sum divided by the choice's length in bytes (``acc_norm``, as in
  lm-evaluation-harness); MC2 items report ``mc2``. All choices of an item form one right-padded
  batch. Measured against the ground truth.
* ``perplexity``: strided windows (``window`` tokens, ``stride`` new tokens scored per window,
  the rest as context), ``ppl = exp(mean NLL)`` over the first ``max_tokens`` tokens.
* ``generation`` (TruthfulQA): greedy answers (chat template when the tokenizer has one) under
  the policy, on a KV cache for policies with ``prefix_cache``; the oracle follows the paper's
  protocol (masks scored along the dense answer, then replayed). BLEU/ROUGE-L against the *dense*
  answer, truthfulness against the references.

The executed ratio counts every real (unpadded) position of every forward pass, context included.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.accounting import ReadRatio, unit_read
from ..core.architectures import model_device
from ..core.decoding import masked_greedy_decode, right_pad
from ..core.errors import UserError
from ..core.finite import check_finite
from ..core.units import ExecutedRatio, UnitMasks, executed_ratio, unit_map
from ..data.prompts import encode_prompt, fit_prompt, greedy_continuation, resolve_template, stop_token_ids
from ..data.tasks import get_task, load_task, mc2_score, mc_correct
from ..data.textmetrics import rouge_l, sentence_bleu, truth_scores
from ..policies import SparsityPolicy, account
from ..policies.base import with_decision_cost


def scored_windows(n: int, window: int, stride: int):
    """The strided windows of a perplexity over ``n`` tokens: ``(begin, end, first)`` with the
    window ``[begin, end)`` run and its tokens ``[first, end)`` scored (never scored before; token 0
    never is). ``stride`` new tokens per window, the rest as context (clipped to ``window - 1``)."""
    if n < 2:
        raise UserError("perplexity needs at least 2 tokens of text")
    stride = max(1, min(stride, window - 1))  # windows overlap: every token has context
    prev_end = 1
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            break


def strided_perplexity(ids: torch.Tensor, window: int, stride: int, window_logits, progress=None) -> dict:
    """``{"ppl", "nll", "n_tokens"}`` of ``ids`` over :func:`scored_windows`, whatever computes the
    logits: ``window_logits(begin, end, first)`` returns ``(logits, start)``, the logits of positions
    ``start, start + 1, ...`` (at least up to ``end - 2``; position i predicts token i + 1)."""
    nll, count = 0.0, 0
    for begin, end, first in scored_windows(ids.numel(), window, stride):
        logits, start = window_logits(begin, end, first)
        logp = torch.log_softmax(logits, dim=-1)[first - start - 1: end - start - 1]
        nll -= float(logp.gather(-1, ids[first:end].view(-1, 1).to(logp.device)).sum())
        count += end - first
        if progress is not None:
            progress.update(1)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "n_tokens": count}


class Evaluator:
    """Runs tasks on one (model, tokenizer) under a policy; accumulates :attr:`executed`.

    Token ids are moved to the model's device as they are encoded; results come back as floats."""

    def __init__(self, model: nn.Module, tokenizer, policy: SparsityPolicy, max_seq_len: int = 512):
        self.model, self.tok, self.policy = model, tokenizer, policy
        self.device = model_device(model)
        self.units = unit_map(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_seq_len = max_seq_len
        self.executed = ExecutedRatio()
        self.read = ReadRatio.of(model)
        self.prefix_cache = policy.prefix_cache  # forward() takes cache/position_ids

    # -- building blocks ---------------------------------------------------------------------
    def logits(self, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy logits ``[B, S, V]`` of right-padded ``seqs``; accounts the real positions."""
        ids, mask = right_pad(seqs, self.pad_id)
        out = self.policy.forward(self.model, ids, mask)
        self._account(out, mask)
        return check_finite(out.logits, self.model, f"the logits under {self.policy.name}"), mask

    def _account(self, out, mask: torch.Tensor | None) -> None:
        """Add a policy output's executed masks and reads over its real positions."""
        self.executed = self.executed.add(account(out.masks, mask, self.units))
        self.read.add(out.read if mask is None else out.read[mask.bool().to(out.read.device)])

    def _encode(self, text: str, special: bool) -> torch.Tensor:
        return self.tok(text, add_special_tokens=special, return_tensors="pt").input_ids[0].to(self.device)

    def choice_logprobs(self, context: str, choices: list[str]) -> list[float]:
        """Summed log-probability of every choice's tokens after ``context``.

        Policies with ``prefix_cache`` run the shared context once and the choices as one batch on
        a copy of its KV cache (the context's masks do not depend on the choice: they are causal);
        the others run every ``context + choice`` sequence in full.
        """
        ctx = self._encode(context, True)
        conts = [self._encode(c, False) for c in choices]
        if any(c.numel() == 0 for c in conts):
            raise UserError(f"empty answer choice in an item with context {context[:60]!r}")
        if self.prefix_cache and ctx.numel() + max(c.numel() for c in conts) <= self.max_seq_len:
            return self._choice_logprobs_cached(ctx, conts)
        seqs = [torch.cat([ctx, cont])[-self.max_seq_len:] for cont in conts]
        logits, _ = self.logits(seqs)
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for row, (seq, cont) in enumerate(zip(seqs, conts)):
            n, t = seq.numel(), min(cont.numel(), seq.numel() - 1)
            pred = logp[row, n - t - 1: n - 1]  # position i predicts token i + 1
            out.append(float(pred.gather(-1, seq[n - t:].view(-1, 1)).sum()))
        return out

    def _choice_logprobs_cached(self, ctx: torch.Tensor, conts: list[torch.Tensor]) -> list[float]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        first = self.policy.forward(self.model, ctx.unsqueeze(0), None, cache=cache, use_cache=True)
        self._account(first, None)
        first_logp = torch.log_softmax(first.logits[0, -1], dim=-1)  # predicts each choice's token 0
        b, c = len(conts), ctx.numel()
        cache.batch_repeat_interleave(b)
        ids, mask = right_pad(conts, self.pad_id)
        full_mask = torch.cat([torch.ones(b, c, dtype=mask.dtype, device=self.device), mask], dim=1)
        positions = (c + torch.arange(ids.shape[1], device=self.device)).expand(b, -1)
        out = self.policy.forward(self.model, ids, full_mask, cache=cache, use_cache=True,
                                  position_ids=positions)
        self._account(out, mask)
        logp = torch.log_softmax(out.logits, dim=-1)
        result = []
        for row, cont in enumerate(conts):
            total = float(first_logp[cont[0]])
            if cont.numel() > 1:
                total += float(logp[row, : cont.numel() - 1].gather(-1, cont[1:].view(-1, 1)).sum())
            result.append(total)
        return check_finite(result, self.model, f"choice log-likelihoods under {self.policy.name}")

    # -- task kinds ----------------------------------------------------------------------------
    def multiple_choice(self, items, scoring: str, progress=None) -> dict:
        acc, acc_norm, mc2 = [], [], []
        for item in items:
            lp = self.choice_logprobs(item.context, item.choices)
            acc.append(mc_correct(lp, item.gold))
            lengths = [max(1, len(c.encode("utf-8"))) for c in item.choices]
            acc_norm.append(mc_correct([x / n for x, n in zip(lp, lengths)], item.gold))
            if scoring == "mc2":
                mc2.append(mc2_score(lp, item.golds))
            if progress is not None:
                progress.update(1)
        result = {"acc": _mean(acc), "acc_stderr": _stderr(acc), "acc_norm": _mean(acc_norm),
                  "n": len(items)}
        if scoring == "mc2":
            result.update(mc2=_mean(mc2), mc2_stderr=_stderr(mc2))
        return result

    def perplexity(self, text: str, max_tokens: int = 4096, window: int = 512, stride: int = 256,
                   progress=None) -> dict:
        ids = self._encode(text, False)[:max_tokens]
        return strided_perplexity(ids, min(window, self.max_seq_len), stride,
                                  lambda begin, end, first: (self.logits([ids[begin:end]])[0][0], begin), progress)

    def generation(self, items, max_new_tokens: int = 32, template: str = "auto", progress=None,
                   truncate: str = "none") -> dict:
        """Greedy answers under the policy vs the dense answers (same prompt and length cap). Every
        prompt is checked against the model's context first (``truncate``: see ``fit_prompt``)."""
        template = resolve_template(self.tok, template)
        stop = stop_token_ids(self.tok, self.model)
        prompts = [fit_prompt(encode_prompt(self.tok, item.question, template), self.model, max_new_tokens,
                              truncate, f"question {item.index}") for item in items]
        rows = []
        for item, prompt in zip(items, prompts):
            prompt = prompt.to(self.device)
            dense = self._decode_dense(prompt, max_new_tokens, stop)
            tokens = self.oracle_decode(prompt, dense, stop) if self.policy.mode == "oracle" \
                else self.greedy(prompt, max_new_tokens, stop)
            dense_text = self.tok.decode(dense, skip_special_tokens=True).strip()
            text = self.tok.decode(tokens, skip_special_tokens=True).strip()
            truth = truth_scores(text, item.correct_answers, item.incorrect_answers)
            rows.append({"bleu_vs_dense": sentence_bleu(text, dense_text),
                         "rougeL_vs_dense": rouge_l(text, dense_text),
                         "truth_bleu_acc": truth["bleu_acc"], "exact_vs_dense": float(text == dense_text)})
            if progress is not None:
                progress.update(1)
        # both answers empty: BLEU and ROUGE-L are undefined (NaN), left out of the means and counted
        empty = sum(1 for r in rows if math.isnan(r["bleu_vs_dense"]))
        return {k: _mean([r[k] for r in rows]) for k in rows[0]} | {"n": len(rows), "template": template,
                                                                   "empty_vs_empty": empty}

    def _decode_dense(self, prompt: torch.Tensor, max_new_tokens: int, stop: set[int]) -> list[int]:
        return greedy_continuation(self.model, prompt, max_new_tokens, stop).tolist()

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, max_new_tokens: int, stop: set[int]) -> list[int]:
        """Greedy tokens under the policy (stop token kept). With ``prefix_cache`` the policy decodes
        on a KV cache; otherwise each step re-runs the whole sequence."""
        from transformers import DynamicCache

        cached = self.prefix_cache
        cache = DynamicCache(config=self.model.config) if cached else None
        seq, step_ids, out = prompt, prompt, []
        for _ in range(max_new_tokens):
            if cached:
                positions = torch.arange(seq.numel() - step_ids.numel(), seq.numel(), device=self.device).unsqueeze(0)
                result = self.policy.forward(self.model, step_ids.unsqueeze(0), None, cache=cache,
                                             use_cache=True, position_ids=positions)
                self._account(result, None)
                logits = check_finite(result.logits, self.model, f"greedy decoding under {self.policy.name}")
            else:
                logits, _ = self.logits([seq[-self.max_seq_len:]])
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
            step_ids = torch.tensor([token], device=self.device)
            seq = torch.cat([seq, step_ids])
        return out

    def oracle_decode(self, prompt: torch.Tensor, dense: list[int], stop: set[int]) -> list[int]:
        """The paper's protocol: masks scored along the dense answer, replayed token by token
        (prefill dense except its last position, as in ``attrsparse sweep``)."""
        label = torch.tensor(dense, device=self.device)
        masks = self.policy.schedule(self.model, prompt, label)  # [T, L, *]
        out = masked_greedy_decode(self.model, [prompt], UnitMasks.stack([masks]), label.numel(), stop,
                                   self.pad_id)[0]
        ran = masks[: max(1, out.numel())]
        self.executed = self.executed.add(executed_ratio(ran, self.units))
        self.read.add(unit_read(ran, self.model))
        return out.tolist()


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]  # undefined scores are left out
    return float(sum(values) / len(values)) if values else float("nan")


def _stderr(values) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def evaluate_task(model: nn.Module, tokenizer, task: str, policy: SparsityPolicy, *,
                  limit: int | None = 100, offset: int = 0, data: str | None = None,
                  max_tokens: int = 4096, max_new_tokens: int = 32, template: str = "auto",
                  progress: bool = False, truncate: str = "none") -> dict:
    """Score ``task`` under ``policy``: the task's numbers plus the executed ratio.

    Returns e.g. ``{"task": "arc_easy", "acc": .., "acc_norm": .., "n": .., "executed_ratio": ..,
    "executed_ratio_mlp": .., ...}``; perplexity tasks give ``ppl`` over ``max_tokens`` tokens
    of the test split; generation tasks ``bleu_vs_dense``.
    """
    from tqdm.auto import tqdm

    spec = get_task(task)
    ev = Evaluator(model, tokenizer, policy)
    if spec.kind == "perplexity":
        text = load_task(task, data, split="test")
        with tqdm(desc=f"{task} {policy.name}", unit="win", disable=not progress) as bar:  # closed on errors too
            result = ev.perplexity(text, max_tokens=max_tokens, progress=bar)
    else:
        items = load_task(task, data, limit=limit, offset=offset)
        if not items:
            raise UserError(f"{task}: the selection is empty")
        with tqdm(total=len(items), desc=f"{task} {policy.name}", unit="item", disable=not progress) as bar:
            if spec.kind == "multiple_choice":
                result = ev.multiple_choice(items, spec.scoring, progress=bar)
            else:
                result = ev.generation(items, max_new_tokens, template, progress=bar, truncate=truncate)
    executed = ev.executed.as_dict()
    read = with_decision_cost(executed, ev.units, policy.prepaid_params(ev.units))
    return {"task": task, **result, **policy.describe(), **executed, **ev.read.as_dict(),
            **({} if read is None else {"executed_ratio_with_decision_cost": read})}
