/* Native decode engine: structs shared with Python (ctypes mirrors in attrsparse/deploy/engine/cdefs.py).
 *
 * Every linear is stored input-major (W^T, [in, P] row-major, P = physical outputs), so input
 * channel j is one contiguous run of P weights. Physical layouts per layer:
 *   w[0] qkv : [hidden, (H + 2 KV) * hd]   columns q | k | v
 *   w[1] o   : [H * hd, hidden]
 *   w[2] gu  : [hidden, 2 * inter]         columns gate | up (format 2; format 1 interleaved them by
 *                                          blocks of 16, which a per-projection rule could not skip)
 *   w[3] down: [inter, hidden]
 * So every projection of a site is one contiguous column range of its input-major matrix: a
 * projection with its own kept rows reads only its own columns of those rows.
 * Element types: ENG_F32, ENG_BF16 (fp32 accumulation), ENG_I8 (per physical output scale).
 */
#ifndef ATTRSPARSE_ENGINE_H
#define ATTRSPARSE_ENGINE_H
#include <stdint.h>

enum { ENG_F32 = 0, ENG_BF16 = 1, ENG_I8 = 2 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2 };
/* step modes */
/* MODE_GREEDY_CHECK: the screened argmax, and the full head's argmax in `check` (verification) */
enum { MODE_NONE = 0, MODE_GREEDY_SCREENED = 1, MODE_GREEDY_FULL = 2, MODE_SAMPLE = 3, MODE_GREEDY_CHECK = 4 };
/* sites: attn_in (q,k,v input), attn_out (o input), mlp_in (gate,up input), mlp_out (down input) */
enum { SITE_ATTN_IN = 0, SITE_ATTN_OUT = 1, SITE_MLP_IN = 2, SITE_MLP_OUT = 3, N_SITES = 4 };

/* projections, in the order of EngStep.kept: attn_in feeds q, k, v; attn_out o; mlp_in gate, up;
 * mlp_out down */
enum { PROJ_Q = 0, PROJ_K, PROJ_V, PROJ_O, PROJ_GATE, PROJ_UP, PROJ_DOWN, N_PROJ = 7 };
enum { MAX_PROJ = 3 };  /* projections of one site (attn_in) */
enum { RULE_NONE = 0, RULE_SHARED = 1, RULE_PER_PROJ = 2 };  /* EngSite.rule */

/* Channel rule of one input site.
 * rule 0/1 (one decision for the site, shared by its projections): channel j is kept iff
 *   (keep == NULL || keep[j]) and (rule == 0 || |x_j - m_j| * a_j > threshold);
 * rule 2 (one decision per projection p of the site, in site order: q, k, v or gate, up): projection
 *   p keeps channel j iff (keep == NULL || keep[j]) and (!prule[p] || |x_j - m_j| * pscale[p][j] >
 *   pthreshold[p]); scale and threshold are unused. The center m and the fixed mask are shared.
 * A projection computes y = sum_{j it keeps} W^T[j, cols] (x_j - m_j) + bias[cols]. */
typedef struct EngSite {
    const float* scale;    /* a_j >= 0 [in], NULL = 1 (rule 1) */
    const float* center;   /* m_j [in], NULL = 0 */
    const uint8_t* keep;   /* fixed keep-mask [in], NULL = all */
    const float* bias;     /* compensation [P] in physical output order, NULL = 0 */
    float threshold;       /* rule 1 */
    int32_t rule;          /* 0: no threshold test; 1: one test for the site; 2: one per projection */
    const float* pscale[MAX_PROJ];  /* rule 2: a_{p,j} >= 0 [in] of projection p, NULL = 1 */
    float pthreshold[MAX_PROJ];     /* rule 2 */
    int32_t prule[MAX_PROJ];        /* rule 2: 1 = projection p applies its threshold test */
} EngSite;

typedef struct EngLayer {
    const void* w[4];          /* qkv, o, gu, down (input-major) */
    const float* wscale[4];    /* int8: per physical output scale; else NULL */
    const float* wbias[4];     /* the model's own biases (physical order) or NULL */
    const float* norm[4];      /* attn_in, attn_out (post-attention, Gemma), mlp_in, mlp_out (post-ff, Gemma) */
    const float* q_norm;       /* [hd] or NULL (Gemma 3) */
    const float* k_norm;
    const float* inv_freq;     /* [hd / 2] */
    float rope_scale;          /* attention_scaling of the rope type (1 for the default) */
    int32_t window;            /* sliding window (keys kv > pos - window), 0 = full attention */
    EngSite site[N_SITES];
} EngLayer;

typedef struct EngModel {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab;
    int32_t wtype, head_type, emb_type, act;
    float eps, emb_scale, attn_scale, attn_softcap, final_softcap;
    int32_t head_fd;           /* > 0: read head rows from this file descriptor (runner.py); 0 (a
                                * zeroed struct) or less: from `head` */
    const void* embed;         /* [vocab, hidden] row-major, emb_type */
    const float* embed_scale;  /* per row (int8) */
    const void* head;          /* [vocab, hidden] row-major, head_type */
    const float* head_scale;   /* per row (int8) */
    const int8_t* screen;      /* [vocab, hidden] int8 copy of the head, or NULL */
    const float* screen_scale; /* per row */
    const float* screen_bound; /* per row c_v: |exact_v - approx_v| <= c_v * ||h|| (see engine.c) */
    const float* final_norm;
    EngLayer* layers;
    int64_t head_off;          /* with head_fd > 0: the head's offset in that file */
    /* Input-sparse head, or NULL: the head is then stored input-major, [hidden, vocab] in `head`
     * (= head_lin->w[0], wscale[0] = head_scale, per vocabulary entry for int8, of type wtype),
     * and runs as a linear through head_lin->site[0] (its channel rule on the final normed hidden
     * state); there is no screen. A tied embedding reads column `token` of it. */
    EngLayer* head_lin;
} EngModel;

typedef struct EngStep {
    int64_t token;           /* in */
    int32_t threads;         /* in */
    int32_t mode;            /* in: MODE_* */
    float temperature;       /* in (sampling) */
    float top_p;             /* in (sampling) */
    float* logits;           /* in: optional [vocab] output (forces the full head) */
    int32_t* kept;           /* in: optional [n_layers * N_PROJ] input channels each projection read
                              * (q, k, v, o, gate, up, down; under a shared site rule q, k, v (gate,
                              * up) hold the same count) */
    int64_t next;            /* out: next token (-1 with MODE_NONE) */
    int64_t linear_reads;    /* out: weight elements read by the decoder linears:
                              * sum over projections of kept channels x the projection's outputs */
    int64_t head_bytes;      /* out: bytes of LM-head weights read (screen copy + exact rows; input-sparse
                              * head: kept channels x vocab) */
    int64_t candidates;      /* out: head rows computed exactly (input-sparse head: the vocabulary) */
    int64_t check;           /* out: with MODE_GREEDY_CHECK, the full head's argmax (input-sparse head:
                              * of the head with every channel kept) */
} EngStep;

#endif
