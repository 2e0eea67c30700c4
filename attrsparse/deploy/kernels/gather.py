"""Gathered sparse kernels: compute only the chosen MLP units and attention heads.

Two gathered products over a weight stored row-major ``W [R, D]`` and a sorted index set
``idx [k]`` of its rows:

* ``rows(W, idx, X [M, D]) -> [M, k]``: ``X @ W[idx].T`` (input projections: gate/up/fc1 rows
  of the kept MLP units, query rows of the kept heads);
* ``cols(Wt, idx, A [M, k]) -> [M, D]``: ``A @ Wt[idx]`` with ``Wt`` the transposed output
  projection (down-projection columns of the kept units, output-projection columns of the kept
  heads).

Backends: ``c`` is a small C library (OpenMP, fp32 and bf16 weights, fp32 accumulation) that reads
exactly the kept rows in place, compiled once with the system C compiler into attrsparse's cache
and called through ``ctypes``; ``torch`` (used when no compiler is available, or with
``ATTRSPARSE_KERNEL=torch``) copies the kept rows with ``index_select`` first, which is slower.

One-token plans (:class:`OneTokenPlan`, built once per layer and group by the runtime; a C struct
of pointers to the weights, scratch and keep buffer): one call chooses the units and runs the
gathered projections. The choice is either the keep-mask already in the plan's buffer (static
masks, or a Python chooser's) or a native low-rank predictor: ``logits = W2 relu(W1 x + b1) + b2``
in C, then the top ``k`` by radix selection (ties to the lower index, as a stable descending sort),
``k`` from a budget table indexed by the heads kept in the layer (MLP units). Entry points: a whole
MLP (kept gate/up or fc1 rows, the activation, kept down-projection columns), the kept heads' query
rows, their output-projection columns. A call that keeps more than the plan's limit computes
nothing and returns ``-(kept + 1)`` (the caller runs dense with the mask). The modules that use
them are in :mod:`attrsparse.deploy.gathered`.
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings

import torch
import torch.nn.functional as F

from .build import KernelBuildError, check_layout, load_library

SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


class TorchBackend:
    """Gathered products with ``index_select`` (copies the kept rows, then a dense product)."""

    name = "torch"
    fused = False

    def rows(self, W: torch.Tensor, idx: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """``X [M, D]`` -> ``X @ W[idx].T``: ``[M, k]`` float32."""
        return X.float() @ W.index_select(0, idx).float().t()

    def cols(self, Wt: torch.Tensor, idx: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``A [M, k]`` -> ``A @ Wt[idx]``: ``[M, D]`` float32."""
        return A.float() @ Wt.index_select(0, idx).float()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class Plan(ctypes.Structure):
    """ctypes mirror of the C ``Plan`` in ``gather.c`` (checked against it at load)."""

    _fields_ = ([(n, _P) for n in ("w1", "b1", "w2t", "b2")] + [("rank", _I64), ("budget", _P), ("heads", _P)]
                + [(n, _I64) for n in ("G", "S")] + [(n, _P) for n in ("hid", "logits", "sel", "hidx", "hval", "keep")]
                + [(n, _I64) for n in ("K", "width", "limit")]
                + [(n, _P) for n in ("w_in", "w_up", "w_out", "b_in", "b_up", "b_out")]
                + [(n, _I64) for n in ("D", "Do", "act")] + [(n, _P) for n in ("idx", "g", "u")])


class OneTokenPlan:
    """One layer's units of one kind (MLP units or heads), prepared once for one-token calls.

    ``keep [K]`` (bool) is the keep-mask the calls read, or write when ``predictor`` is given:
    ``(w1 [r, D], b1 [r], w2 [K, r], b2 [K])`` fp32, whose top ``budget[0]`` logits are kept, or
    with ``heads [G * S]`` (the layer's head keep-mask) the top ``budget[nh * (G + 1) + ng]``.
    Weights: ``w_in [K * width, D]`` rows (gate/fc1 or query), ``w_up [K, D]`` (gated MLP),
    ``w_out [K * width, Do]`` (down/output projection, transposed), fp32 biases or None. Holds the
    tensors the C struct points to.
    """

    def __init__(self, fns: dict, keep: torch.Tensor, width: int, limit: int, w_in: torch.Tensor,
                 w_out: torch.Tensor, w_up=None, b_in=None, b_up=None, b_out=None, act: int = 0,
                 predictor=None, budget=None, heads=None, groups: int = 1):
        K = keep.numel()
        self.keep, self.D, self.Do = keep, w_in.shape[1], w_out.shape[1]
        self.width, self.count = width, K
        scratch = K * width
        self.idx, self.g, self.u = torch.empty(scratch, dtype=torch.long), torch.empty(scratch), torch.empty(scratch)
        w1, b1, w2, b2 = predictor if predictor is not None else (None,) * 4
        rank = 0 if w1 is None else w1.shape[0]
        w2t = None if w2 is None else w2.t().contiguous()  # [r, K]: logits accumulate rows of it
        self.hid, self.logits, self.sel = torch.empty(rank), torch.empty(K), torch.empty(K)
        self.hidx, self.hval = torch.empty(rank, dtype=torch.long), torch.empty(rank)
        self._alive = (w_in, w_out, w_up, b_in, b_up, b_out, w1, b1, w2t, b2, budget, heads)
        self.c = Plan(w1=_ptr(w1), b1=_ptr(b1), w2t=_ptr(w2t), b2=_ptr(b2), rank=rank, budget=_ptr(budget),
                      heads=_ptr(heads), G=groups, S=(heads.numel() // groups if heads is not None else 1),
                      hid=_ptr(self.hid), logits=_ptr(self.logits), sel=_ptr(self.sel), hidx=_ptr(self.hidx),
                      hval=_ptr(self.hval), keep=_ptr(keep),
                      K=K, width=width, limit=limit, w_in=_ptr(w_in), w_up=_ptr(w_up), w_out=_ptr(w_out),
                      b_in=_ptr(b_in), b_up=_ptr(b_up), b_out=_ptr(b_out), D=self.D, Do=self.Do, act=act,
                      idx=_ptr(self.idx), g=_ptr(self.g), u=_ptr(self.u))
        self.addr = ctypes.addressof(self.c)
        suffix = SUFFIX[w_in.dtype]
        self._mlp, self._rows, self._cols = (fns[f"plan_{n}_{suffix}"] for n in ("mlp", "head_rows", "head_cols"))

    def mlp(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """One token ``x [D]`` (fp32, contiguous) through the kept units: ``(k, out [Do])``;
        ``k < 0``: more than ``limit`` were kept and nothing was computed."""
        out = torch.empty(self.Do)
        return self._mlp(self.addr, x.data_ptr(), out.data_ptr(), torch.get_num_threads()), out

    def head_rows(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Query rows of the kept heads for ``x [D]``, zero elsewhere: ``(kept, out [K * width])``."""
        out = torch.empty(self.count * self.width)
        return self._rows(self.addr, x.data_ptr(), out.data_ptr(), torch.get_num_threads()), out

    def head_cols(self, a: torch.Tensor) -> torch.Tensor:
        """Output projection of the kept heads' slices of ``a [K * width]``: ``[Do]``."""
        out = torch.empty(self.Do)
        self._cols(self.addr, a.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out


class CBackend:
    """Gathered products by the compiled C library (reads the kept rows in place), plus one-token
    plans (:meth:`plan`) that choose a layer's units and run its gathered projections in one call."""

    name = "c"
    fused = True

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        check_layout(lib, Plan)
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {"gather_rows": ([p, i64, p, i64, p, i64, p, i32], None),
                      "gather_cols": ([p, i64, p, i64, p, i64, p, i32], None)}
        signatures.update({f"plan_{n}": ([p, p, p, i32], i64) for n in ("mlp", "head_rows", "head_cols")})
        self.fns = {}
        for name, (args, res) in signatures.items():
            for dtype, suffix in SUFFIX.items():
                fn = getattr(self.lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = args, res
                self.fns[name, dtype] = self.fns[f"{name}_{suffix}"] = fn
        self.lib.select_top_k.argtypes, self.lib.select_top_k.restype = [p, i64, i64, p, p], None

    def _product(self, op: str, W, idx, X, width: int) -> torch.Tensor:
        fn = self.fns.get((op, W.dtype))
        if fn is None or not W.is_contiguous() or W.device.type != "cpu":
            fallback = TorchBackend()
            return fallback.rows(W, idx, X) if op == "gather_rows" else fallback.cols(W, idx, X)
        X = X.float().contiguous()
        idx = idx.contiguous()
        out = torch.empty(X.shape[0], width, dtype=torch.float32)
        fn(W.data_ptr(), W.shape[1], idx.data_ptr(), idx.numel(), X.data_ptr(), X.shape[0],
           out.data_ptr(), torch.get_num_threads())
        return out

    def rows(self, W, idx, X):
        """``X [M, D]`` -> ``X @ W[idx].T``: ``[M, k]`` float32."""
        return self._product("gather_rows", W, idx, X, idx.numel())

    def cols(self, Wt, idx, A):
        """``A [M, k]`` -> ``A @ Wt[idx]``: ``[M, D]`` float32."""
        return self._product("gather_cols", Wt, idx, A, Wt.shape[1])

    def plan(self, keep: torch.Tensor, width: int, limit: int, **kwargs) -> OneTokenPlan | None:
        """A :class:`OneTokenPlan` (None when the weights' dtype or device has no kernel)."""
        weights = [kwargs["w_in"], kwargs["w_out"]] + ([kwargs["w_up"]] if kwargs.get("w_up") is not None else [])
        if any(w.dtype not in SUFFIX or w.device.type != "cpu" or not w.is_contiguous() for w in weights):
            return None
        return OneTokenPlan(self.fns, keep, width, limit, **kwargs)

    def top_k(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """Keep-mask ``[K]`` of the ``k`` largest of ``values [K]`` (fp32; ties -> lower index)."""
        v = values.float().contiguous()
        keep = torch.empty(v.numel(), dtype=torch.bool)
        scratch = torch.empty(v.numel())
        self.lib.select_top_k(v.data_ptr(), v.numel(), k, scratch.data_ptr(), keep.data_ptr())
        return keep


_BACKENDS: dict[str, object] = {}


def gather_backend(prefer: str | None = None):
    """The gathered-product backend: ``c`` when it compiles (default), else ``torch``.

    ``prefer`` (or ``$ATTRSPARSE_KERNEL``): ``auto``, ``c`` or ``torch``.
    """
    prefer = prefer or os.environ.get("ATTRSPARSE_KERNEL", "auto")
    if prefer == "torch":
        return _BACKENDS.setdefault("torch", TorchBackend())
    if "c" not in _BACKENDS:
        try:
            _BACKENDS["c"] = CBackend(load_library("gather"))
        except (KernelBuildError, OSError, AttributeError) as exc:
            _BACKENDS["c"] = None
            warnings.warn(f"attrsparse: gathered C kernels unavailable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); using index_select")
    return _BACKENDS["c"] or _BACKENDS.setdefault("torch", TorchBackend())


def measure_break_even(weights: list[tuple[torch.Tensor, torch.Tensor]], backend, repeats: int = 3,
                       fractions=(0.3, 0.5, 0.7, 0.85, 0.95)) -> float:
    """Largest kept fraction at which the gathered MLP of one token beats the dense one.

    ``weights``: per layer ``(W_in [N, D] row-major, Wt_down [N, D'] row-major)``. Times one pass
    over every layer (so the weights are not all in cache), median of ``repeats``. Timing decides
    only *where* the runtime falls back to dense, never a result.
    """
    n = weights[0][0].shape[0]
    x = torch.randn(1, weights[0][0].shape[1])
    a_full = torch.randn(1, n)

    def run_dense():
        for w_in, wt in weights:
            F.linear(x.to(w_in.dtype), w_in) @ wt

    def run_gather(idx):
        a = a_full[:, : idx.numel()]
        for w_in, wt in weights:
            backend.rows(w_in, idx, x)
            backend.cols(wt, idx, a)

    def median(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    generator = torch.Generator().manual_seed(0)
    best = 0.0
    dense = median(run_dense)
    for frac in fractions:
        idx = torch.randperm(n, generator=generator)[: max(1, int(frac * n))].sort().values
        if median(lambda: run_gather(idx)) < dense:
            best = frac
    return best
