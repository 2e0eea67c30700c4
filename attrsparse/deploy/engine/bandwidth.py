"""Memory bandwidth of this machine (a C read/copy benchmark) and the decode floor it implies."""

from __future__ import annotations

from .cdefs import engine_library


def measure_bandwidth(threads: tuple[int, ...] = (1, 2), size_mb: int = 512, reps: int = 5) -> dict:
    """GB/s (1e9 bytes/s), best of ``reps`` passes over ``size_mb`` MiB (far beyond the caches):
    ``{"read": {threads: GB/s}, "copy": {threads: GB/s}}``; copy counts bytes read plus bytes
    written (STREAM's convention)."""
    lib = engine_library()
    size = size_mb << 20
    return {kind: {n: round(lib.eng_bandwidth(size, n, code, reps), 2) for n in threads}
            for kind, code in (("read", 0), ("copy", 1))}


def floor_tokens_per_s(bytes_per_token: float, read_gbs: float) -> float:
    """The memory-bandwidth ceiling of decode speed: bandwidth ÷ bytes of weights read per token."""
    return read_gbs * 1e9 / bytes_per_token
