"""The engine file: a JSON header followed by raw tensors, written by :mod:`.pack`, mapped by C.

Layout (little-endian)::

    0   8 bytes   magic b"ATSPENG\\0"
    8   uint32    format version (:data:`FORMAT_VERSION`)
    12  uint32    0
    16  uint64    length n of the JSON header
    24  n bytes   JSON header (UTF-8)
    s   ...       tensors from s = 24 + n rounded up to 64; each tensor's offset (from s) is a
                  multiple of 64

The header holds ``config`` (dimensions, precision, norms, RoPE), ``layers`` (per layer: tensor
names, sliding window, RoPE table; the weight layouts are in ``engine.h``), ``tensors`` (``name -> {offset, dtype, shape}``),
``fingerprint`` (sha256 of the weights, precision, options and format version), ``data_bytes``
(so a truncated file is refused) and ``weight_bytes`` (the model's weights, screening copy excluded).

Pure Python (no torch, no numpy): the runner imports it in processes that hold only the weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ...core.errors import UserError
from .sites import site_dims

MAGIC = b"ATSPENG\0"
# 2: the fused gate/up matrix holds its columns as gate | up (1 interleaved them by blocks of 16, so
# a per-projection rule could not skip one projection's bytes of a row); files of another version
# are refused by read_header, and pack (whose fingerprint covers the version) writes a new one
FORMAT_VERSION = 2
ALIGN = 64
PRECISIONS = ("fp32", "bf16", "int8")
DTYPE_CODE = {"fp32": 0, "bf16": 1, "int8": 2}  # ENG_F32, ENG_BF16, ENG_I8 in engine.h
DTYPE_BYTES = {"f32": 4, "bf16": 2, "i8": 1}
PRECISION_DTYPE = {"fp32": "f32", "bf16": "bf16", "int8": "i8"}


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_header(header: dict) -> bytes:
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<IIQ", FORMAT_VERSION, 0, len(text)) + text


def read_header(path: str | Path) -> dict:
    """The JSON header of an engine file; :class:`UserError` when the file is not one (or of
    another format version)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
            if len(head) < 24 or head[:8] != MAGIC:
                raise UserError(f"{path} is not an attrsparse engine file")
            version, _, n = struct.unpack("<IIQ", head[8:24])
            if version != FORMAT_VERSION:
                raise UserError(f"{path} is engine format {version}, this attrsparse reads {FORMAT_VERSION}; "
                                "pack the model again")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read engine file {path}: {exc}") from None
    size, start = path.stat().st_size, align(24 + n)
    if start + header.get("data_bytes", -1) != size:
        raise UserError(f"engine file {path} has {size} bytes, its header says {start + header.get('data_bytes', -1)} "
                        "(truncated or replaced); pack the model again")
    header["data_start"] = start
    return header


def dense_counts(config: dict) -> dict[str, int]:
    """Dense weight elements per token: decoder linears and LM head (the embedding row is not counted)."""
    per_layer = sum(n_in * sum(outs.values()) for n_in, outs in site_dims(config).values())
    return {"linear_params": per_layer * config["n_layers"], "head_params": config["vocab"] * config["hidden"]}
