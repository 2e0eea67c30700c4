"""Benchmark pieces: contenders in fresh processes (:mod:`.worker`), alternated in rounds, with
medians; the head's cost in time; the kernel's sparse speed-up against its ideal.

``run_rounds({"native-fp32": spec, "llamacpp-F32": spec, ...}, rounds=5)`` runs every contender
once per round (the order rotates each round), each in a new process, and returns the runs;
:func:`summarize` gives medians with min/max.
"""

from __future__ import annotations

import ctypes
import json
import random
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path

from .cdefs import EngSite, engine_library
from .runner import Engine

WORKER = Path(__file__).with_name("worker.py")


def run_worker(spec: dict, *, timeout: float = 900, nice: int = 0) -> dict:
    """Run one contender in a fresh interpreter (``python worker.py spec``); its JSON result, or
    ``{"error": ...}``."""
    cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"error": tail[0][:300]}
    return json.loads(lines[-1])


def cpu_busy(window: float = 2.0) -> float:
    """Fraction of all CPUs busy over ``window`` seconds (from /proc/stat); NaN where unavailable."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_idle(max_busy: float, timeout: float) -> tuple[float, float]:
    """Wait until at most ``max_busy`` of the CPUs are busy (other work) or ``timeout`` seconds
    passed; returns (busy fraction last seen, seconds waited)."""
    start = time.monotonic()
    busy = cpu_busy()
    while not busy <= max_busy and time.monotonic() - start < timeout:
        busy = cpu_busy()
    return busy, time.monotonic() - start


def run_rounds(contenders: dict[str, dict], rounds: int, *, nice: int = 0, idle_busy: float | None = None,
               idle_timeout: float = 300.0,
               progress: Callable[[int, int, str, dict, float], None] | None = None) -> dict[str, list[dict]]:
    """Every contender once per round, the order rotated by one each round. With ``idle_busy``,
    each run first waits (up to ``idle_timeout`` s) until other work keeps at most that fraction
    of the CPUs busy; each run records ``background_busy`` (the fraction seen just before it)."""
    names = list(contenders)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    total, done, start = rounds * len(names), 0, time.monotonic()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            busy, waited = wait_for_idle(idle_busy, idle_timeout) if idle_busy is not None else (cpu_busy(0.5), 0.0)
            result = run_worker(contenders[name], nice=nice)
            result.update(round=r, background_busy=round(busy, 3), waited_s=round(waited, 1))
            runs[name].append(result)
            done += 1
            if progress:
                elapsed = time.monotonic() - start
                progress(done, total, name, result, elapsed / done * (total - done))
    return runs


def print_progress(done: int, total: int, name: str, result: dict, eta_s: float) -> None:
    what = result.get("error") or f"{result['decode_tokens_per_s']:.1f} tok/s, {result['peak_rss_mb']:.0f} MB"
    print(f"[{done}/{total}] {name}: {what}  (ETA {int(eta_s) // 60}:{int(eta_s) % 60:02d})", file=sys.stderr,
          flush=True)


def summarize(runs: list[dict]) -> dict:
    """Median, min and max of decode tokens/s and peak RSS over the runs without errors."""
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs": len(runs), "errors": [r["error"] for r in runs if "error" in r]}
    if not ok:
        return out
    speed = [r["decode_tokens_per_s"] for r in ok]
    rss = [r["peak_rss_mb"] for r in ok]
    out.update(decode_tokens_per_s=statistics.median(speed), decode_tokens_per_s_min=min(speed),
               decode_tokens_per_s_max=max(speed), peak_rss_mb=statistics.median(rss), peak_rss_mb_max=max(rss))
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None when equal over the shorter length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def head_timing(engine: Engine, prompt: list[int], tokens: list[int], repeats: int = 3) -> dict:
    """Seconds per token of the LM head, screened and full: the same token sequence replayed with
    no head, the screened head and the full head (the difference to no head is the head's time);
    the fastest of ``repeats`` interleaved replays of each (the least disturbed by other work)."""
    modes = {"none": None, "screened": "greedy", "full": "full"}
    per: dict[str, list[float]] = {k: [] for k in modes}
    seq = list(prompt) + list(tokens)
    for _ in range(repeats):
        for name, mode in modes.items():
            engine.reset()
            for tok in prompt[:-1]:
                engine.step(tok, mode=None)
            t0 = time.perf_counter()
            for tok in seq[len(prompt) - 1:-1]:
                engine.step(tok, mode=mode)
            per[name].append((time.perf_counter() - t0) / len(tokens))
    med = {k: min(v) for k, v in per.items()}
    out = {"step_s": med, "screened_s": med["screened"] - med["none"], "full_s": med["full"] - med["none"]}
    out["time_ratio"] = out["screened_s"] / out["full_s"] if out["full_s"] > 0 else None
    return out


def kernel_speedup(precision: str = "fp32", n_in: int = 4096, n_out: int = 4096, keep: float = 0.5,
                   threads: int = 2, reps: int = 20, footprint_mb: int = 512) -> dict:
    """Time of the engine's linear (dense, and with a random ``keep`` fraction of input channels)
    cycling over copies of the matrix that fill ``footprint_mb`` (far beyond the caches, so every
    call streams from memory); best of ``reps``; speed-up against the ideal 1 / kept."""
    lib = engine_library()
    nbytes = {"fp32": 4, "bf16": 2, "int8": 1}[precision]
    size = n_in * n_out * nbytes
    copies = max(2, (footprint_mb << 20) // size)
    weights = bytearray(size * copies)
    base = ctypes.addressof(ctypes.c_char.from_buffer(weights))
    scale = array("f", [1.0] * n_out)
    x = array("f", [random.Random(0).uniform(-1, 1) for _ in range(n_in)])
    y = array("f", [0.0] * n_out)
    rng = random.Random(1)
    mask = array("B", [1 if rng.random() < keep else 0 for _ in range(n_in)] + [0] * 16)
    addr = lambda a: ctypes.addressof(ctypes.c_char.from_buffer(a))
    code = {"fp32": 0, "bf16": 1, "int8": 2}[precision]
    sites = {"dense": EngSite(), "sparse": EngSite(keep=addr(mask))}
    times: dict[str, list[float]] = {k: [] for k in sites}
    for i in range(reps):
        for name, site in sites.items():
            w = base + size * ((2 * i + (name == "sparse")) % copies)
            t0 = time.perf_counter()
            lib.eng_linear(code, w, addr(scale) if precision == "int8" else None, n_in, n_out, addr(x),
                           ctypes.byref(site), 1, None, None, addr(y), None, threads)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    kept = sum(mask[:n_in]) / n_in
    return {"precision": precision, "shape": [n_in, n_out], "threads": threads, "kept": kept,
            "dense_s": best["dense"], "sparse_s": best["sparse"], "speedup": best["dense"] / best["sparse"],
            "ideal": 1 / kept, "of_ideal": best["dense"] / best["sparse"] * kept,
            "dense_gbs": size / best["dense"] / 1e9}
