/* attrsparse native decode engine: one call per token (embedding, norms, RoPE, attention over an
 * fp32 or bf16 KV cache, the seven input-sparse linears, LM head, greedy / screened greedy / sampling).
 *
 * Threading: one OpenMP parallel region per token. Every thread keeps its own copy of the
 * residual stream and computes the norms and the site rules redundantly (same code, same
 * values); a linear's kept-row list (one per projection under a per-projection rule) is cut into
 * PARTS fixed parts (engine_kern.h), each summed over its columns into its own buffer and the
 * parts added in order; attention is split over heads, the head over vocabulary rows, with
 * barriers between phases. The parts do not depend on the thread count, so 1, 2 or 3 threads
 * give identical bits.
 *
 * Screened greedy head (exact): an int8 copy of the head gives approx_v with a bound
 * |exact_v - approx_v| <= c_v * ||h|| (c_v from the packer: residual norm plus rounding terms,
 * see attrsparse/deploy/engine/pack.py); rows whose upper bound is below the best lower bound
 * cannot hold the maximum, and only the others are computed exactly, with the same code as the
 * full head. See docs/engine.md for the proof.
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "engine.h"
#include "engine_kern.h"

#define LAYOUT(S, ...) const int64_t attrsparse_layout_##S[] = {sizeof(S), __VA_ARGS__};
LAYOUT(EngSite, offsetof(EngSite, scale), offsetof(EngSite, center), offsetof(EngSite, keep),
       offsetof(EngSite, bias), offsetof(EngSite, threshold), offsetof(EngSite, rule),
       offsetof(EngSite, pscale), offsetof(EngSite, pthreshold), offsetof(EngSite, prule))
LAYOUT(EngLayer, offsetof(EngLayer, w), offsetof(EngLayer, wscale), offsetof(EngLayer, wbias),
       offsetof(EngLayer, norm), offsetof(EngLayer, q_norm), offsetof(EngLayer, k_norm),
       offsetof(EngLayer, inv_freq), offsetof(EngLayer, rope_scale), offsetof(EngLayer, window),
       offsetof(EngLayer, site))
LAYOUT(EngModel, offsetof(EngModel, n_layers), offsetof(EngModel, hidden), offsetof(EngModel, n_heads),
       offsetof(EngModel, n_kv), offsetof(EngModel, head_dim), offsetof(EngModel, inter),
       offsetof(EngModel, vocab), offsetof(EngModel, wtype), offsetof(EngModel, head_type),
       offsetof(EngModel, emb_type), offsetof(EngModel, act), offsetof(EngModel, eps),
       offsetof(EngModel, emb_scale), offsetof(EngModel, attn_scale), offsetof(EngModel, attn_softcap),
       offsetof(EngModel, final_softcap), offsetof(EngModel, head_fd), offsetof(EngModel, embed),
       offsetof(EngModel, embed_scale), offsetof(EngModel, head), offsetof(EngModel, head_scale),
       offsetof(EngModel, screen), offsetof(EngModel, screen_scale), offsetof(EngModel, screen_bound),
       offsetof(EngModel, final_norm), offsetof(EngModel, layers), offsetof(EngModel, head_off),
       offsetof(EngModel, head_lin))
LAYOUT(EngStep, offsetof(EngStep, token), offsetof(EngStep, threads), offsetof(EngStep, mode),
       offsetof(EngStep, temperature), offsetof(EngStep, top_p), offsetof(EngStep, logits),
       offsetof(EngStep, kept), offsetof(EngStep, next), offsetof(EngStep, linear_reads),
       offsetof(EngStep, head_bytes), offsetof(EngStep, candidates), offsetof(EngStep, check))

#define MAXT 64

typedef struct Thr {
    float *h, *xn, *val, *tmp, *sc, *cs, *sn, *kcur, *vcur, *row;
    int32_t* idx;
    const float* rope_src;   /* cos/sin table cache: (inv_freq, pos) */
    int64_t rope_pos;
    float lmax, best;
    int64_t besti, cand;
    char pad[64];
} Thr;

typedef struct EngState {
    int64_t max_ctx, pos, n_threads;
    uint64_t rng;
    int32_t kv_type;         /* ENG_F32 or ENG_BF16: the stored past keys and values */
    void *kc, *vc;           /* [n_layers][n_kv][max_ctx][hd] of kv_type */
    float *att, *gu, *mact, *logits, *upper;
    float *pq[2], *po[2], *pg[2], *pd[2];   /* the two parts of each linear (engine_kern.h: PARTS) */
    float *ph[2];                           /* the input-sparse head's parts (lazy: touched only with one) */
    int64_t* kept;           /* [n_layers * N_PROJ] of the last step */
    struct { float e; int32_t i; }* pairs;
    Thr th[MAXT];
} EngState;

static void* zalloc(int64_t n) {
    void* p = NULL;
    size_t size = (size_t)((n + 63) / 64 * 64 + 64);
    if (posix_memalign(&p, 64, size) != 0) return NULL;
    memset(p, 0, size);
    return p;
}

/* Large buffers that a run may touch only in part (the KV cache beyond the positions used, the
 * screen's bounds without a screen, the sampler's pairs when greedy): anonymous pages, zero and
 * not resident until written, so the process holds only what it uses. The mapping's size sits in
 * its first 64 bytes. */
static void* lazy_alloc(int64_t n) {
    size_t size = (size_t)((n + 64 + 4095) / 4096 * 4096);
    void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    *(size_t*)p = size;
    return (char*)p + 64;
}
static void lazy_free(void* q) {
    if (!q) return;
    char* p = (char*)q - 64;
    munmap(p, *(size_t*)p);
}

static inline int64_t elt_size(int32_t wt) { return wt == ENG_F32 ? 4 : wt == ENG_BF16 ? 2 : 1; }
static int64_t max3(int64_t a, int64_t b, int64_t c) { int64_t m = a > b ? a : b; return m > c ? m : c; }

void eng_state_free(EngState* s) {
    if (!s) return;
    lazy_free(s->kc); lazy_free(s->vc); free(s->att); free(s->gu); free(s->mact);
    lazy_free(s->logits); lazy_free(s->upper); free(s->kept); lazy_free(s->pairs);
    for (int i = 0; i < 2; i++) { free(s->pq[i]); free(s->po[i]); free(s->pg[i]); free(s->pd[i]); lazy_free(s->ph[i]); }
    for (int t = 0; t < MAXT; t++) {
        Thr* T = &s->th[t];
        free(T->h); free(T->xn); free(T->val); free(T->tmp); lazy_free(T->sc); free(T->cs); free(T->sn); free(T->idx);
        free(T->kcur); free(T->vcur); free(T->row);
    }
    free(s);
}

EngState* eng_state_new(const EngModel* m, int64_t max_ctx, int32_t threads, uint64_t seed, int32_t kv_type) {
    if (threads < 1) threads = 1;
    if (kv_type != ENG_F32 && kv_type != ENG_BF16) return NULL;
    if (threads > MAXT) threads = MAXT;
    EngState* s = calloc(1, sizeof(EngState));
    if (!s) return NULL;
    int64_t d = m->hidden, hd = m->head_dim, A = m->n_heads * hd, P = (m->n_heads + 2 * m->n_kv) * hd;
    int64_t cache = m->n_layers * m->n_kv * max_ctx * hd * elt_size(kv_type);
    int64_t wide = max3(d, A, m->inter) + 16;
    s->max_ctx = max_ctx; s->n_threads = threads; s->rng = seed; s->kv_type = kv_type;
    s->kc = lazy_alloc(cache); s->vc = lazy_alloc(cache);
    s->att = zalloc(A * 4); s->gu = zalloc(2 * m->inter * 4); s->mact = zalloc(m->inter * 4);
    int ok = 1;
    for (int i = 0; i < 2; i++) {
        s->pq[i] = zalloc(P * 4); s->po[i] = zalloc(d * 4); s->pg[i] = zalloc(2 * m->inter * 4); s->pd[i] = zalloc(d * 4);
        s->ph[i] = lazy_alloc(m->vocab * 4);
        ok = ok && s->pq[i] && s->po[i] && s->pg[i] && s->pd[i] && s->ph[i];
    }
    s->logits = lazy_alloc(m->vocab * 4); s->upper = lazy_alloc(m->vocab * 4);
    s->kept = zalloc((m->n_layers + 1) * N_PROJ * 8);
    s->pairs = lazy_alloc(m->vocab * 8);
    ok = ok && s->kc && s->vc && s->att && s->gu && s->mact && s->logits && s->upper && s->kept && s->pairs;
    for (int t = 0; t < threads && ok; t++) {
        Thr* T = &s->th[t];
        /* idx / val: one kept list per projection of a site (site_select), n + 16 entries each */
        T->h = zalloc(d * 4); T->xn = zalloc(wide * 4); T->val = zalloc(MAX_PROJ * wide * 4); T->tmp = zalloc(wide * 4);
        T->sc = lazy_alloc(max_ctx * 4); T->cs = zalloc(hd * 4); T->sn = zalloc(hd * 4); T->idx = zalloc(MAX_PROJ * wide * 4);
        T->kcur = zalloc(hd * 4); T->vcur = zalloc(hd * 4); T->row = zalloc(d * 4);
        ok = T->h && T->xn && T->val && T->tmp && T->sc && T->cs && T->sn && T->idx && T->kcur && T->vcur && T->row;
    }
    if (!ok) { eng_state_free(s); return NULL; }
    return s;
}

void eng_state_reset(EngState* s, uint64_t seed) { s->pos = 0; s->rng = seed; for (int t = 0; t < MAXT; t++) s->th[t].rope_src = NULL; }
int64_t eng_state_pos(const EngState* s) { return s->pos; }
const int64_t* eng_state_kept(const EngState* s) { return s->kept; }

/* ---------------------------------------------------------------- small pieces */

/* fp32 -> bf16, rounded to nearest even (as torch's .to(torch.bfloat16)); NaN stays NaN */
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } c = {f};
    if ((c.u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((c.u >> 16) | 0x40u);
    return (uint16_t)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

/* the KV cache: row `at` (an element offset) of a cache of `type` */
static void kv_put(void* cache, int32_t type, int64_t at, const float* x, int64_t hd) {
    if (type == ENG_BF16) for (int64_t c = 0; c < hd; c++) ((uint16_t*)cache)[at + c] = f32_to_bf16(x[c]);
    else memcpy((float*)cache + at, x, (size_t)hd * 4);
}
static inline float kv_dot(const void* cache, int32_t type, int64_t at, const float* q, int64_t hd) {
    return type == ENG_BF16 ? dot_bf16((const uint16_t*)cache + at, q, hd) : dot_f32((const float*)cache + at, q, hd);
}
/* o += p * row `at` of the cache */
static inline void kv_axpy(float* o, float p, const void* cache, int32_t type, int64_t at, int64_t hd) {
    if (type == ENG_BF16) { const uint16_t* r = (const uint16_t*)cache + at; for (int64_t c = 0; c < hd; c++) o[c] += p * bf16_to_f32(r[c]); }
    else { const float* r = (const float*)cache + at; for (int64_t c = 0; c < hd; c++) o[c] += p * r[c]; }
}

static void rmsnorm(const float* x, const float* w, float* out, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t j = 0; j < n; j++) ss += (double)x[j] * x[j];
    float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t j = 0; j < n; j++) out[j] = (x[j] * r) * w[j];
}

static inline float act(float v, int32_t kind) {
    if (kind == ACT_SILU) return v / (1.0f + expf(-v));
    if (kind == ACT_GELU_TANH) return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
}

static void slice16(int64_t P, int t, int nt, int64_t* p0, int64_t* p1) {
    int64_t nu = (P + 15) / 16, u0 = nu * t / nt, u1 = nu * (t + 1) / nt;
    *p0 = u0 * 16 < P ? u0 * 16 : P;
    *p1 = u1 * 16 < P ? u1 * 16 : P;
}

static void range(int64_t n, int t, int nt, int64_t* a, int64_t* b) { *a = n * t / nt; *b = n * (t + 1) / nt; }


/* Row v (`n` bytes) of the head: its address in the mapping or, with head_fd > 0 (a mapped file
 * whose head is left unpopulated when it has a screen: runner.py), a copy read into `buf` with pread,
 * so the few rows a screened token reads do not map the head's pages into the process (a page
 * fault maps up to 64 KB around the page). On a failed read, the mapping (the same bytes). */
static const void* head_row_ptr(const EngModel* m, int64_t v, int64_t n, void* buf) {
    const char* mapped = (const char*)m->head + v * n;
    if (m->head_fd <= 0) return mapped;
    int64_t done = 0;
    while (done < n) {
        ssize_t r = pread(m->head_fd, (char*)buf + done, (size_t)(n - done), (off_t)(m->head_off + v * n + done));
        if (r <= 0) return mapped;
        done += (int64_t)r;
    }
    return buf;
}

static void embed_row(const EngModel* m, int64_t tok, float* h, float* buf) {
    int64_t d = m->hidden, n = d * elt_size(m->emb_type), V = m->vocab;
    if (m->head_lin && m->embed == m->head) {  /* tied to an input-major head: its column tok */
        if (m->emb_type == ENG_F32) { const float* w = m->head; for (int64_t j = 0; j < d; j++) h[j] = w[j * V + tok]; }
        else if (m->emb_type == ENG_BF16) { const uint16_t* w = m->head; for (int64_t j = 0; j < d; j++) h[j] = bf16_to_f32(w[j * V + tok]); }
        else { const int8_t* w = m->head; float sc = m->embed_scale[tok]; for (int64_t j = 0; j < d; j++) h[j] = (float)w[j * V + tok] * sc; }
        if (m->emb_scale != 1.0f) for (int64_t j = 0; j < d; j++) h[j] *= m->emb_scale;
        return;
    }
    const void* r = m->embed == m->head && m->emb_type == m->head_type  /* tied: the head's row */
        ? head_row_ptr(m, tok, n, buf) : (const char*)m->embed + tok * n;
    if (m->emb_type == ENG_F32) memcpy(h, r, (size_t)n);
    else if (m->emb_type == ENG_BF16) { const uint16_t* w = r; for (int64_t j = 0; j < d; j++) h[j] = bf16_to_f32(w[j]); }
    else { const int8_t* w = r; float s = m->embed_scale[tok]; for (int64_t j = 0; j < d; j++) h[j] = (float)w[j] * s; }
    if (m->emb_scale != 1.0f) for (int64_t j = 0; j < d; j++) h[j] *= m->emb_scale;
}

static void rope_apply(Thr* T, float* x, const float* inv_freq, float scale, int64_t hd, int64_t pos) {
    int64_t half = hd / 2;
    if (T->rope_src != inv_freq || T->rope_pos != pos) {
        for (int64_t i = 0; i < half; i++) {
            float f = (float)pos * inv_freq[i];
            T->cs[i] = cosf(f) * scale;
            T->sn[i] = sinf(f) * scale;
        }
        T->rope_src = inv_freq; T->rope_pos = pos;
    }
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * T->cs[i] - x2 * T->sn[i];
        x[i + half] = x2 * T->cs[i] + x1 * T->sn[i];
    }
}

/* One site + its linear: the site rule (every thread, same result), then this thread's share of
 * the work into parts[r]. The site's np projections are the column ranges [cols[p], cols[p+1]) of
 * its input-major matrix (P = cols[np] columns). No rule or a shared rule: one kept-row list for
 * the site, run over all P columns (one range). A per-projection rule (rule 2): one list per
 * projection, each run over its own columns only, so a row projection p skips is not read in p's
 * columns. Work items: per range, PARTS parts x S column slices (S = ceil(nt / 2)), numbered
 * across the ranges; item g goes to thread g mod nt (with 2 threads: thread r sums part r of every
 * range). nkp[p]: the channels projection p keeps. Returns the weight elements read
 * (sum over projections of kept x columns). */
static int64_t site_parts(const EngModel* m, const EngLayer* L, int site, Thr* T, const float* x, int64_t n,
                          int np, const int64_t* cols, float* const* parts, int t, int nt, int64_t* nkp) {
    const EngSite* st = &L->site[site];
    int64_t P = cols[np], stride = n + 16, nk[MAX_PROJ], c0[MAX_PROJ], c1[MAX_PROJ], reads = 0;
    int nr;
    site_select(st, np, x, n, T->idx, T->val, stride, nk);
    if (st->rule == RULE_PER_PROJ) {
        nr = np;
        for (int r = 0; r < np; r++) { c0[r] = cols[r]; c1[r] = cols[r + 1]; }
    } else {
        nr = 1; c0[0] = 0; c1[0] = P;
    }
    int S = (nt + 1) / 2, g = 0;
    for (int r = 0; r < nr; r++) {
        const int32_t* ix = T->idx + r * stride;
        const float* vx = T->val + r * stride;
        int64_t k = nk[r], p0, p1;
        if (k < 0) { k = n; ix = NULL; vx = x; }
        nk[r] = k;
        reads += k * (c1[r] - c0[r]);
        for (int i = 0; i < PARTS * S; i++, g++) {
            if (g % nt != t) continue;
            slice16(c1[r] - c0[r], i % S, S, &p0, &p1);
            linear_part(m->wtype, L->w[site], P, ix, vx, k, i / S, c0[r] + p0, c0[r] + p1, parts[i / S]);
        }
    }
    for (int p = 0; p < np; p++) nkp[p] = nk[nr == 1 ? 0 : p];
    return reads;
}

/* out[0:p1-p0] = outputs p0..p1 of linear `site` from its two parts (scale, the model's bias, the
 * compensation) */
static inline void site_reduce(const EngLayer* L, int site, float* const* parts, int64_t p0, int64_t p1, float* out) {
    reduce_out(parts[0], parts[1], p0, p1, L->wscale[site], L->wbias[site], L->site[site].bias, out);
}

/* ---------------------------------------------------------------- the head */

static int64_t argmax_first(const float* x, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

static uint64_t splitmix(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static int cmp_pair(const void* a, const void* b) {
    const struct { float e; int32_t i; }* x = a; const struct { float e; int32_t i; }* y = b;
    if (x->e != y->e) return x->e < y->e ? 1 : -1;
    return x->i < y->i ? -1 : 1;
}

/* temperature / top-p sampling over logits (overwritten); serial */
static int64_t sample(EngState* s, float* lg, int64_t V, float temp, float top_p) {
    if (!(temp > 0.0f)) return argmax_first(lg, V);
    float mx = lg[argmax_first(lg, V)];
    double S = 0.0;
    for (int64_t v = 0; v < V; v++) { lg[v] = expf((lg[v] - mx) / temp); S += lg[v]; }
    double u = (double)(splitmix(&s->rng) >> 11) * (1.0 / 9007199254740992.0);
    if (!(top_p < 1.0f)) {
        double target = u * S, c = 0.0;
        int64_t last = 0;
        for (int64_t v = 0; v < V; v++) { if (lg[v] > 0.0f) last = v; c += lg[v]; if (c > target) return v; }
        return last;
    }
    /* the nucleus lies inside {v : p_v >= (1 - top_p) / V} (the rest weighs less than 1 - top_p) */
    double floor_e = (1.0 - top_p) * S / (double)V;
    int64_t n = 0;
    for (int64_t v = 0; v < V; v++) if (lg[v] >= floor_e) { s->pairs[n].e = lg[v]; s->pairs[n].i = (int32_t)v; n++; }
    qsort(s->pairs, (size_t)n, sizeof(s->pairs[0]), cmp_pair);
    double cum = 0.0;
    int64_t k = 0;
    while (k < n) { cum += s->pairs[k].e; k++; if (cum >= top_p * S) break; }
    double target = u * cum, c = 0.0;
    for (int64_t i = 0; i < k; i++) { c += s->pairs[i].e; if (c > target) return s->pairs[i].i; }
    return s->pairs[k - 1].i;
}

/* Logits of the input-major head over its channel rule `L->site[0]` into s->logits (all threads;
 * ends with a barrier); returns the weight elements read. */
static int64_t head_input_major(const EngModel* m, EngState* s, const EngLayer* L, const float* h, int t, int nt) {
    int64_t V = m->vocab, cols[2] = {0, V}, nk[MAX_PROJ], p0, p1;
    int64_t rd = site_parts(m, L, 0, &s->th[t], h, m->hidden, 1, cols, s->ph, t, nt, nk);
#pragma omp barrier
    slice16(V, t, nt, &p0, &p1);
    site_reduce(L, 0, s->ph, p0, p1, s->logits + p0);
    if (m->final_softcap > 0.0f)
        for (int64_t v = p0; v < p1; v++) s->logits[v] = tanhf(s->logits[v] / m->final_softcap) * m->final_softcap;
#pragma omp barrier
    return rd;
}

/* The input-sparse head (EngModel.head_lin): the logits of its rule, argmax or sample; with
 * MODE_GREEDY_CHECK first the head with every channel kept, whose argmax goes to a->check. */
static void sparse_head_phase(const EngModel* m, EngState* s, EngStep* a, const float* h, int t, int nt) {
    int64_t V = m->vocab;
    if (a->mode == MODE_GREEDY_CHECK) {
        EngLayer full = *m->head_lin;
        memset(&full.site[0], 0, sizeof full.site[0]);
        head_input_major(m, s, &full, h, t, nt);
        if (t == 0) a->check = argmax_first(s->logits, V);
#pragma omp barrier
    }
    int64_t rd = head_input_major(m, s, m->head_lin, h, t, nt);
    if (t == 0) {
        if (a->logits) memcpy(a->logits, s->logits, (size_t)V * 4);
        a->next = a->mode == MODE_SAMPLE ? sample(s, s->logits, V, a->temperature, a->top_p)
                                         : argmax_first(s->logits, V);
        if (a->mode != MODE_GREEDY_CHECK) a->check = a->next;
        a->head_bytes = rd * elt_size(m->wtype);
        a->candidates = V;
    }
}

/* Head phase inside the parallel region; h is this thread's normed hidden state. Thread 0 sets
 * a->next, a->head_bytes, a->candidates. */
static void head_phase(const EngModel* m, EngState* s, EngStep* a, const float* h, int t, int nt) {
    int64_t V = m->vocab, d = m->hidden, v0, v1;
    Thr* T = &s->th[t];
    if (m->head_lin) { sparse_head_phase(m, s, a, h, t, nt); return; }
    range(V, t, nt, &v0, &v1);
    int screened = (a->mode == MODE_GREEDY_SCREENED || a->mode == MODE_GREEDY_CHECK) && !a->logits && m->screen
                   && !(m->final_softcap > 0.0f);
    if (!screened || a->mode == MODE_GREEDY_CHECK) {
        for (int64_t v = v0; v < v1; v++) {
            float z = head_row(m->head_type, m->head, m->head_scale, v, h, d);
            if (m->final_softcap > 0.0f) z = tanhf(z / m->final_softcap) * m->final_softcap;
            s->logits[v] = z;
        }
#pragma omp barrier
        if (t == 0) {
            if (a->logits) memcpy(a->logits, s->logits, (size_t)V * 4);
            a->next = a->mode == MODE_SAMPLE ? sample(s, s->logits, V, a->temperature, a->top_p)
                                             : argmax_first(s->logits, V);
            a->check = a->next;
            a->head_bytes = V * d * elt_size(m->head_type);
            a->candidates = V;
        }
        if (!screened) return;
#pragma omp barrier
    }
    /* ||h|| rounded up: double sum of exact squares, then a relative margin of 2^-20 */
    double ss = 0.0;
    for (int64_t j = 0; j < d; j++) ss += (double)h[j] * h[j];
    float hn = (float)(sqrt(ss) * (1.0 + 0x1p-20));
    float lmax = -INFINITY;
    for (int64_t v = v0; v < v1; v++) {
        float ap = dot_i8(m->screen + v * d, h, d) * m->screen_scale[v];
        float b = m->screen_bound[v] * hn;
        float lo = ap - b;
        s->upper[v] = ap + b;
        if (lo > lmax) lmax = lo;
    }
    T->lmax = lmax;
#pragma omp barrier
    float best_lo = -INFINITY;
    for (int i = 0; i < nt; i++) if (s->th[i].lmax > best_lo) best_lo = s->th[i].lmax;
    float best = -INFINITY;
    int64_t besti = -1, cand = 0;
    for (int64_t v = v0; v < v1; v++) {
        if (!(s->upper[v] >= best_lo)) continue;
        const void* row = head_row_ptr(m, v, d * elt_size(m->head_type), T->row);
        float z = head_row(m->head_type, row, m->head_scale ? m->head_scale + v : NULL, 0, h, d);
        cand++;
        if (besti < 0 || z > best) { best = z; besti = v; }
    }
    T->best = best; T->besti = besti; T->cand = cand;
#pragma omp barrier
    if (t == 0) {
        int64_t bi = -1, nc = 0;
        float bv = -INFINITY;
        for (int i = 0; i < nt; i++) {
            nc += s->th[i].cand;
            if (s->th[i].besti >= 0 && (bi < 0 || s->th[i].best > bv)) { bv = s->th[i].best; bi = s->th[i].besti; }
        }
        a->next = bi;
        a->candidates = nc;
        a->head_bytes = V * d + nc * d * elt_size(m->head_type);
    }
}

/* ---------------------------------------------------------------- one token */

static void layer_forward(const EngModel* m, EngState* s, const EngLayer* L, int64_t l, Thr* T, int t, int nt,
                          int64_t* reads) {
    int64_t d = m->hidden, H = m->n_heads, KV = m->n_kv, hd = m->head_dim, I = m->inter;
    int64_t A = H * hd, Pqkv = (H + 2 * KV) * hd, pos = s->pos, a0, a1, rd, nk[MAX_PROJ], group = H / KV;
    const int64_t cqkv[4] = {0, A, A + KV * hd, Pqkv}, co[2] = {0, d}, cgu[3] = {0, I, 2 * I}, cd[2] = {0, d};
    int64_t* kept = s->kept + l * N_PROJ;
    float* h = T->h;

    /* attention input: norm, site attn_in, fused q|k|v parts */
    rmsnorm(h, L->norm[0], T->xn, d, m->eps);
    rd = site_parts(m, L, SITE_ATTN_IN, T, T->xn, d, 3, cqkv, s->pq, t, nt, nk);
    if (t == 0) { kept[PROJ_Q] = nk[0]; kept[PROJ_K] = nk[1]; kept[PROJ_V] = nk[2]; *reads += rd; }
#pragma omp barrier
    /* per query head: its q, its group's k and v (computed by every thread that needs them; the
     * group's first head writes them to the cache), q/k norms, RoPE, attention */
    range(H, t, nt, &a0, &a1);
    int64_t first = L->window > 0 && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0, n = pos - first + 1;
    int64_t have = -1;
    for (int64_t hq = a0; hq < a1; hq++) {
        int64_t g = hq / group, base = (l * KV + g) * s->max_ctx * hd;
        if (g != have) {
            site_reduce(L, SITE_ATTN_IN, s->pq, (H + g) * hd, (H + g + 1) * hd, T->kcur);
            site_reduce(L, SITE_ATTN_IN, s->pq, (H + KV + g) * hd, (H + KV + g + 1) * hd, T->vcur);
            if (L->k_norm) rmsnorm(T->kcur, L->k_norm, T->kcur, hd, m->eps);
            rope_apply(T, T->kcur, L->inv_freq, L->rope_scale, hd, pos);
            have = g;
        }
        if (hq % group == 0) {
            kv_put(s->kc, s->kv_type, base + pos * hd, T->kcur, hd);
            kv_put(s->vc, s->kv_type, base + pos * hd, T->vcur, hd);
        }
        float* q = T->tmp;
        site_reduce(L, SITE_ATTN_IN, s->pq, hq * hd, (hq + 1) * hd, q);
        if (L->q_norm) rmsnorm(q, L->q_norm, q, hd, m->eps);
        rope_apply(T, q, L->inv_freq, L->rope_scale, hd, pos);
        const int64_t past = base + first * hd;  /* the current position from this thread's fp32 copy */
        float* sc = T->sc, mx = -INFINITY, *o = s->att + hq * hd;
        for (int64_t i = 0; i < n; i++) {
            float z = (i == n - 1 ? dot_f32(T->kcur, q, hd) : kv_dot(s->kc, s->kv_type, past + i * hd, q, hd)) * m->attn_scale;
            if (m->attn_softcap > 0.0f) z = tanhf(z / m->attn_softcap) * m->attn_softcap;
            sc[i] = z;
            if (z > mx) mx = z;
        }
        float sum = 0.0f;
        for (int64_t i = 0; i < n; i++) { sc[i] = expf(sc[i] - mx); sum += sc[i]; }
        float inv = 1.0f / sum;
        for (int64_t c = 0; c < hd; c++) o[c] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            float p = sc[i] * inv;
            if (i == n - 1) for (int64_t c = 0; c < hd; c++) o[c] += p * T->vcur[c];
            else kv_axpy(o, p, s->vc, s->kv_type, past + i * hd, hd);
        }
    }
#pragma omp barrier
    /* attention output projection; every thread adds it to its own residual stream */
    rd = site_parts(m, L, SITE_ATTN_OUT, T, s->att, A, 1, co, s->po, t, nt, nk);
    if (t == 0) { kept[PROJ_O] = nk[0]; *reads += rd; }
#pragma omp barrier
    site_reduce(L, SITE_ATTN_OUT, s->po, 0, d, T->tmp);
    if (L->norm[1]) rmsnorm(T->tmp, L->norm[1], T->tmp, d, m->eps);
    for (int64_t j = 0; j < d; j++) h[j] += T->tmp[j];
    /* MLP input: norm, site mlp_in, fused gate | up parts; the activation over slices of 16 units */
    rmsnorm(h, L->norm[2], T->xn, d, m->eps);
    rd = site_parts(m, L, SITE_MLP_IN, T, T->xn, d, 2, cgu, s->pg, t, nt, nk);
    if (t == 0) { kept[PROJ_GATE] = nk[0]; kept[PROJ_UP] = nk[1]; *reads += rd; }
#pragma omp barrier
    slice16(I, t, nt, &a0, &a1);
    if (a1 > a0) {
        site_reduce(L, SITE_MLP_IN, s->pg, a0, a1, s->gu + a0);              /* gate */
        site_reduce(L, SITE_MLP_IN, s->pg, I + a0, I + a1, s->gu + I + a0);  /* up */
        for (int64_t i = a0; i < a1; i++) s->mact[i] = act(s->gu[i], m->act) * s->gu[I + i];
    }
#pragma omp barrier
    rd = site_parts(m, L, SITE_MLP_OUT, T, s->mact, I, 1, cd, s->pd, t, nt, nk);
    if (t == 0) { kept[PROJ_DOWN] = nk[0]; *reads += rd; }
#pragma omp barrier
    site_reduce(L, SITE_MLP_OUT, s->pd, 0, d, T->tmp);
    if (L->norm[3]) rmsnorm(T->tmp, L->norm[3], T->tmp, d, m->eps);
    for (int64_t j = 0; j < d; j++) h[j] += T->tmp[j];
}

/* Returns the next token (-1 with MODE_NONE); -2 when the cache is full, -3 for a bad token. */
int64_t eng_step(const EngModel* m, EngState* s, EngStep* a) {
    if (s->pos >= s->max_ctx) return -2;
    if (a->token < 0 || a->token >= m->vocab) return -3;
    int nt = a->threads < 1 ? 1 : a->threads > s->n_threads ? (int)s->n_threads : a->threads;
    int64_t reads = 0;
    a->next = -1; a->head_bytes = 0; a->candidates = 0;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        Thr* T = &s->th[t];
        embed_row(m, a->token, T->h, T->row);
        for (int64_t l = 0; l < m->n_layers; l++) layer_forward(m, s, &m->layers[l], l, T, t, n, &reads);
        if (a->mode != MODE_NONE) {
            rmsnorm(T->h, m->final_norm, T->xn, m->hidden, m->eps);
            head_phase(m, s, a, T->xn, t, n);
        }
    }
    a->linear_reads = reads;
    if (a->kept) for (int64_t i = 0; i < m->n_layers * N_PROJ; i++) a->kept[i] = (int32_t)s->kept[i];
    s->pos++;
    return a->next;
}

/* ---------------------------------------------------------------- test and tool entry points */

/* One linear through the engine's site rule, parts and reduction: y [P] from x [in]. The site
 * feeds np projections, the column ranges [cols[p], cols[p+1]) (cols NULL: one projection, all P
 * columns; cols[np] must be P). kept (optional, [np]): the channels each projection kept. Returns
 * the weight elements read, or -1 for bad arguments. */
int64_t eng_linear(int32_t wt, const void* W, const float* wscale, int64_t in, int64_t P, const float* x,
                   const EngSite* site, int32_t np, const int64_t* cols, const float* bias, float* y,
                   int64_t* kept, int32_t threads) {
    const int64_t whole[2] = {0, P};
    if (!cols) { cols = whole; np = 1; }
    if (np < 1 || np > MAX_PROJ || cols[0] != 0 || cols[np] != P) return -1;
    for (int p = 0; p < np; p++) if (cols[p + 1] < cols[p]) return -1;
    EngLayer L;
    memset(&L, 0, sizeof L);
    L.w[0] = W; L.wscale[0] = wscale; L.wbias[0] = bias; L.site[0] = *site;
    EngModel m;
    memset(&m, 0, sizeof m);
    m.wtype = wt;
    Thr th[MAXT];
    float* parts[2] = {zalloc(P * 4), zalloc(P * 4)};
    int nt = threads < 1 ? 1 : threads > MAXT ? MAXT : threads;
    int64_t reads = 0;
    for (int t = 0; t < nt; t++) {
        th[t].idx = zalloc(MAX_PROJ * (in + 16) * 4);
        th[t].val = zalloc(MAX_PROJ * (in + 16) * 4);
    }
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t nk[MAX_PROJ], p0, p1;
        int64_t r = site_parts(&m, &L, 0, &th[t], x, in, np, cols, parts, t, n, nk);
        if (t == 0) {
            reads = r;
            if (kept) for (int p = 0; p < np; p++) kept[p] = nk[p];
        }
#pragma omp barrier
        slice16(P, t, n, &p0, &p1);
        site_reduce(&L, 0, parts, p0, p1, y + p0);
    }
    for (int t = 0; t < nt; t++) { free(th[t].idx); free(th[t].val); }
    free(parts[0]); free(parts[1]);
    return reads;
}

/* The head alone on a given hidden state (tests): returns the argmax; a->candidates and
 * a->head_bytes as in a step. Needs a state made for m (n_layers may be 0). */
int64_t eng_head(const EngModel* m, EngState* s, const float* h, EngStep* a) {
    int nt = a->threads < 1 ? 1 : a->threads > s->n_threads ? (int)s->n_threads : a->threads;
#pragma omp parallel num_threads(nt)
    head_phase(m, s, a, h, omp_get_thread_num(), omp_get_num_threads());
    return a->next;
}

/* Map pages [a, b) of a file mapping into this process (page tables filled from the page cache,
 * reading the file where needed): MADV_POPULATE_READ, or one read per page where the kernel lacks it. */
static void populate(char* p, int64_t a, int64_t b) {
    if (b <= a) return;
    int64_t page = (int64_t)sysconf(_SC_PAGESIZE);
    int64_t a0 = a / page * page;
#ifdef MADV_POPULATE_READ
    if (madvise(p + a0, (size_t)(b - a0), MADV_POPULATE_READ) == 0) return;
#endif
    volatile char sink = 0;
    for (int64_t i = a0; i < b; i += page) sink ^= p[i];
    (void)sink;
}

/* Map an engine file: mode 0 mmap (read-only, populated), mode 1 a private copy in anonymous
 * memory with transparent huge pages requested. Returns NULL on failure. Mode 0 leaves bytes
 * [lazy_off, lazy_off + lazy_len) unpopulated and marked for random access (no fault-around or
 * read-ahead: a read maps only its own page), for a tensor read a few rows at a time (the exact
 * head rows of a screened head): the process then holds the rows it reads, not the tensor. */
void* eng_map(const char* path, int64_t* size, int32_t mode, int64_t lazy_off, int64_t lazy_len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) { close(fd); return NULL; }
    *size = st.st_size;
    void* p = NULL;
    if (mode == 0) {
        p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) p = NULL;
        if (p) {
            int64_t page = (int64_t)sysconf(_SC_PAGESIZE), n = st.st_size;
            int64_t a = lazy_len > 0 ? (lazy_off + page - 1) / page * page : n;  /* whole pages inside */
            int64_t b = lazy_len > 0 ? (lazy_off + lazy_len) / page * page : n;
            if (a > n) a = n;
            if (b < a) b = a;
            if (b > a) madvise((char*)p + a, (size_t)(b - a), MADV_RANDOM);
            populate((char*)p, 0, a);
            populate((char*)p, b, n);
        }
    } else {
        size_t huge = 1u << 21, n = ((size_t)st.st_size + huge - 1) / huge * huge;
        if (posix_memalign(&p, huge, n) != 0) p = NULL;
        if (p) {
            madvise(p, n, MADV_HUGEPAGE);
            size_t done = 0;
            while (done < (size_t)st.st_size) {
                ssize_t r = read(fd, (char*)p + done, (size_t)st.st_size - done);
                if (r <= 0) { free(p); p = NULL; break; }
                done += (size_t)r;
            }
        }
    }
    close(fd);
    return p;
}

void eng_unmap(void* p, int64_t size, int32_t mode) {
    if (!p) return;
    if (mode == 0) munmap(p, (size_t)size);
    else free(p);
}

/* Memory bandwidth in GB/s (1e9 bytes/s): kind 0 reads `bytes`, kind 1 copies them (read + write
 * counted, as STREAM does); best of `reps` passes, `threads` threads each on its own slice. */
double eng_bandwidth(int64_t bytes, int32_t threads, int32_t kind, int32_t reps) {
    int64_t n = bytes / 4 / 64 * 64;
    float* a = zalloc(n * 4);
    float* b = kind == 1 ? zalloc(n * 4) : NULL;
    if (!a || (kind == 1 && !b)) { free(a); free(b); return -1.0; }
    static volatile float sink[MAXT];
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) { a[i] = (float)(i & 255); if (b) b[i] = 0.0f; }
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            int64_t i0, i1;
            range(n / 64, omp_get_thread_num(), omp_get_num_threads(), &i0, &i1);
            i0 *= 64; i1 *= 64;
#ifdef __AVX512F__
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            if (kind == 0) {
                for (int64_t i = i0; i < i1; i += 64) {
                    s0 = _mm512_add_ps(s0, _mm512_load_ps(a + i)); s1 = _mm512_add_ps(s1, _mm512_load_ps(a + i + 16));
                    s2 = _mm512_add_ps(s2, _mm512_load_ps(a + i + 32)); s3 = _mm512_add_ps(s3, _mm512_load_ps(a + i + 48));
                }
                sink[omp_get_thread_num()] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
            } else {
                for (int64_t i = i0; i < i1; i += 16) _mm512_store_ps(b + i, _mm512_load_ps(a + i));
            }
#else
            float acc = 0.0f;
            if (kind == 0) { for (int64_t i = i0; i < i1; i++) acc += a[i]; sink[omp_get_thread_num()] = acc; }
            else memcpy(b + i0, a + i0, (size_t)(i1 - i0) * 4);
#endif
        }
        double dt = omp_get_wtime() - t0;
        if (dt < best) best = dt;
    }
    free(a); free(b);
    return (double)n * 4 * (kind == 1 ? 2 : 1) / best / 1e9;
}
