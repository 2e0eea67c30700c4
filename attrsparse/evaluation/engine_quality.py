"""Perplexity measured on the logits of the engines a user runs, not on a PyTorch stand-in.

The engine bench's quality columns come from fp32 transformers with the channel rule applied by
hooks (the native engine computes the same logits at fp32), so they say nothing of bf16 or int8
weights, a bf16 KV cache, or llama.cpp's quantised GGUF types. These functions score the same
strided windows as :meth:`.evaluate.Evaluator.perplexity` (:func:`.evaluate.strided_perplexity`) with
each engine's own logits:

* :func:`native_perplexity`: a packed engine file (any precision, KV cache and channel rules), one
  token at a time from an empty cache per window, the full head only where a token is scored;
* :func:`llamacpp_perplexity`: a ``llama_cpp.Llama`` opened with ``logits_all=True``, each window
  evaluated from a reset context.

Both return ``{"ppl", "nll", "n_tokens", "read_ratio"}`` (the native engine's mean read ratio of the
decoder linears over every position it ran; 1.0 for llama.cpp, which runs dense); a non-finite
logit stops the measurement with one line.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import UserError
from ..deploy.engine import Engine
from .evaluate import strided_perplexity


def _checked(result: dict, what: str, read: float) -> dict:
    if not math.isfinite(result["nll"]):
        raise UserError(f"non-finite log-likelihood from {what}: the run is stopped")
    return {**result, "read_ratio": read}


def native_perplexity(engine: Engine, ids: list[int], window: int = 512, stride: int = 256,
                      progress=None) -> dict:
    """Perplexity of ``ids`` on ``engine``'s logits (its rules, precision and KV cache as opened).

    With an input-major head (:attr:`Engine.input_major_head`) also ``head_read_ratio`` (its kept
    channels over the scored positions) and ``top1_agreement``: how often the argmax of its logits
    under the head's rule equals that of the head with every channel kept, at the scored positions."""
    if window > engine.max_ctx:
        raise UserError(f"window {window} exceeds the engine's context of {engine.max_ctx}")
    vocab = engine.config["vocab"]
    check = engine.input_major_head
    reads, steps, agree, scored_n, head = 0, 0, 0, 0, 0.0

    def window_logits(begin: int, end: int, first: int) -> tuple[torch.Tensor, int]:
        nonlocal reads, steps, agree, scored_n, head
        engine.reset()
        rows = []
        for i in range(begin, end - 1):  # the last token of a window predicts nothing scored
            scored = i >= first - 1
            a = engine.step(ids[i], mode="check" if scored and check else None, logits=scored)
            reads += a.linear_reads
            steps += 1
            if scored:
                rows.append(torch.frombuffer(bytearray(engine.last_logits), dtype=torch.float32, count=vocab))
                scored_n += 1
                agree += int(a.next == a.check)
                head += a.head_bytes / engine.dense_head_bytes
        return torch.stack(rows), first - 1

    result = strided_perplexity(torch.tensor(ids), window, stride, window_logits, progress)
    result = _checked(result, f"the native engine ({engine.path.name})", reads / steps / engine.dense_linear)
    if check:
        result.update(head_read_ratio=head / scored_n, top1_agreement=agree / scored_n)
    return result


def llamacpp_perplexity(llm, ids: list[int], window: int = 512, stride: int = 256, progress=None) -> dict:
    """Perplexity of ``ids`` on a ``llama_cpp.Llama`` opened with ``logits_all=True`` and a context
    of at least ``window`` tokens."""

    def window_logits(begin: int, end: int, first: int) -> tuple[torch.Tensor, int]:
        llm.reset()
        llm.eval(ids[begin:end])
        return torch.from_numpy(llm.scores[first - 1 - begin: end - 1 - begin].copy()), first - 1  # scored rows only

    return _checked(strided_perplexity(torch.tensor(ids), window, stride, window_logits, progress), "llama.cpp", 1.0)
