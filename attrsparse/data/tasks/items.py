"""Item types shared by the task loaders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from attrsparse.core.finite import check_finite


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item, scored by log-likelihood of each choice after ``context``.

    ``choices`` carry their leading separator (usually a space), so the scored continuation is
    exactly ``context + choices[i]``. ``gold`` is the index of the correct choice; ``golds`` lists
    every correct choice for multi-answer scoring (TruthfulQA MC2), else it is ``None``.
    ``index`` is the item's 0-based position in the full data set.
    """

    context: str
    choices: list[str]
    gold: int
    golds: list[int] | None = None
    index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def mc_correct(logprobs: Sequence[float], gold: int) -> float:
    """1.0 if the highest log-likelihood is the gold choice (ties go to the first), else 0.0.
    A NaN or +inf log-likelihood is a :class:`~attrsparse.core.finite.NonFiniteError`."""
    if not logprobs:
        raise ValueError("mc_correct needs at least one log-probability")
    check_finite(logprobs, None, "multiple-choice log-likelihoods")
    best = max(range(len(logprobs)), key=lambda i: logprobs[i])
    return 1.0 if best == gold else 0.0
