"""The one build step of attrsparse's C code: compile a kernel source once, load it safely.

Every C source is a ``.c`` file shipped as package data beside this module (headers ``*.h`` too).
:func:`load_library` compiles ``<name>.c`` with the system C compiler into the per-user kernel
cache and loads it with ``ctypes``:

* the library's file name carries a hash of the source, the headers, the flags, the compiler's
  version and the CPU's flags, so an edited source or another machine gets a fresh build and a
  stale one is never loaded;
* the cache folder (``<cache root>/kernels``) is created with mode 0700; a folder or library not
  owned by the current user, or writable by group or others, is refused (another user's library
  would run inside our process);
* the library is built in a private temporary folder, its sha256 written beside it, and both
  renamed into place; before loading, the file's sha256 must equal that record (a library changed
  after the build is rebuilt, never loaded);
* a source that shares a struct with Python exports its layout (``attrsparse_layout_<Struct>``:
  ``{sizeof, offsetof(field 0), offsetof(field 1), ...}``, see :data:`LAYOUT_MACRO`) and
  :func:`check_layout` compares it with the ``ctypes.Structure`` mirror right after the load.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ...core.errors import UserError
from ...core.paths import cache_root

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
LIBS = ("-lm",)
LAYOUT_MACRO = "attrsparse_layout_"


class KernelBuildError(OSError):
    """The C compiler is missing or failed (callers fall back to torch where they can)."""


def _sources(name: str) -> tuple[Path, list[Path]]:
    folder = Path(str(resources.files(__package__)))
    source = folder / f"{name}.c"
    if not source.is_file():
        raise FileNotFoundError(f"no kernel source {source}")
    return source, sorted(folder.glob("*.h"))


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}-{flags}"


def _compiler() -> tuple[str, str]:
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"no C compiler ({compiler}): {exc}") from None
    return compiler, version.splitlines()[0] if version else ""


def kernel_dir() -> Path:
    """The per-user kernel cache folder, created 0700; refused when it is not safely ours."""
    folder = cache_root() / "kernels"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(folder, "kernel cache folder")
    return folder


def _check_private(path: Path, what: str) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UserError(f"{what} {path} is a symbolic link; refusing to load code from it")
    if info.st_uid != os.getuid():
        raise UserError(f"{what} {path} is owned by another user; refusing to load code from it "
                        "(set ATTRSPARSE_CACHE to a folder of your own)")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UserError(f"{what} {path} is writable by other users; refusing to load code from it "
                        f"(chmod go-w {path}, or set ATTRSPARSE_CACHE to a private folder)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_path(name: str) -> tuple[Path, list[str], str]:
    """``(path the library is cached at, compile command, compiler)`` for kernel ``name``."""
    source, headers = _sources(name)
    compiler, version = _compiler()
    digest = hashlib.sha256()
    for part in [source.read_bytes()] + [h.read_bytes() for h in headers]:
        digest.update(hashlib.sha256(part).digest())
    digest.update(" ".join(FLAGS + LIBS).encode())
    digest.update(version.encode())
    digest.update(_cpu_tag().encode())
    lib = kernel_dir() / f"libattrsparse_{name}-{digest.hexdigest()[:16]}.so"
    command = [compiler, *FLAGS, f"-I{source.parent}", str(source), "-o", "{out}", *LIBS]
    return lib, command, compiler


def _build(lib: Path, command: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
        out = Path(tmp) / lib.name
        cmd = [out.as_posix() if part == "{out}" else part for part in command]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"compiling {lib.name} failed: {exc}") from None
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr[:200])
            raise KernelBuildError(f"compiling {lib.name} failed: {first}")
        os.chmod(out, 0o700)
        record = Path(tmp) / (lib.name + ".sha256")
        record.write_text(_sha256(out) + "\n")
        os.replace(record, lib.with_name(lib.name + ".sha256"))
        os.replace(out, lib)


def _verified(lib: Path) -> bool:
    """Whether ``lib`` exists, is ours, private, and matches its recorded sha256."""
    record = lib.with_name(lib.name + ".sha256")
    if not lib.exists() or not record.exists():
        return False
    _check_private(lib, "kernel library")
    _check_private(record, "kernel library record")
    return record.read_text().strip() == _sha256(lib)


_LOADED: dict[str, ctypes.CDLL] = {}


def load_library(name: str) -> ctypes.CDLL:
    """Compile ``<name>.c`` (once per source, flags, compiler and CPU) and load it.

    Raises :class:`KernelBuildError` when no compiler works, :class:`UserError` when the cache
    is not safely the user's own (module docstring).
    """
    if name in _LOADED:
        return _LOADED[name]
    lib, command, _ = library_path(name)
    if not _verified(lib):
        _build(lib, command)
        if not _verified(lib):
            raise KernelBuildError(f"{lib} does not match its build record")
    _LOADED[name] = ctypes.CDLL(str(lib))
    return _LOADED[name]


def check_layout(lib: ctypes.CDLL, struct: type[ctypes.Structure]) -> None:
    """Compare the C layout the library exports for ``struct`` with its ctypes mirror."""
    fields = struct._fields_
    exported = (ctypes.c_int64 * (len(fields) + 1)).in_dll(lib, LAYOUT_MACRO + struct.__name__)
    have = [ctypes.sizeof(struct)] + [getattr(struct, f[0]).offset for f in fields]
    if list(exported) != have:
        raise KernelBuildError(f"ctypes mirror of {struct.__name__} does not match the C header "
                               f"(C {list(exported)}, Python {have})")


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CC", "cc")) is not None
