/* Kernels of the native engine (included by engine.c only).
 *
 * lin_*:  y[p0:p1] = sum_k val[k] * W^T[row_k, p0:p1] over kept rows k0 <= k < k1, row_k =
 *         idx ? idx[k] : k. Every output lane o is one fused multiply-add chain over k in order,
 *         so the value of y_o does not depend on how columns are sliced between threads; the
 *         vector and tail paths use the same operations (masked AVX-512 for a partial chunk).
 * dot_*:  one row of the (output-major) LM head with h: a fixed blocked order, shared by the
 *         full head and the exact rows of the screened head, so both give bit-identical logits.
 * select: the site rule, compressed to (idx, val) lists (site_select: one list for the site, or
 *         one per projection under a per-projection rule; both through select_lists).
 */
#ifndef ATTRSPARSE_ENGINE_KERN_H
#define ATTRSPARSE_ENGINE_KERN_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "engine.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 0)
#define PREFETCH_L2(p) __builtin_prefetch((const void*)(p), 0, 2)

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

#ifdef __AVX512F__
static inline __m512 ld_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ldm_f32(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 ld_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 ldm_bf16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m512 ld_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 ldm_i8(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

/* Partial sum of kept rows [k0, k1) over columns [p0, p1), columns in tiles of TILE so that y
 * stays in L1. Dense (idx NULL): one row at a time, so the rows of a part are one sequential
 * stream for the hardware prefetchers. Scattered kept rows (idx): eight rows per pass, so that
 * eight short streams are in flight (one row at a time leaves the core waiting on each row's
 * first lines: at 50% kept it was no faster than dense). Both are the same FMA chain per output.
 * Each pass prefetches the next pass's rows whole, into L2, paced with the column loop (every 64
 * bytes of columns, the line at that offset of each next row), because a scattered row of a few
 * lines is over before the hardware prefetchers lock on, and because prefetches issued in one burst
 * at the start of the pass filled the core's miss buffers and stalled it. On a 2-core AMD EPYC (60%
 * kept at random, 1 thread, from memory) the burst took int8 from 0.63-0.73x dense to 0.86-0.93x;
 * pacing took the SmolLM2 shapes of every precision a further 10-28% faster, rows longer than 2 KB
 * included (prefetched as a burst, those had been slower than with the first line only). */
/* Rows longer than 4 column tiles (an input-major LM head: 49,152 to 262,144 columns) are never one
 * sequential stream (a row's tile is 4 KB to 16 KB, the next row's tile a whole row further), so
 * their dense rows go eight per pass too: one row per pass loaded and stored the tile of y once per
 * row, and the dense int8 SmolLM2 head (576 x 49152, 2 threads, from memory) took 2.06 ms against
 * 0.94 ms eight per pass, the time of the head stored by rows. */
#define ROWS 8 /* kept rows per scattered pass; 16 was slower for int8 short rows (0.79-0.83x dense against 0.86-0.94x) */
#define TILE 4096
#define DEFINE_LIN(NAME, T, LD, LDM)                                                               \
static void lin_##NAME(const T* W, int64_t ld, const int32_t* idx, const float* val, int64_t k0,   \
                       int64_t k1, int64_t p0, int64_t p1, float* y) {                             \
    if (p1 <= p0) return;                                                                          \
    memset(y + p0, 0, (size_t)(p1 - p0) * sizeof(float));                                         \
    for (int64_t t0 = p0; t0 < p1; t0 += TILE) {                                                   \
        int64_t n = p1 - t0 < TILE ? p1 - t0 : TILE;                                               \
        float* yy = y + t0;                                                                        \
        int64_t k = k0, bytes = n * (int64_t)sizeof(T);                                            \
        if (idx || ld > 4 * TILE) /* scattered kept rows: ROWS per pass, ROWS short streams in flight */            \
            for (; k + ROWS <= k1; k += ROWS) {                                                    \
                const T* r8[ROWS];                                                                 \
                __m512 x8[ROWS];                                                                   \
                for (int i = 0; i < ROWS; i++) { r8[i] = W + (idx ? idx[k + i] : k + i) * ld + t0; x8[i] = _mm512_set1_ps(val[k + i]); } \
                const char* nx[ROWS];                                                              \
                int nn = 0;                                                                        \
                for (int i = 0; i < ROWS && k + ROWS + i < k1; i++)                                \
                    nx[nn++] = (const char*)(W + (idx ? idx[k + ROWS + i] : k + ROWS + i) * ld + t0);                     \
                int64_t c = 0;                                                                     \
                for (; c + 16 <= n; c += 16) {                                                     \
                    if (((c * (int64_t)sizeof(T)) & 63) == 0)                                      \
                        for (int i = 0; i < nn; i++) PREFETCH_L2(nx[i] + c * (int64_t)sizeof(T));  \
                    __m512 a = _mm512_loadu_ps(yy + c);                                            \
                    for (int i = 0; i < ROWS; i++) a = _mm512_fmadd_ps(x8[i], LD(r8[i] + c), a);   \
                    _mm512_storeu_ps(yy + c, a);                                                   \
                }                                                                                  \
                for (int i = 0; i < nn; i++) {                                                     \
                    if (c < n && ((c * (int64_t)sizeof(T)) & 63) == 0) PREFETCH_L2(nx[i] + c * (int64_t)sizeof(T)); \
                    PREFETCH_L2(nx[i] + bytes - 1);                                                \
                }                                                                                  \
                if (c < n) {                                                                       \
                    __mmask16 m = (__mmask16)((1u << (n - c)) - 1u);                               \
                    __m512 a = _mm512_maskz_loadu_ps(m, yy + c);                                   \
                    for (int i = 0; i < ROWS; i++) a = _mm512_fmadd_ps(x8[i], LDM(r8[i] + c, m), a);  \
                    _mm512_mask_storeu_ps(yy + c, m, a);                                           \
                }                                                                                  \
            }                                                                                      \
        for (; k < k1; k++) { /* contiguous rows (dense): one row at a time, one stream */        \
            const T* r = W + (idx ? idx[k] : k) * ld + t0;                                         \
            if (k + 1 < k1) PREFETCH(W + (idx ? idx[k + 1] : k + 1) * ld + t0);                    \
            const __m512 x = _mm512_set1_ps(val[k]);                                               \
            int64_t c = 0;                                                                         \
            for (; c + 64 <= n; c += 64) {                                                         \
                __m512 a0 = _mm512_fmadd_ps(x, LD(r + c), _mm512_loadu_ps(yy + c));                \
                __m512 a1 = _mm512_fmadd_ps(x, LD(r + c + 16), _mm512_loadu_ps(yy + c + 16));      \
                __m512 a2 = _mm512_fmadd_ps(x, LD(r + c + 32), _mm512_loadu_ps(yy + c + 32));      \
                __m512 a3 = _mm512_fmadd_ps(x, LD(r + c + 48), _mm512_loadu_ps(yy + c + 48));      \
                _mm512_storeu_ps(yy + c, a0); _mm512_storeu_ps(yy + c + 16, a1);                    \
                _mm512_storeu_ps(yy + c + 32, a2); _mm512_storeu_ps(yy + c + 48, a3);               \
            }                                                                                      \
            for (; c < n; c += 16) {                                                               \
                __mmask16 m = n - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - c)) - 1u); \
                __m512 a = _mm512_fmadd_ps(x, LDM(r + c, m), _mm512_maskz_loadu_ps(m, yy + c));     \
                _mm512_mask_storeu_ps(yy + c, m, a);                                               \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}
DEFINE_LIN(f32, float, ld_f32, ldm_f32)
DEFINE_LIN(bf16, uint16_t, ld_bf16, ldm_bf16)
DEFINE_LIN(i8, int8_t, ld_i8, ldm_i8)

/* head row dot: 4 accumulators over 64-wide steps, then one 16-wide (masked) tail at a time */
#define DEFINE_DOT(NAME, T, LD, LDM)                                                               \
static inline float dot_##NAME(const T* w, const float* h, int64_t d) {                           \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                    \
    int64_t j = 0;                                                                                 \
    for (; j + 64 <= d; j += 64) {                                                                 \
        a0 = _mm512_fmadd_ps(LD(w + j), _mm512_loadu_ps(h + j), a0);                               \
        a1 = _mm512_fmadd_ps(LD(w + j + 16), _mm512_loadu_ps(h + j + 16), a1);                     \
        a2 = _mm512_fmadd_ps(LD(w + j + 32), _mm512_loadu_ps(h + j + 32), a2);                     \
        a3 = _mm512_fmadd_ps(LD(w + j + 48), _mm512_loadu_ps(h + j + 48), a3);                     \
    }                                                                                              \
    for (; j < d; j += 16) {                                                                       \
        __mmask16 m = d - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1u);        \
        a0 = _mm512_fmadd_ps(LDM(w + j, m), _mm512_maskz_loadu_ps(m, h + j), a0);                 \
    }                                                                                              \
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));      \
}
DEFINE_DOT(f32, float, ld_f32, ldm_f32)
DEFINE_DOT(bf16, uint16_t, ld_bf16, ldm_bf16)
DEFINE_DOT(i8, int8_t, ld_i8, ldm_i8)

#else /* portable fallback: the same per-lane order (fmaf chains), no intrinsics */

#define DEFINE_LIN(NAME, T, CV)                                                                    \
static void lin_##NAME(const T* W, int64_t ld, const int32_t* idx, const float* val, int64_t k0,   \
                       int64_t k1, int64_t p0, int64_t p1, float* y) {                             \
    for (int64_t c = p0; c < p1; c++) y[c] = 0.0f;                                                 \
    for (int64_t k = k0; k < k1; k++) {                                                            \
        const T* r = W + (idx ? idx[k] : k) * ld;                                                  \
        float x = val[k];                                                                          \
        for (int64_t c = p0; c < p1; c++) y[c] = fmaf(x, CV(r[c]), y[c]);                          \
    }                                                                                              \
}
#define DEFINE_DOT(NAME, T, CV)                                                                    \
static inline float dot_##NAME(const T* w, const float* h, int64_t d) {                           \
    float s = 0.0f;                                                                                \
    for (int64_t j = 0; j < d; j++) s = fmaf(CV(w[j]), h[j], s);                                   \
    return s;                                                                                      \
}
#define CV_F32(v) (v)
#define CV_I8(v) ((float)(v))
DEFINE_LIN(f32, float, CV_F32)
DEFINE_LIN(bf16, uint16_t, bf16_to_f32)
DEFINE_LIN(i8, int8_t, CV_I8)
DEFINE_DOT(f32, float, CV_F32)
DEFINE_DOT(bf16, uint16_t, bf16_to_f32)
DEFINE_DOT(i8, int8_t, CV_I8)
#endif

/* Linears are split into PARTS fixed parts of the kept-row list (independent of the thread
 * count): part r sums kept rows [nk*r/PARTS, nk*(r+1)/PARTS) into its own buffer; y is the sum
 * of the parts in order, then the scale and biases (reduce_out). */
#define PARTS 2
static void linear_part(int32_t wt, const void* W, int64_t ld, const int32_t* idx, const float* val,
                        int64_t nk, int part, int64_t p0, int64_t p1, float* out) {
    int64_t k0 = nk * part / PARTS, k1 = nk * (part + 1) / PARTS;
    if (wt == ENG_F32) lin_f32((const float*)W, ld, idx, val, k0, k1, p0, p1, out);
    else if (wt == ENG_BF16) lin_bf16((const uint16_t*)W, ld, idx, val, k0, k1, p0, p1, out);
    else lin_i8((const int8_t*)W, ld, idx, val, k0, k1, p0, p1, out);
}

/* y[0:p1-p0] = (part0 + part1)[p0:p1] * scale + b1 + b2 (each optional; part/scale/bias vectors
 * indexed from 0), in separate passes so that the compiler cannot contract them differently at
 * different call sites */
static void reduce_out(const float* part0, const float* part1, int64_t p0, int64_t p1, const float* scale,
                       const float* b1, const float* b2, float* y) {
    int64_t n = p1 - p0;
    for (int64_t c = 0; c < n; c++) y[c] = part0[p0 + c] + part1[p0 + c];
    if (scale) for (int64_t c = 0; c < n; c++) y[c] *= scale[p0 + c];
    if (b1) for (int64_t c = 0; c < n; c++) y[c] += b1[p0 + c];
    if (b2) for (int64_t c = 0; c < n; c++) y[c] += b2[p0 + c];
}

/* logit of head row v (exact: the same code for the full head and the screened head's rows) */
static inline float head_row(int32_t ht, const void* W, const float* scale, int64_t v, const float* h, int64_t d) {
    if (ht == ENG_F32) return dot_f32((const float*)W + v * d, h, d);
    if (ht == ENG_BF16) return dot_bf16((const uint16_t*)W + v * d, h, d);
    return dot_i8((const int8_t*)W + v * d, h, d) * scale[v];
}

/* The one selection of kept channels: list p (idx + p * stride, val + p * stride; stride >= n + 16)
 * gets the channels that test p keeps (val = x_j - m_j), nk[p] their count. Channel j passes test p
 * iff (keep == NULL || keep[j]) and (!rule[p] || |x_j - m_j| * (scale[p] ? scale[p][j] : 1) >
 * threshold[p]); nk[p] = -1 when test p keeps every channel unshifted (no rule, no mask, no center:
 * the caller runs it dense). One pass over x: the shifted value and its magnitude are computed
 * once, the test once per list. */
static void select_lists(int np, const int32_t* rule, const float* const* scale, const float* threshold,
                         const float* m, const uint8_t* keep, const float* x, int64_t n, int32_t* idx,
                         float* val, int64_t stride, int64_t* nk) {
    int64_t k[MAX_PROJ] = {0, 0, 0}, j = 0;
    int dense[MAX_PROJ] = {0, 0, 0}, any = 0;
    for (int p = 0; p < np; p++) { dense[p] = !rule[p] && !keep && !m; any |= !dense[p]; }
    if (!any) { for (int p = 0; p < np; p++) nk[p] = -1; return; }
#ifdef __AVX512F__
    const __m512i step = _mm512_set1_epi32(16);
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= n; j += 16, iv = _mm512_add_epi32(iv, step)) {
        __m512 v = _mm512_loadu_ps(x + j);
        if (m) v = _mm512_sub_ps(v, _mm512_loadu_ps(m + j));
        const __m512 mag = _mm512_abs_ps(v);
        __mmask16 base = 0xFFFF;
        if (keep) {
            __m128i kb = _mm_loadu_si128((const __m128i*)(keep + j));
            base = _mm_test_epi8_mask(kb, kb);
        }
        for (int p = 0; p < np; p++) {
            if (dense[p]) continue;
            __mmask16 sel = base;
            if (rule[p]) {
                const float* a = scale[p];
                __m512 sc = a ? _mm512_mul_ps(mag, _mm512_loadu_ps(a + j)) : mag;
                sel &= _mm512_cmp_ps_mask(sc, _mm512_set1_ps(threshold[p]), _CMP_GT_OQ);
            }
            _mm512_storeu_si512((void*)(idx + p * stride + k[p]), _mm512_maskz_compress_epi32(sel, iv));
            _mm512_storeu_ps(val + p * stride + k[p], _mm512_maskz_compress_ps(sel, v));
            k[p] += __builtin_popcount((unsigned)sel);
        }
    }
#endif
    for (; j < n; j++) {
        float v = m ? x[j] - m[j] : x[j];
        int base = keep ? keep[j] != 0 : 1;
        for (int p = 0; p < np; p++) {
            if (dense[p]) continue;
            int ok = base;
            if (rule[p]) ok &= fabsf(v) * (scale[p] ? scale[p][j] : 1.0f) > threshold[p];
            idx[p * stride + k[p]] = (int32_t)j;
            val[p * stride + k[p]] = v;
            k[p] += ok;
        }
    }
    for (int p = 0; p < np; p++) nk[p] = dense[p] ? -1 : k[p];
}

/* The site's kept channels under its rule: one list for the site (rule 0 or 1), or one per
 * projection (rule 2, np lists); see select_lists. */
static void site_select(const EngSite* s, int np, const float* x, int64_t n, int32_t* idx, float* val,
                        int64_t stride, int64_t* nk) {
    if (s->rule == RULE_PER_PROJ) {
        select_lists(np, s->prule, s->pscale, s->pthreshold, s->center, s->keep, x, n, idx, val, stride, nk);
    } else {
        const int32_t rule = s->rule != 0;
        select_lists(1, &rule, &s->scale, &s->threshold, s->center, s->keep, x, n, idx, val, stride, nk);
    }
}
#endif
