"""Shared helpers for task loaders: data-directory resolution, selection, local table files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from attrsparse.core.errors import UserError
from attrsparse.core.hub import hub_unreachable, looks_like_path

T = TypeVar("T")

#: Environment variable naming a directory with ``truthfulqa/TruthfulQA.csv`` and ``wikitext-2/``.
DATA_DIR_ENV = "ATTRSPARSE_DATA_DIR"

#: The copies shipped inside the package (``attrsparse/data/bundled``; licences beside them).
BUNDLED_DIR = Path(str(resources.files("attrsparse.data") / "bundled"))

#: sha256 of every bundled file: a bundled copy is used only when it matches.
BUNDLED_SHA256 = {
    "truthfulqa/TruthfulQA.csv": "99d6ae7755e3b435eade956068c9de7c0c474770344237aeb66b56519ba4b697",
    "wikitext-2/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext-2/test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}
_VERIFIED: set[Path] = set()

_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv")


def data_dirs() -> list[Path]:
    """Directories searched for the project data, in order: ``$ATTRSPARSE_DATA_DIR``, then the
    bundled copies (:data:`BUNDLED_DIR`)."""
    dirs = []
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(BUNDLED_DIR)
    return dirs


def _check_bundled(path: Path, relative: str) -> Path:
    """``path`` once its sha256 matches :data:`BUNDLED_SHA256` (checked once per process)."""
    if path not in _VERIFIED:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != BUNDLED_SHA256[relative]:
            raise UserError(f"the bundled {relative} is damaged (sha256 {digest[:12]}..., expected "
                            f"{BUNDLED_SHA256[relative][:12]}...); reinstall attrsparse")
        _VERIFIED.add(path)
    return path


def find_default_file(relative: str, what: str) -> Path:
    """Return the first existing ``<data dir>/<relative>`` (a bundled copy checked by sha256),
    else raise :class:`UserError`."""
    tried = [d / relative for d in data_dirs()]
    for path in tried:
        if path.is_file():
            return _check_bundled(path, relative) if path.parent.parent == BUNDLED_DIR else path
    looked = ", ".join(str(p) for p in tried)
    raise UserError(
        f"{what} not found (looked in {looked}); pass --data PATH or set {DATA_DIR_ENV} "
        f"to a directory containing {relative}"
    )


def looks_like_hf_name(spec: str) -> bool:
    """True for ``name`` or ``owner/name`` strings that are not an existing local path."""
    if Path(spec).expanduser().exists():
        return False
    if spec.lower().endswith(TABLE_SUFFIXES + (".txt",)):
        return False
    return bool(_HF_NAME.match(spec))


def hub_dataset(spec: str, what: str, hint: str) -> str:
    """``spec`` as a Hugging Face data set name, decided locally first: a path-like ``spec`` that
    does not exist is "no such file or directory", and a name is refused at once (one line, with
    ``hint`` on passing a local copy) when the hub cannot be reached."""
    if looks_like_path(spec) or not looks_like_hf_name(spec):
        raise UserError(f"{what} file not found: {spec} (no such file or directory); {hint}")
    reason = hub_unreachable()
    if reason is not None:
        raise UserError(f"{what} {spec!r} is not a local file or directory, and the Hugging Face hub "
                        f"cannot be reached ({reason}); {hint}")
    return spec


def check_selection(limit: int | None, offset: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise UserError(f"limit must be a non-negative integer, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise UserError(f"offset must be a non-negative integer, got {offset!r}")


def selected_positions(
    n: int,
    limit: int | None = None,
    offset: int = 0,
    indices: Sequence[int] | None = None,
    what: str = "dataset",
) -> list[int]:
    """Positions picked from ``n`` items: explicit ``indices`` (then offset/limit apply to that
    list), else ``range(offset, offset + limit)``. Empty or out-of-range selections raise
    :class:`UserError`."""
    check_selection(limit, offset)
    if n == 0:
        raise UserError(f"{what} is empty")
    if indices is not None:
        positions = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise UserError(f"question index {i!r} out of range: {what} has {n} items (0-{n - 1})")
            positions.append(i)
    else:
        positions = list(range(n))
    positions = positions[offset:]
    if limit is not None:
        positions = positions[:limit]
    if not positions:
        raise UserError(f"selection (offset={offset}, limit={limit}) leaves no items: {what} has {n}")
    return positions


def select(
    items: Sequence[T],
    limit: int | None = None,
    offset: int = 0,
    indices: Sequence[int] | None = None,
    what: str = "dataset",
) -> list[T]:
    """Apply :func:`selected_positions` to a list."""
    return [items[i] for i in selected_positions(len(items), limit, offset, indices, what)]


def _maybe_json(value: Any) -> Any:
    """CSV cells holding nested columns (``{"text": [...]}``, ``[...]``) are parsed as JSON."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_table(path: Path, columns: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``, ``.json`` (a list of objects) or ``.csv`` file, checked for
    ``columns``. Malformed or empty files raise :class:`UserError`."""
    need = ", ".join(columns)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; {what} expects columns {need}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows: list[Any]
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(text) if text.strip() else []
            if isinstance(rows, dict) and isinstance(rows.get("data"), list):
                rows = rows["data"]
        elif suffix == ".csv":
            rows = [{k: _maybe_json(v) for k, v in r.items()} for r in csv.DictReader(text.splitlines())]
        else:
            raise UserError(f"{path}: unsupported file type for {what}; use .jsonl, .json, .csv "
                            "or a datasets save_to_disk directory")
    except (json.JSONDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: malformed {suffix[1:]} ({exc}); {what} expects columns {need}") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a list of records; {what} expects columns {need}")
    if not rows:
        raise UserError(f"{path}: no rows; {what} expects columns {need}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: record {i} is not an object; {what} expects columns {need}")
        missing = [c for c in columns if c not in row or row[c] is None]
        if missing:
            raise UserError(f"{path}: record {i} lacks {', '.join(missing)}; {what} expects columns {need}")
    return rows


def as_int(value: Any, column: str, where: str) -> int:
    """An integer label from an int, a bool or a numeric string."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"{where}: column {column} must be an integer, got {value!r}") from None


def as_bool(value: Any, column: str, where: str) -> bool:
    """A boolean from a bool, 0/1 or a true/false string."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"{where}: column {column} must be true/false, got {value!r}")
