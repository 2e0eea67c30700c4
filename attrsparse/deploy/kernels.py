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

The C library also has one-token entry points driven by the keep-mask itself: a whole MLP
(kept gate/up or fc1 rows, the activation, kept down-projection columns) in one call, and the
query rows / output-projection columns of the kept heads. The modules that use them are in
:mod:`attrsparse.deploy.gathered`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <omp.h>
typedef uint16_t bf16;
static inline float bf2f(bf16 v) { union { uint32_t u; float f; } c; c.u = (uint32_t)v << 16; return c.f; }
static inline float id_f32(float v) { return v; }

/* activations: 0 silu, 1 gelu (tanh approximation), 2 gelu (erf), 3 relu */
static inline float act(float v, int kind) {
    switch (kind) {
    case 0: return v / (1.0f + expf(-v));
    case 1: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case 2: return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
    default: return v > 0.0f ? v : 0.0f;
    }
}

/* Rows are read in blocks of four: four independent accumulator chains share each load of x. */
#define DEFINE(NAME, T, LOAD)                                                                   \
static inline float dot1_##NAME(const T* restrict w, const float* restrict x, int64_t n) {     \
    float acc[16] = {0}; int64_t j = 0;                                                         \
    for (; j + 16 <= n; j += 16) for (int t = 0; t < 16; t++) acc[t] += LOAD(w[j + t]) * x[j + t]; \
    float s = 0; for (; j < n; j++) s += LOAD(w[j]) * x[j];                                     \
    for (int t = 0; t < 16; t++) s += acc[t];                                                   \
    return s;                                                                                   \
}                                                                                               \
static inline void dot4_##NAME(const T* restrict w0, const T* restrict w1, const T* restrict w2, \
                               const T* restrict w3, const float* restrict x, int64_t n, float* r) { \
    float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0}; int64_t j = 0;              \
    for (; j + 16 <= n; j += 16) for (int t = 0; t < 16; t++) {                                 \
        float xv = x[j + t];                                                                    \
        a0[t] += LOAD(w0[j + t]) * xv; a1[t] += LOAD(w1[j + t]) * xv;                           \
        a2[t] += LOAD(w2[j + t]) * xv; a3[t] += LOAD(w3[j + t]) * xv; }                         \
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                       \
    for (; j < n; j++) { float xv = x[j]; s0 += LOAD(w0[j]) * xv; s1 += LOAD(w1[j]) * xv;       \
                         s2 += LOAD(w2[j]) * xv; s3 += LOAD(w3[j]) * xv; }                      \
    for (int t = 0; t < 16; t++) { s0 += a0[t]; s1 += a1[t]; s2 += a2[t]; s3 += a3[t]; }        \
    r[0] = s0; r[1] = s1; r[2] = s2; r[3] = s3;                                                 \
}                                                                                               \
/* out[m, r] = sum_j W[idx[r], j] * X[m, j];  W [*, D], X [M, D], out [M, k] */                 \
void gather_rows_##NAME(const T* W, int64_t D, const int64_t* idx, int64_t k,                   \
                        const float* X, int64_t M, float* out, int nt) {                       \
    int64_t k4 = k / 4;                                                                         \
    for (int64_t m = 0; m < M; m++) {                                                           \
        const float* x = X + m * D; float* o = out + m * k;                                     \
        _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")                 \
        for (int64_t q = 0; q < k4; q++) {                                                      \
            int64_t r = 4 * q; float res[4];                                                    \
            dot4_##NAME(W + idx[r] * D, W + idx[r + 1] * D, W + idx[r + 2] * D, W + idx[r + 3] * D, x, D, res); \
            o[r] = res[0]; o[r + 1] = res[1]; o[r + 2] = res[2]; o[r + 3] = res[3];             \
        }                                                                                       \
        for (int64_t r = 4 * k4; r < k; r++) o[r] = dot1_##NAME(W + idx[r] * D, x, D);           \
    }                                                                                           \
}                                                                                               \
/* out[m, j] = sum_r A[m, r] * W[idx[r], j];  W [*, D], A [M, k], out [M, D] */                 \
void gather_cols_##NAME(const T* W, int64_t D, const int64_t* idx, int64_t k,                   \
                        const float* A, int64_t M, float* out, int nt) {                       \
    _Pragma("omp parallel num_threads(nt) if(nt > 1)")                                          \
    {                                                                                           \
        int t = omp_get_thread_num(), n = omp_get_num_threads();                                \
        int64_t j0 = D * t / n, j1 = D * (t + 1) / n;                                           \
        for (int64_t m = 0; m < M; m++) {                                                       \
            float* restrict o = out + m * D; const float* a = A + m * k; int64_t r = 0;        \
            for (int64_t j = j0; j < j1; j++) o[j] = 0;                                         \
            for (; r + 4 <= k; r += 4) {                                                        \
                const T* restrict w0 = W + idx[r] * D; const T* restrict w1 = W + idx[r + 1] * D; \
                const T* restrict w2 = W + idx[r + 2] * D; const T* restrict w3 = W + idx[r + 3] * D; \
                float c0 = a[r], c1 = a[r + 1], c2 = a[r + 2], c3 = a[r + 3];                   \
                for (int64_t j = j0; j < j1; j++)                                               \
                    o[j] += c0 * LOAD(w0[j]) + c1 * LOAD(w1[j]) + c2 * LOAD(w2[j]) + c3 * LOAD(w3[j]); \
            }                                                                                   \
            for (; r < k; r++) { const T* restrict w = W + idx[r] * D; float c = a[r];          \
                for (int64_t j = j0; j < j1; j++) o[j] += c * LOAD(w[j]); }                     \
        }                                                                                       \
    }                                                                                           \
}                                                                                               \
/* One token through an MLP restricted to units idx: W_in rows (gate; up if gated, else NULL), \
   biases (NULL if none), Wt_down [N, Do] row-major. g, u: scratch [k]; out [Do]. */            \
void gathered_mlp_##NAME(const T* Wg, const T* Wu, const float* bg, const float* bu,            \
                         const T* Wdt, const float* bd, int64_t D, int64_t Do,                  \
                         const int64_t* idx, int64_t k, const float* x, float* g, float* u,     \
                         float* out, int kind, int nt) {                                       \
    gather_rows_##NAME(Wg, D, idx, k, x, 1, g, nt);                                             \
    if (Wu) gather_rows_##NAME(Wu, D, idx, k, x, 1, u, nt);                                     \
    for (int64_t r = 0; r < k; r++) {                                                           \
        float h = act(g[r] + (bg ? bg[idx[r]] : 0.0f), kind);                                   \
        g[r] = Wu ? h * (u[r] + (bu ? bu[idx[r]] : 0.0f)) : h;                                  \
    }                                                                                           \
    gather_cols_##NAME(Wdt, Do, idx, k, g, 1, out, nt);                                         \
    if (bd) for (int64_t j = 0; j < Do; j++) out[j] += bd[j];                                   \
}                                                                                               \
/* Mask-driven one-token entry points: keep [K] (bool bytes) -> the kept count k. When k > limit \
   nothing is computed and -(k + 1) is returned (the caller runs dense). idx: scratch [K * Dh]. */ \
int64_t masked_mlp_##NAME(const T* Wg, const T* Wu, const float* bg, const float* bu,            \
                          const T* Wdt, const float* bd, int64_t D, int64_t Do,                 \
                          const uint8_t* keep, int64_t N, int64_t limit, const float* x,        \
                          int64_t* idx, float* g, float* u, float* out, int kind, int nt) {    \
    int64_t k = 0;                                                                              \
    for (int64_t i = 0; i < N; i++) if (keep[i]) idx[k++] = i;                                  \
    if (k > limit) return -(k + 1);                                                             \
    gathered_mlp_##NAME(Wg, Wu, bg, bu, Wdt, bd, D, Do, idx, k, x, g, u, out, kind, nt);        \
    return k;                                                                                   \
}                                                                                               \
/* query rows of the kept heads (+ bias), zero elsewhere: W [H*Dh, D], out [H*Dh] */            \
int64_t masked_head_rows_##NAME(const T* W, const float* b, int64_t D, const uint8_t* keep,     \
                                int64_t H, int64_t Dh, int64_t limit, const float* x,           \
                                int64_t* idx, float* compact, float* out, int nt) {            \
    int64_t kh = 0, k = 0;                                                                      \
    for (int64_t h = 0; h < H; h++) if (keep[h]) { kh++; for (int64_t t = 0; t < Dh; t++) idx[k++] = h * Dh + t; } \
    if (kh > limit) return -(kh + 1);                                                           \
    gather_rows_##NAME(W, D, idx, k, x, 1, compact, nt);                                        \
    for (int64_t r = 0; r < H * Dh; r++) out[r] = 0.0f;                                         \
    for (int64_t r = 0; r < k; r++) out[idx[r]] = compact[r] + (b ? b[idx[r]] : 0.0f);          \
    return kh;                                                                                  \
}                                                                                               \
/* output projection of the kept heads: Wt [H*Dh, Do] row-major, a [H*Dh] -> out [Do] (+ bias) */ \
int64_t masked_head_cols_##NAME(const T* Wt, const float* b, int64_t Do, const uint8_t* keep,   \
                                int64_t H, int64_t Dh, const float* a, int64_t* idx,            \
                                float* compact, float* out, int nt) {                          \
    int64_t kh = 0, k = 0;                                                                      \
    for (int64_t h = 0; h < H; h++) if (keep[h]) { kh++; for (int64_t t = 0; t < Dh; t++) { idx[k] = h * Dh + t; compact[k] = a[h * Dh + t]; k++; } } \
    gather_cols_##NAME(Wt, Do, idx, k, compact, 1, out, nt);                                    \
    if (b) for (int64_t j = 0; j < Do; j++) out[j] += b[j];                                     \
    return kh;                                                                                  \
}

DEFINE(f32, float, id_f32)
DEFINE(bf16, bf16, bf2f)
"""

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}-{flags}"


def _build_library() -> Path:
    """Compile :data:`_SOURCE` once per source and CPU into the cache; return the library path."""
    from ..models import cache_root

    key = hashlib.sha256((_SOURCE + _cpu_tag()).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"libattrsparse_gather-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "gather.c", Path(tmp) / lib.name
        src.write_text(_SOURCE)
        subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99",
                        str(src), "-o", str(out), "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(out, lib)
    return lib


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


class CBackend:
    """Gathered products by the compiled C library (reads the kept rows in place), plus fused
    one-token entry points driven by the keep-mask itself (:meth:`mlp`, :meth:`head_rows`,
    :meth:`head_cols`)."""

    name = "c"
    fused = True

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {
            "gather_rows": ([p, i64, p, i64, p, i64, p, i32], None),
            "gather_cols": ([p, i64, p, i64, p, i64, p, i32], None),
            "masked_mlp": ([p, p, p, p, p, p, i64, i64, p, i64, i64, p, p, p, p, p, i32, i32], i64),
            "masked_head_rows": ([p, p, i64, p, i64, i64, i64, p, p, p, p, i32], i64),
            "masked_head_cols": ([p, p, i64, p, i64, i64, p, p, p, p, i32], i64),
        }
        self.fns = {}
        for name, (args, res) in signatures.items():
            for dtype, suffix in _SUFFIX.items():
                fn = getattr(self.lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = args, res
                self.fns[name, dtype] = fn

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

    def mlp(self, m, keep: torch.Tensor, x: torch.Tensor, limit: int) -> tuple[int, torch.Tensor]:
        """One token ``x [D]`` through the kept units of a :class:`~attrsparse.deploy.gathered.
        GatheredMLP` ``m``: ``(k, out [Do])``; ``k < 0`` means
        more than ``limit`` units were kept and nothing was computed."""
        out = torch.empty(m.wt_down.shape[1])
        k = self.fns["masked_mlp", m.w_gate.dtype](
            m.w_gate.data_ptr(), _ptr(m.w_up), _ptr(m.b_gate), _ptr(m.b_up), m.wt_down.data_ptr(),
            _ptr(m.b_down), m.w_gate.shape[1], m.wt_down.shape[1], keep.data_ptr(), keep.numel(), limit,
            x.data_ptr(), m.idx.data_ptr(), m.g.data_ptr(), m.u.data_ptr(), out.data_ptr(), m.code,
            torch.get_num_threads())
        return k, out

    def head_rows(self, W, bias, keep, head_dim: int, x, limit: int, scratch) -> tuple[int, torch.Tensor]:
        """Query rows of the kept heads for one token ``x [D]``: ``(kept, out [H * head_dim])``."""
        out = torch.empty(keep.numel() * head_dim)
        k = self.fns["masked_head_rows", W.dtype](
            W.data_ptr(), _ptr(bias), W.shape[1], keep.data_ptr(), keep.numel(), head_dim, limit,
            x.data_ptr(), scratch[0].data_ptr(), scratch[1].data_ptr(), out.data_ptr(), torch.get_num_threads())
        return k, out

    def head_cols(self, Wt, bias, keep, head_dim: int, a, scratch) -> torch.Tensor:
        """Output projection of the kept heads' slices of ``a [H * head_dim]``: ``[Do]``."""
        out = torch.empty(Wt.shape[1])
        self.fns["masked_head_cols", Wt.dtype](
            Wt.data_ptr(), _ptr(bias), Wt.shape[1], keep.data_ptr(), keep.numel(), head_dim, a.data_ptr(),
            scratch[0].data_ptr(), scratch[1].data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out


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
            _BACKENDS["c"] = CBackend(_build_library())
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
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
