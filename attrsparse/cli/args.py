"""The options every command shares, the one parser of list options, and the output check.

A list option is comma-separated; an empty item (``"0.5,,0.3"``), a repeated value, a number that
is not finite or (for ratios) outside (0, 1] is refused with one line naming the option, never
dropped silently.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from ..core.errors import UserError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="packaged alias (smollm2-135m, gemma3-270m, qwen2.5-coder-0.5b), HF id, "
                        "local directory or .gguf file (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device`` of the commands that run the model where torchrun puts each rank."""
    p.add_argument("--device", default="auto", help="auto (default: cuda:<local rank> when CUDA is "
                                                    "available, else cpu), cpu, cuda or cuda:N")


def comma_list(text: str | None, what: str = "list", nonempty: bool = False) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty item or a repeated one is a :class:`UserError`."""
    if text is None or not str(text).strip():
        if nonempty:
            raise UserError(f"{what} is empty")
        return []
    items = [x.strip() for x in str(text).split(",")]
    if any(not x for x in items):
        raise UserError(f"{what} has an empty item: '{text}'")
    repeated = sorted({x for x in items if items.count(x) > 1})
    if repeated:
        raise UserError(f"{what} repeats {', '.join(repeated)}: '{text}'")
    return items


def comma_floats(text: str | None, what: str, nonempty: bool = False, ratios: bool = False) -> list[float]:
    """Comma-separated finite numbers of option ``what`` (with ``ratios``: each in (0, 1])."""
    values = []
    for item in comma_list(text, what, nonempty):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"{what} must be comma-separated numbers, got '{item}' in '{text}'") from None
        if not math.isfinite(value):
            raise UserError(f"{what} must be finite numbers, got '{item}' in '{text}'")
        if ratios and not 0.0 < value <= 1.0:
            raise UserError(f"ratio must lie in (0, 1], got {value:g} (in {what} '{text}')")
        values.append(value)
    if len(set(values)) != len(values):
        raise UserError(f"{what} repeats a value: '{text}'")
    return values


def comma_ints(text: str | None, what: str) -> list[int] | None:
    """Comma-separated non-negative integers of option ``what`` (None when not given)."""
    if text is None:
        return None
    values = []
    for item in comma_list(text, what, nonempty=True):
        try:
            value = int(item)
        except ValueError:
            raise UserError(f"{what} must be comma-separated integers, got '{item}' in '{text}'") from None
        if value < 0:
            raise UserError(f"{what} must be non-negative, got {value}")
        values.append(value)
    if len(set(values)) != len(values):
        raise UserError(f"{what} repeats a value: '{text}'")
    return values


def add_truncate_arg(p: argparse.ArgumentParser) -> None:
    """``--truncate`` of the commands that generate from prompts (see ``data.prompts.fit_prompt``)."""
    p.add_argument("--truncate", default="none",
                   help="a prompt that does not fit the model's context with the new tokens: none "
                        "(default: refuse, one line) or left (keep its end, with a warning)")


def check_out(path: str | os.PathLike, what: str = "--out", keep: bool = False) -> Path:
    """Fail before any work, in one line, unless ``path`` is a directory that can be written, or one
    that can be created: an existing file, a read-only location or ``/proc/...`` is a
    :class:`UserError`. Creates nothing that stays: folders made for the probe are removed again
    (with ``keep``, only when the check fails)."""
    text = os.fspath(path)
    if not text.strip():
        raise UserError(f"{what} is empty")
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {text} exists and is not a directory")
    created: list[Path] = []
    try:
        missing, parent = [], out
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise UserError(f"{what} {text}: {parent} is not a directory")
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".attrsparse-probe-")
        os.close(fd)
        os.unlink(probe)
        if keep:
            created = []
    except OSError as exc:
        raise UserError(f"{what} {text} cannot be written ({exc.strerror or exc})") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
    return out
