"""The task registry: one :class:`Task` entry per evaluation task, as data.

Kinds and what :func:`load_task` returns:

* ``generation`` -- ``list[TruthfulQAItem]``; ``task.prompt(item)`` gives the prompt string
  (default :func:`paper_prompt`); scoring ``truth_bleu_rouge`` (:func:`textmetrics.truth_scores`).
* ``multiple_choice`` -- ``list[MCItem]`` (``context``, ``choices``, ``gold``, and ``golds`` for
  MC2); the prompt is already in ``context``. Scoring ``mc_accuracy`` (argmax log-likelihood,
  :func:`mc_correct`) or ``mc2`` (:func:`mc2_score`).
* ``perplexity`` -- ``str``, the raw text; scoring ``perplexity``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from attrsparse.core.errors import UserError

from . import multiple_choice, truthfulqa, wikitext

KINDS = ("generation", "multiple_choice", "perplexity")
SCORINGS = ("truth_bleu_rouge", "mc_accuracy", "mc2", "perplexity")


@dataclass(frozen=True)
class Task:
    """A registered task.

    ``loader(data_path=None, limit=None, offset=0, indices=None, split=None)`` returns the items
    (or the text, for perplexity). ``prompt`` formats a generation item into its prompt; it is
    ``None`` where the loader already formats (multiple choice) or there is no prompt (perplexity).
    """

    name: str
    kind: str
    loader: Callable[..., Any]
    scoring: str
    prompt: Callable[[Any], str] | None = None
    description: str = ""


_REGISTRY: dict[str, Task] = {}


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry (``replace=True`` to overwrite an existing entry)."""
    if task.kind not in KINDS:
        raise ValueError(f"task {task.name!r}: kind must be one of {KINDS}, got {task.kind!r}")
    if task.scoring not in SCORINGS:
        raise ValueError(f"task {task.name!r}: scoring must be one of {SCORINGS}, got {task.scoring!r}")
    key = _normalise(task.name)
    if key in _REGISTRY and not replace:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[key] = task
    return task


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(t.name for t in _REGISTRY.values())


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive, ``-`` = ``_``); unknown names raise
    :class:`UserError` with a "did you mean" suggestion."""
    key = _normalise(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=1, cutoff=0.5)
    hint = f"; did you mean {_REGISTRY[close[0]].name!r}?" if close else ""
    raise UserError(f"unknown task {name!r}{hint} (known: {', '.join(list_tasks())})")


def load_task(name: str, data_path: str | Path | None = None, limit: int | None = None, offset: int = 0, *,
              indices: Sequence[int] | None = None, split: str | None = None) -> Any:
    """Load task ``name``: a list of items, or the raw text for a perplexity task."""
    return get_task(name).loader(data_path=data_path, limit=limit, offset=offset,
                                 indices=indices, split=split)


# ----------------------------------------------------------------------------- built-in tasks

def _truthfulqa_loader(convert=None):
    def load(data_path=None, limit=None, offset=0, indices=None, split=None):
        if split not in (None, "validation"):
            raise UserError(f"TruthfulQA has only the 'validation' split, not {split!r}")
        items = truthfulqa.load_truthfulqa(data_path, limit, offset, indices)
        return convert(items) if convert else items
    return load


def _register_builtins() -> None:
    register_task(Task(
        "truthfulqa_gen", "generation", _truthfulqa_loader(), "truth_bleu_rouge",
        prompt=lambda item: truthfulqa.paper_prompt(item.question),
        description="TruthfulQA generation (CSV); BLEU/ROUGE-L max-correct minus max-incorrect"))
    register_task(Task(
        "truthfulqa_mc1", "multiple_choice", _truthfulqa_loader(truthfulqa.mc1_items), "mc_accuracy",
        description="TruthfulQA MC1 from the CSV: best answer vs incorrect answers, context = question"))
    register_task(Task(
        "truthfulqa_mc2", "multiple_choice", _truthfulqa_loader(truthfulqa.mc2_items), "mc2",
        description="TruthfulQA MC2 from the CSV: probability mass on the correct answers"))
    register_task(Task(
        "wikitext2", "perplexity", wikitext.load_wikitext, "perplexity",
        description="WikiText-2 tokenised v1, raw text of the valid (default) or test split"))
    for spec in multiple_choice.SPECS.values():
        register_task(Task(
            spec.name, "multiple_choice", partial(multiple_choice.load_multiple_choice, spec),
            "mc_accuracy",
            description=f"{spec.name} ({spec.split}), lm-evaluation-harness zero-shot prompt"))


_register_builtins()
