"""WikiText-2 (tokenised v1) for perplexity: the raw text of one split.

Where the data comes from (``data_path``):

* ``None``: ``$ATTRSPARSE_DATA_DIR/wikitext-2/<split>.txt``, else the copy bundled in the
  package (``attrsparse/data/bundled``, checked by sha256; splits ``valid`` and ``test``);
* a local text file (used as is, whatever ``split`` says);
* a directory holding ``<split>.txt`` or ``wikitext-2/<split>.txt``;
* ``"wikitext"`` (Hub name): ``datasets.load_dataset("wikitext", "wikitext-2-v1")``, lines joined
  as they are (needs internet access).

``limit``/``offset``/``indices`` select *lines* (kept with their line ends); with none of them the
file text is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from attrsparse.core.errors import UserError

from .common import find_default_file, hub_dataset, select

SPLITS = {"valid": "valid", "validation": "valid", "test": "test"}
DEFAULT_SPLIT = "valid"


def _split_name(split: str | None) -> str:
    key = (split or DEFAULT_SPLIT).lower()
    if key not in SPLITS:
        raise UserError(f"unknown WikiText-2 split {split!r}; use valid or test")
    return SPLITS[key]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; expected a plain text file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _from_hub(name: str, split: str) -> str:
    hub_split = "validation" if split == "valid" else split
    try:
        from datasets import load_dataset

        ds = load_dataset(name, "wikitext-2-v1", split=hub_split)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load WikiText-2 {name!r} from the Hugging Face Hub ({msg}); "
                        "pass --data PATH to a local text file") from None
    return "".join(ds["text"])


def resolve_wikitext(data_path: str | Path | None, split: str | None = None) -> tuple[str, str]:
    """``(text, source description)`` for the requested split."""
    name = _split_name(split)
    if data_path is None:
        path = find_default_file(f"wikitext-2/{name}.txt", f"WikiText-2 {name} split")
        return _read_text(path), str(path)
    spec = str(data_path)
    path = Path(spec).expanduser()
    if path.is_dir():
        for candidate in (path / f"{name}.txt", path / "wikitext-2" / f"{name}.txt"):
            if candidate.is_file():
                return _read_text(candidate), str(candidate)
        raise UserError(f"no {name}.txt in directory {path} (nor wikitext-2/{name}.txt under it)")
    if path.is_file():
        return _read_text(path), str(path)
    return _from_hub(hub_dataset(spec, "WikiText-2", "pass --data PATH to a local text file"), name), spec


def load_wikitext(data_path: str | Path | None = None, limit: int | None = None, offset: int = 0,
                  indices: Sequence[int] | None = None, split: str | None = None) -> str:
    """The raw text of a WikiText-2 split (or of any local text file).

    ``limit``/``offset``/``indices`` select lines. Empty text raises :class:`UserError`.
    """
    text, where = resolve_wikitext(data_path, split)
    if not text.strip():
        raise UserError(f"{where}: empty text; expected WikiText-style plain text")
    if limit is None and offset == 0 and indices is None:
        return text
    lines = text.splitlines(keepends=True)
    return "".join(select(lines, limit, offset, indices, what=f"WikiText ({where}) lines"))
