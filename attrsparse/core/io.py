"""Atomic file writes and content fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills an unpredictable temporary sibling
    (``mkstemp``), which is flushed to disk (``fsync``) and renamed over ``path``; on any failure
    the temporary file is removed and ``path`` is left as it was. Every atomic writer uses this."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def warn_recompute(path: Path, why: str) -> None:
    """One line on stderr naming a stored record that is recomputed, and why."""
    print(f"attrsparse: warning: {path} {why}; recomputing it", file=sys.stderr, flush=True)


def read_json(path: Path, required: Iterable[str] | None = None):
    """The JSON object in ``path``, or None when it is missing or not valid JSON (a partial or
    foreign record is recomputed, never used).

    With ``required``, the content must also be an object holding every one of those keys; one
    that is not (valid JSON, but from another version or edited) is named on stderr and None is
    returned, so that the caller recomputes it as it does a truncated one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if required is None:
        return doc
    missing = [k for k in required if not isinstance(doc, dict) or k not in doc]
    if missing:
        warn_recompute(path, "is not a JSON object" if not isinstance(doc, dict) else "lacks " + ", ".join(missing))
        return None
    return doc


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save tensors as safetensors atomically (contiguous CPU copies, one per key, so that tensors
    shared between keys, e.g. a scale used at every ratio, are saved; :func:`atomic_write`)."""
    copies = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(copies, tmp))


def load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    """Tensors saved by :func:`atomic_save_tensors`, or None when missing or unreadable."""
    try:
        return load_file(str(path))
    except Exception:  # a corrupt or partial cache entry is recomputed, never used
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stable_hash(obj) -> str:
    """Short sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
