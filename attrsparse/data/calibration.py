"""Calibration token sequences, disjoint from what we evaluate on.

Sources (``source``):

* ``wikitext2`` (default): consecutive windows of the WikiText-2 *valid* split (perplexity is
  evaluated on the *test* split);
* ``truthfulqa``: question + best answer of TruthfulQA questions from index
  :data:`TRUTHFULQA_CALIBRATION_START` on (evaluations use the questions before it);
* a path to a local text file: consecutive windows of its text.

>>> seqs = calibration_sequences(tokenizer, "wikitext2", n_sequences=16, seq_len=128)
>>> [s.shape for s in seqs]   # 16 x torch.Size([128])
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import UserError
from .tasks import load_truthfulqa, load_wikitext

SOURCES = ("wikitext2", "truthfulqa")
TRUTHFULQA_CALIBRATION_START = 400  # questions [0, 400) are for evaluation, [400, 817) calibrate


def _windows(ids: torch.Tensor, n_sequences: int, seq_len: int, where: str) -> list[torch.Tensor]:
    if ids.numel() < seq_len:
        raise UserError(f"{where}: only {ids.numel()} tokens, fewer than one window of {seq_len}")
    count = min(n_sequences, ids.numel() // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len].clone() for i in range(count)]


def calibration_sequences(tokenizer, source: str = "wikitext2", n_sequences: int = 32,
                          seq_len: int = 128, data: str | None = None) -> list[torch.Tensor]:
    """Up to ``n_sequences`` id tensors ``[<= seq_len]`` (1-D, no padding) from ``source``."""
    if n_sequences < 1 or seq_len < 2:
        raise UserError("calibration needs at least 1 sequence of at least 2 tokens")
    if source == "wikitext2":
        text = load_wikitext(data, split="valid")
        ids = tokenizer(text[: n_sequences * seq_len * 8], add_special_tokens=False,
                        return_tensors="pt").input_ids[0]
        return _windows(ids, n_sequences, seq_len, "WikiText-2 valid")
    if source == "truthfulqa":
        items = load_truthfulqa(data, limit=n_sequences, offset=TRUTHFULQA_CALIBRATION_START)
        texts = [f"Q: {it.question}\nA: {it.best_answer}" for it in items]
        return [tokenizer(t, return_tensors="pt").input_ids[0][:seq_len] for t in texts]
    path = Path(source).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        return _windows(ids, n_sequences, seq_len, str(path))
    raise UserError(f"unknown calibration source '{source}' (use {', '.join(SOURCES)} or a text file)")
