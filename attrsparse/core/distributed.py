"""Sharded, resumable runs over ``torch.distributed``: one process per rank, merged on rank 0.

Launch any command unchanged under ``torchrun`` (see ``docs/distributed.md``)::

    torchrun --nproc-per-node 2 -m attrsparse sweep --limit 100 --out runs/big

:func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: backend
``nccl`` when CUDA is available (device ``cuda:<local_rank>``), ``gloo`` otherwise (device
``cpu``). Without those variables, or with ``WORLD_SIZE=1``, it is a no-op single-process context
(rank 0 of 1), so the same code path runs with and without torchrun.

:func:`run_sharded` is the pattern every long command uses: items are split round-robin by
position, each rank writes one atomic JSON per finished item (a re-run skips them, so a rank that
dies redoes only its unfinished items), then all records are gathered to rank 0 in item order.
The merge is deterministic: the merged list equals the list a single process would produce.

Environment:

* ``ATTRSPARSE_DIST_TIMEOUT_S``: collective timeout (default 86400 s). Ranks wait for the
  slowest one at the merge, which after a resume can be the whole run, hence the long default.
* ``ATTRSPARSE_TEST_CRASH=RANK:N`` (test hook): rank ``RANK`` kills itself with SIGKILL after
  computing ``N`` items, on the first attempt only (torchrun's ``TORCHELASTIC_RESTART_COUNT`` 0).
"""

from __future__ import annotations

import atexit
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .io import atomic_write_json, read_json

DEFAULT_TIMEOUT_S = 86400
_CONTEXT: "DistContext | None" = None


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: ``rank`` of ``world_size``, ``local_rank`` on its
    host, its ``device`` and the process-group ``backend`` (None when single-process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard_positions(self, n: int) -> list[int]:
        """Positions ``0..n-1`` this rank owns: round-robin, ``rank, rank + world, ...``."""
        return list(range(self.rank, n, self.world_size))

    def shard(self, items: Sequence) -> list:
        """This rank's items (round-robin by position; every item goes to exactly one rank)."""
        return [items[i] for i in self.shard_positions(len(items))]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather_to_main(self, obj: Any) -> list | None:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None elsewhere (picklable objects)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name} must be an integer, got {value!r}") from None


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """The device this process computes on: ``"auto"`` is ``cuda:<local_rank>`` when CUDA is
    available, else ``cpu``; ``"cuda"`` is ``cuda:<local_rank>`` (an error without CUDA); ``"cpu"``
    or an explicit ``"cuda:N"`` / :class:`torch.device` is taken as it is. ``local_rank`` defaults
    to torchrun's ``LOCAL_RANK`` (0 outside torchrun); ranks beyond the host's GPU count wrap."""
    if isinstance(device, torch.device) or device not in DEVICES:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise UserError(f"invalid device {device!r}; use one of {', '.join(DEVICES)} or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available")
        return dev
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    local_rank = _env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def init_distributed(device: str | torch.device = "auto") -> DistContext:
    """Join the torchrun process group once per process and return its :class:`DistContext`.

    ``device``: see :func:`resolve_device` (``"auto"``: ``cuda:<local_rank>`` when CUDA is
    available, else ``cpu``). The backend follows the device: nccl for CUDA, gloo for CPU.
    Later calls return the same context. Under several ranks on one host, CPU threads are split
    between them (``cpu_count // local_world_size``) unless ``OMP_NUM_THREADS`` is set.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            timeout = timedelta(seconds=_env_int("ATTRSPARSE_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
            atexit.register(_destroy)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    _CONTEXT = DistContext(rank, world, local_rank, local_world, dev, backend)
    return _CONTEXT


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _read_record(path: Path, required: Sequence[str] = ()) -> dict | None:
    """A stored record, or None to recompute it: missing, truncated, not an object, or lacking a
    ``required`` field (the last two are named on stderr, :func:`~attrsparse.core.io.read_json`)."""
    return read_json(path, required=required)


def _crash_for_test(ctx: DistContext, computed: int) -> None:
    """Test hook ``ATTRSPARSE_TEST_CRASH=RANK:N`` (module docstring): die like a killed rank."""
    spec = os.environ.get("ATTRSPARSE_TEST_CRASH")
    if not spec or _env_int("TORCHELASTIC_RESTART_COUNT", 0) != 0:
        return
    rank, count = (int(x) for x in spec.split(":"))
    if rank == ctx.rank and computed >= count:
        os.kill(os.getpid(), signal.SIGKILL)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sharded(items: Sequence, key_fn: Callable[[int, Any], str], work_fn: Callable[[int, Any], dict],
                out_dir: Path, *, valid_fn: Callable[[int, Any, dict], bool] | None = None,
                manifest_dir: Path | None = None, after_shard: Callable[[], None] | None = None,
                ctx: DistContext | None = None, progress: bool = True, desc: str = "items",
                required: Sequence[str] = ()) -> list[dict] | None:
    """Run ``work_fn`` over this rank's share of ``items``, resumably, and merge on rank 0.

    For each position ``i`` this rank owns (:meth:`DistContext.shard_positions`), the record
    ``out_dir/<key_fn(i, item)>.json`` is reused if it exists, parses, holds every ``required``
    field and passes ``valid_fn(i, item, record)``; otherwise ``work_fn(i, item)`` computes it (a JSON-serialisable
    dict) and it is written atomically. Keys must be unique per item and must encode every setting
    that changes a record. ``after_shard()`` runs once this rank's items are done (flush streams
    there). With ``manifest_dir``, each rank writes ``rank<r>-of-<w>.json``: the keys it was
    assigned, reused and computed, its wall time and peak RSS.

    Returns the records of *all* items in item order on rank 0 (identical to a single-process
    run, whatever the number of ranks), None on the other ranks. Exceptions propagate (records
    already written stay). Example (a command of another module)::

        records = run_sharded(questions, lambda i, q: f"q{q.index:04d}-{fp}",
                              lambda i, q: evaluate(q), out / "records")
        if records is not None:   # rank 0
            write_report(records)
    """
    from tqdm.auto import tqdm

    ctx = ctx or init_distributed()
    out_dir = Path(out_dir)
    start = time.perf_counter()
    positions = ctx.shard_positions(len(items))
    done: list[tuple[int, dict]] = []
    reused, computed = [], []
    bar = tqdm(positions, desc=desc if not ctx.distributed else f"{desc} [rank 0 of {ctx.world_size}]",
               unit="item", disable=not (progress and ctx.is_main))
    for pos in bar:
        item = items[pos]
        key = key_fn(pos, item)
        path = out_dir / f"{key}.json"
        record = _read_record(path, required)
        if record is not None and valid_fn is not None and not valid_fn(pos, item, record):
            record = None  # written by another version or setting: recompute rather than reuse
        if record is None:
            _crash_for_test(ctx, len(computed))
            bar.set_postfix_str(key.split("-")[0])
            record = work_fn(pos, item)
            atomic_write_json(path, record)
            computed.append(key)
        else:
            reused.append(key)
        done.append((pos, record))
    if after_shard is not None:
        after_shard()
    if manifest_dir is not None:
        atomic_write_json(Path(manifest_dir) / f"rank{ctx.rank:03d}-of-{ctx.world_size:03d}.json", {
            "rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
            "host": socket.gethostname(), "restart": _env_int("TORCHELASTIC_RESTART_COUNT", 0),
            "assigned": [key_fn(p, items[p]) for p in positions], "reused": reused,
            "computed": computed, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()})
    gathered = ctx.gather_to_main(done)
    if gathered is None:
        return None
    merged = dict(pair for part in gathered for pair in part)
    missing = [p for p in range(len(items)) if p not in merged]
    if missing:  # cannot happen with one consistent world; guard against mixed launches
        raise RuntimeError(f"merge is missing items at positions {missing[:5]}")
    return [merged[p] for p in range(len(items))]
