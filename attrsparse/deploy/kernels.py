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
#define PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 3)

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
/* the same over four rows; the next four rows (f0..f3) are prefetched a cache line per step */  \
static inline void dot4_##NAME(const T* restrict w0, const T* restrict w1, const T* restrict w2, \
                               const T* restrict w3, const float* restrict x, int64_t n, float* r, \
                               const T* f0, const T* f1, const T* f2, const T* f3) {            \
    float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0}; int64_t j = 0;              \
    for (; j + 16 <= n; j += 16) {                                                              \
        PREFETCH(f0 + j); PREFETCH(f1 + j); PREFETCH(f2 + j); PREFETCH(f3 + j);                 \
        for (int t = 0; t < 16; t++) {                                                          \
            float xv = x[j + t];                                                                \
            a0[t] += LOAD(w0[j + t]) * xv; a1[t] += LOAD(w1[j + t]) * xv;                       \
            a2[t] += LOAD(w2[j + t]) * xv; a3[t] += LOAD(w3[j + t]) * xv; } }                   \
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
            int64_t r = 4 * q, n = q + 1 < k4 ? r + 4 : r; float res[4];                        \
            dot4_##NAME(W + idx[r] * D, W + idx[r + 1] * D, W + idx[r + 2] * D, W + idx[r + 3] * D, x, D, res, \
                        W + idx[n] * D, W + idx[n + 1] * D, W + idx[n + 2] * D, W + idx[n + 3] * D); \
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
}

DEFINE(f32, float, id_f32)
DEFINE(bf16, bf16, bf2f)

/* ---- one-token plans: choose a layer's units and run its gathered projections in one call ---- */

/* out[r] = relu(W[r] . x + b[r]) for r < R: W [R, D] fp32 row-major */
static void matvec_relu(const float* W, const float* b, int64_t R, int64_t D, const float* x, float* out) {
    int64_t R4 = R / 4;
    for (int64_t q = 0; q < R4; q++) {  /* rows are consecutive: prefetch the next four */
        const float* w = W + 4 * q * D; const float* f = q + 1 < R4 ? w + 4 * D : w;
        dot4_f32(w, w + D, w + 2 * D, w + 3 * D, x, D, out + 4 * q, f, f + D, f + 2 * D, f + 3 * D);
    }
    for (int64_t r = 4 * R4; r < R; r++) out[r] = dot1_f32(W + r * D, x, D);
    for (int64_t r = 0; r < R; r++) { float v = out[r] + (b ? b[r] : 0.0f); out[r] = v > 0.0f ? v : 0.0f; }
}

/* Order-preserving unsigned key of a float (-0.0 as 0.0): larger float, larger key. */
static inline uint32_t fkey(float f) {
    union { float f; uint32_t u; } c; c.f = f == 0.0f ? 0.0f : f;
    return (c.u & 0x80000000u) ? ~c.u : (c.u | 0x80000000u);
}

/* keep[i] = 1 for the k entries of v [K] ranked first by value, ties to the lower index (a stable
   descending sort): all above the k-th largest, then the first of those equal to it. The k-th
   largest key is found by radix selection (11 + 11 + 10 bits, branch-free histograms).
   s: scratch [K] (keys). v holds no NaN. */
void select_top_k(const float* v, int64_t K, int64_t k, float* s, uint8_t* keep) {
    if (k <= 0 || k >= K) { for (int64_t i = 0; i < K; i++) keep[i] = k >= K; return; }
    uint32_t* key = (uint32_t*)s, prefix = 0, mask = 0;
    int64_t rank = k;  /* rank of the wanted key among those matching prefix under mask */
    static const int shift[3] = {21, 10, 0}, bits[3] = {11, 11, 10};
    for (int64_t i = 0; i < K; i++) key[i] = fkey(v[i]);
    for (int p = 0; p < 3; p++) {
        uint32_t hist[2048] = {0}, m = (1u << bits[p]) - 1;
        for (int64_t i = 0; i < K; i++)
            hist[(key[i] >> shift[p]) & m] += (key[i] & mask) == prefix;
        int64_t b = m;
        while (hist[b] < rank) rank -= hist[b--];
        prefix |= (uint32_t)b << shift[p];
        mask |= m << shift[p];
    }
    int64_t ties = k;  /* prefix is now the k-th largest key */
    for (int64_t i = 0; i < K; i++) ties -= key[i] > prefix;
    for (int64_t i = 0; i < K; i++) {
        int take = (key[i] > prefix) | ((key[i] == prefix) & (ties > 0));
        ties -= (key[i] == prefix) & take;
        keep[i] = (uint8_t)take;
    }
}

/* One layer's units of one kind (MLP units or heads) for one token row. Every field is 8 bytes
   (ctypes mirror: attrsparse.deploy.kernels.Plan). */
typedef struct {
    const float *w1, *b1, *w2t, *b2;  /* predictor: logits = w2t' relu(w1 x + b1) + b2; w1 [rank, D], w2t [rank, K] */
    int64_t rank;                      /* 0: the keep-mask is given in keep (static masks, or set by the caller) */
    const int64_t* budget;             /* units kept: budget[0], or budget[nh * (G + 1) + ng] when heads != NULL */
    const uint8_t* heads;              /* the layer's head keep-mask [G * S] sizing an MLP budget, or NULL */
    int64_t G, S;                      /* key/value groups, query heads per group */
    float *hid, *logits, *sel;         /* scratch [rank], [K], [K] */
    int64_t* hidx; float* hval;        /* scratch [rank]: the predictor's nonzero hidden units */
    uint8_t* keep;                     /* [K] the keep-mask (written when chosen) */
    int64_t K, width, limit;           /* units, features per unit, most units a gathered call keeps */
    const void *w_in, *w_up, *w_out;   /* [K * width, D] rows (gate/fc1/query); up [K, D] or NULL; [K * width, Do] */
    const float *b_in, *b_up, *b_out;  /* biases (fp32) or NULL */
    int64_t D, Do, act;                /* input and output features; activation code (MLP) */
    int64_t* idx; float *g, *u;        /* scratch [K * width] */
} Plan;

/* Choose the units (when the plan has a predictor) and list their features in idx: units kept. */
static int64_t plan_choose(Plan* p, const float* x, int nt) {
    if (p->rank > 0) {
        matvec_relu(p->w1, p->b1, p->rank, p->D, x, p->hid);  /* small products: one thread */
        int64_t n = 0;  /* logits: rows of w2t of the nonzero hidden units only */
        for (int64_t i = 0; i < p->rank; i++) if (p->hid[i] != 0.0f) { p->hidx[n] = i; p->hval[n++] = p->hid[i]; }
        gather_cols_f32(p->w2t, p->K, p->hidx, n, p->hval, 1, p->logits, 1);
        for (int64_t j = 0; j < p->K; j++) {
            float v = p->logits[j] + (p->b2 ? p->b2[j] : 0.0f);
            p->logits[j] = v == v ? v : -INFINITY;
        }
        int64_t k = p->budget[0];
        if (p->heads) {
            int64_t nh = 0, ng = 0;
            for (int64_t g = 0; g < p->G; g++) {
                int any = 0;
                for (int64_t s = 0; s < p->S; s++) if (p->heads[g * p->S + s]) { nh++; any = 1; }
                ng += any;
            }
            k = p->budget[nh * (p->G + 1) + ng];
        }
        select_top_k(p->logits, p->K, k, p->sel, p->keep);
    }
    int64_t n = 0, w = p->width;
    if (w == 1) {  /* branch-free: the kept set is unpredictable */
        for (int64_t i = 0; i < p->K; i++) { p->idx[n] = i; n += p->keep[i] != 0; }
        return n;
    }
    for (int64_t i = 0; i < p->K; i++) if (p->keep[i]) for (int64_t t = 0; t < w; t++) p->idx[n++] = i * w + t;
    return n / w;
}

/* Entry points -> units kept; when more than limit, nothing is computed and -(kept + 1) returned
   (the caller runs dense with the keep-mask). mlp: x [D] -> out [Do]; head_rows: query rows of the
   kept heads (+ bias), zero elsewhere, out [K * width]; head_cols: a [K * width] -> out [Do]. */
#define DEFINE_PLAN(NAME, T)                                                                    \
int64_t plan_mlp_##NAME(Plan* p, const float* x, float* out, int nt) {                          \
    int64_t k = plan_choose(p, x, nt);                                                          \
    if (k > p->limit) return -(k + 1);                                                          \
    gathered_mlp_##NAME((const T*)p->w_in, (const T*)p->w_up, p->b_in, p->b_up, (const T*)p->w_out, \
                        p->b_out, p->D, p->Do, p->idx, k, x, p->g, p->u, out, (int)p->act, nt); \
    return k;                                                                                   \
}                                                                                               \
int64_t plan_head_rows_##NAME(Plan* p, const float* x, float* out, int nt) {                    \
    int64_t kh = plan_choose(p, x, nt), k = kh * p->width;                                      \
    if (kh > p->limit) return -(kh + 1);                                                        \
    gather_rows_##NAME((const T*)p->w_in, p->D, p->idx, k, x, 1, p->g, nt);                     \
    for (int64_t r = 0; r < p->K * p->width; r++) out[r] = 0.0f;                                \
    for (int64_t r = 0; r < k; r++) out[p->idx[r]] = p->g[r] + (p->b_in ? p->b_in[p->idx[r]] : 0.0f); \
    return kh;                                                                                  \
}                                                                                               \
int64_t plan_head_cols_##NAME(Plan* p, const float* a, float* out, int nt) {                    \
    int64_t k = 0, w = p->width;                                                                \
    for (int64_t h = 0; h < p->K; h++) if (p->keep[h])                                          \
        for (int64_t t = 0; t < w; t++) { p->idx[k] = h * w + t; p->g[k] = a[h * w + t]; k++; } \
    gather_cols_##NAME((const T*)p->w_out, p->Do, p->idx, k, p->g, 1, out, nt);                 \
    if (p->b_out) for (int64_t j = 0; j < p->Do; j++) out[j] += p->b_out[j];                    \
    return k / w;                                                                               \
}

DEFINE_PLAN(f32, float)
DEFINE_PLAN(bf16, bf16)
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


_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class Plan(ctypes.Structure):
    """ctypes mirror of the C ``Plan`` (every field 8 bytes; see :data:`_SOURCE`)."""

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
        suffix = _SUFFIX[w_in.dtype]
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

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {"gather_rows": ([p, i64, p, i64, p, i64, p, i32], None),
                      "gather_cols": ([p, i64, p, i64, p, i64, p, i32], None)}
        signatures.update({f"plan_{n}": ([p, p, p, i32], i64) for n in ("mlp", "head_rows", "head_cols")})
        self.fns = {}
        for name, (args, res) in signatures.items():
            for dtype, suffix in _SUFFIX.items():
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
        if any(w.dtype not in _SUFFIX or w.device.type != "cpu" or not w.is_contiguous() for w in weights):
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
