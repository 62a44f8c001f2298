/* Shared by the fused CPU forward's sources: the structs Python fills (mirrored in cpu_kernel.py), bfloat16
 * conversions, and the AVX-512 BF16 dot product of one weight row against a few token rows.
 * Owns no state; knows nothing of layers or attention. */
#ifndef MH_KERNEL_H
#define MH_KERNEL_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MH_PORTABLE)
#include <immintrin.h>
#define MH_BF16_DOT 1
#endif

typedef struct {
    const uint16_t *ln1, *ln2;           /* [h] */
    const uint16_t *wqkv, *bqkv;         /* [(H + 2KV) d, h], [(H + 2KV) d] or NULL */
    const uint16_t *q_norm, *k_norm;     /* [d] or NULL (qwen3) */
    const uint16_t *wo, *bo;             /* [h, H d], [h] or NULL */
    const uint16_t *wgu;                 /* [2I, h]: gate rows, then up rows */
    const uint16_t *wdown;               /* [h, I] */
} mh_layer;

typedef struct {
    int32_t num_layers, hidden, heads, kv_heads, head_dim, inter;
    float eps;
    int32_t tokens_per_page, sliding_window; /* sliding_window 0 = none */
    const mh_layer *layers;
    const uint16_t *embed, *final_norm;  /* [V, h], [h] */
    uint16_t *cache;                     /* the arena, as bfloat16 elements */
    int64_t page_stride, kv_stride, layer_stride; /* elements: page to page, keys to values, layer to layer */
} mh_model;

typedef struct {
    int32_t T, max_pages, max_ctx, num_threads;
    const int64_t *input_ids;            /* [T] */
    const int32_t *seq_of, *pos;         /* [T] sequence index and position of each token */
    const int32_t *block_tables;         /* [S, max_pages] */
    const float *cos, *sin;              /* [T, d]; sin signed: rope(x) = x cos + roll(x, d/2) sin */
    float *x;                            /* [T, h] residual stream (scratch) */
    float *qkv;                          /* [T, (H + 2KV) d] */
    float *gu;                           /* [T, 2I] */
    float *scores;                       /* [T * H, max_ctx] */
    uint16_t *xn, *attn, *act;           /* [T, h], [T, H d], [T, I] bfloat16 matmul inputs */
    uint16_t *out;                       /* [T, h] final-normed hidden states, bfloat16 */
} mh_step;

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40); /* NaN stays NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}


#ifdef MH_BF16_DOT
/* One weight row against MT <= 8 token rows. The weights are read strictly in order (one row after the other):
 * that streams at ~30 GB/s on 2 cores, where interleaving several rows' streams reached ~20. Token rows stay in
 * L1. Two accumulators per token row (even and odd 32-element blocks), whatever MT is: a row's dot product is
 * summed in the same order in every batch, so a token's result does not depend on its batch-mates. */
static inline __attribute__((always_inline)) void row_dot(const uint16_t *w, int K, const uint16_t *X, int ldx,
                                                          float *res, const int MT) {
    __m512 a[16];
    for (int i = 0; i < 2 * MT; i++) a[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
        for (int m = 0; m < MT; m++) {
            const uint16_t *x = X + (size_t)m * ldx + k;
            a[2 * m] = _mm512_dpbf16_ps(a[2 * m], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x));
            a[2 * m + 1] = _mm512_dpbf16_ps(a[2 * m + 1], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + 32));
        }
    }
    for (; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1u);
        __m512i w0 = _mm512_maskz_loadu_epi16(mask, w + k);
        for (int m = 0; m < MT; m++)
            a[2 * m] = _mm512_dpbf16_ps(a[2 * m], (__m512bh)w0,
                                        (__m512bh)_mm512_maskz_loadu_epi16(mask, X + (size_t)m * ldx + k));
    }
    for (int m = 0; m < MT; m++) res[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[2 * m], a[2 * m + 1]));
}

/* row_dot with MT (1..8) known at compile time in each branch, so the accumulators stay in registers. */
static inline void row_dots(const uint16_t *w, int K, const uint16_t *X, int ldx, float *res, int MT) {
    switch (MT) {
    case 1: row_dot(w, K, X, ldx, res, 1); break;
    case 2: row_dot(w, K, X, ldx, res, 2); break;
    case 3: row_dot(w, K, X, ldx, res, 3); break;
    case 4: row_dot(w, K, X, ldx, res, 4); break;
    case 5: row_dot(w, K, X, ldx, res, 5); break;
    case 6: row_dot(w, K, X, ldx, res, 6); break;
    case 7: row_dot(w, K, X, ldx, res, 7); break;
    default: row_dot(w, K, X, ldx, res, 8); break;
    }
}
#endif

#endif
