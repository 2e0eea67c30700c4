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

/* layout of Plan for the ctypes mirror (attrsparse.deploy.kernels.build.check_layout) */
#include <stddef.h>
#define OFF(f) (int64_t)offsetof(Plan, f)
const int64_t attrsparse_layout_Plan[] = {
    (int64_t)sizeof(Plan), OFF(w1), OFF(b1), OFF(w2t), OFF(b2), OFF(rank), OFF(budget), OFF(heads),
    OFF(G), OFF(S), OFF(hid), OFF(logits), OFF(sel), OFF(hidx), OFF(hval), OFF(keep), OFF(K),
    OFF(width), OFF(limit), OFF(w_in), OFF(w_up), OFF(w_out), OFF(b_in), OFF(b_up), OFF(b_out),
    OFF(D), OFF(Do), OFF(act), OFF(idx), OFF(g), OFF(u)};
#undef OFF
