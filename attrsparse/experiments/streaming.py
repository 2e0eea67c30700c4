"""Per-token scores streamed to safetensors shards under a memory budget, and read back.

A sweep computes ``[T, L, N]`` MLP and ``[T, L, H]`` head scores per question and metric. With
``--stream-scores`` they are kept on disk instead of being dropped: :class:`ScoreWriter` buffers
whole *entries* (one key, e.g. a question, with its named tensors) and writes the buffer as one
shard once it would exceed ``max_memory_mb``; :class:`ScoreReader` lists and loads them back one
entry at a time.

What the budget bounds, exactly: the tensors the writer holds between shards never exceed
``max(max_memory_mb, one entry)``. Shards are written from the buffered tensors directly (no
serialised copy) through a temporary file and ``os.replace``, so a shard on disk is complete or
absent. It does not bound the model, a question's own trace, or the records of a sweep.

Layout: ``<dir>/<prefix>-<seq:05d>.safetensors``; tensor names are ``<key>/<name>``; the header
metadata ``keys`` lists the entries (JSON). The prefix is unique per writer (rank and a random
token), so ranks and resumed runs never overwrite each other's shards. An entry written twice
(recomputed after a crash) is read from the first shard in name order.

>>> writer = ScoreWriter("out/scores", prefix="rank000", max_memory_mb=64)
>>> writer.add("q0003", {"gxo.mlp": scores.mlp, "gxo.heads": scores.heads})
>>> writer.close()
>>> ScoreReader("out/scores").load("q0003")["gxo.mlp"].shape   # [T, L, N]
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.errors import UserError
from ..core.io import atomic_write

SUFFIX = ".safetensors"


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ScoreWriter:
    """Buffers entries ``key -> {name: tensor}`` and writes shards of about ``max_memory_mb``.

    ``buffered_bytes`` / ``peak_buffered_bytes`` report what the buffer holds and held at most;
    ``shards`` lists the files written.
    """

    def __init__(self, directory: Path | str, prefix: str = "scores", max_memory_mb: float = 256.0):
        if not max_memory_mb > 0:
            raise UserError(f"--max-memory must be a positive number of MB, got {max_memory_mb:g}")
        self.directory = Path(directory)
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.budget = int(max_memory_mb * 2**20)
        self.shards: list[Path] = []
        self.peak_buffered_bytes = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._keys: list[str] = []

    @property
    def buffered_bytes(self) -> int:
        return _nbytes(self._buffer)

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Buffer one entry (copied to contiguous CPU tensors); write a shard when over budget."""
        if not key or "/" in key or any("/" in name for name in tensors):
            raise ValueError(f"keys and tensor names must be non-empty and free of '/': {key!r}")
        if key in self._keys:
            raise ValueError(f"entry {key!r} is already buffered")
        entry = {f"{key}/{name}": t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        if self._buffer and self.buffered_bytes + _nbytes(entry) > self.budget:
            self.flush()
        self._buffer.update(entry)
        self._keys.append(key)
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
        if self.buffered_bytes >= self.budget:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffer as the next shard (atomically) and empty it; None if it was empty."""
        if not self._buffer:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.prefix}-{len(self.shards):05d}{SUFFIX}"
        buffer, metadata = self._buffer, {"keys": json.dumps(self._keys)}
        atomic_write(path, lambda tmp: save_file(buffer, tmp, metadata=metadata))
        self.shards.append(path)
        self._buffer, self._keys = {}, []
        return path

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ScoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ScoreReader:
    """Entries of every complete shard in ``directory`` (reads headers only until loaded)."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self._where: dict[str, Path] = {}
        paths = sorted(self.directory.glob(f"*{SUFFIX}")) if self.directory.is_dir() else []
        for path in paths:
            if path.name.startswith("."):
                continue  # a shard still being written
            with safe_open(str(path), framework="pt") as fh:
                keys = json.loads((fh.metadata() or {}).get("keys", "[]"))
            for key in keys:
                self._where.setdefault(key, path)

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shard_of(self, key: str) -> Path:
        """The shard file holding ``key``."""
        return self._where[key]

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of one entry, loading only its tensors."""
        if key not in self._where:
            raise KeyError(key)
        prefix = f"{key}/"
        with safe_open(str(self._where[key]), framework="pt") as fh:
            return {name[len(prefix):]: fh.get_tensor(name) for name in fh.keys() if name.startswith(prefix)}

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """``(key, tensors)`` in key order, one entry in memory at a time."""
        for key in self.keys():
            yield key, self.load(key)
