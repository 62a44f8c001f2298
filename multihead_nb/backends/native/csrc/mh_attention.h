/* Attention of one token over its sequence's K/V pages (causal, optionally a sliding window): the portable
 * per-head version and, with AVX-512 BF16, a version that serves all the query heads of one KV head per pass.
 * Reads the K/V the forward already wrote for this step; knows nothing of weights. */
#ifndef MH_ATTENTION_H
#define MH_ATTENTION_H
#include "mh_kernel.h"

static inline int64_t slot_offset(const mh_model *m, const mh_step *s, int seq, int p) {
    int32_t page = s->block_tables[(size_t)seq * s->max_pages + p / m->tokens_per_page];
    return (int64_t)page * m->page_stride + (int64_t)(p % m->tokens_per_page) * m->kv_heads * m->head_dim;
}

/* Token t, query head hq: softmax(q . K / sqrt(d)) V over keys [lo, pos] of its sequence → out (bfloat16). */
static void attend(const mh_model *m, const mh_step *s, int layer, int t, int hq, float *scores, uint16_t *out) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, kvh = hq / G;
    const int QKV = (m->heads + 2 * m->kv_heads) * d;
    const float *q = s->qkv + (size_t)t * QKV + (size_t)hq * d;
    const int seq = s->seq_of[t], p = s->pos[t];
    int lo = 0;
    if (m->sliding_window > 0 && p - m->sliding_window + 1 > 0) lo = p - m->sliding_window + 1;
    const uint16_t *keys = m->cache + (int64_t)layer * m->layer_stride + (int64_t)kvh * d;
    const uint16_t *vals = keys + m->kv_stride;
    const float scale = 1.0f / sqrtf((float)d);
    float mx = -INFINITY;
    for (int j = lo; j <= p; j++) {
        const uint16_t *k = keys + slot_offset(m, s, seq, j);
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int c = 0; c < d; c++) acc += q[c] * bf16_to_f32(k[c]);
        acc *= scale;
        scores[j - lo] = acc;
        if (acc > mx) mx = acc;
    }
    float o[512];
    for (int c = 0; c < d; c++) o[c] = 0.0f;
    float sum = 0.0f;
    for (int j = lo; j <= p; j++) {
        float e = expf(scores[j - lo] - mx);
        sum += e;
        const uint16_t *v = vals + slot_offset(m, s, seq, j);
#pragma omp simd
        for (int c = 0; c < d; c++) o[c] += e * bf16_to_f32(v[c]);
    }
    for (int c = 0; c < d; c++) out[c] = f32_to_bf16(o[c] / sum);
}

#ifdef MH_BF16_DOT
/* exp(x) for softmax arguments (x <= 0), 16 at a time: 2^n * poly(r), |r| <= ln2 / 2, relative error ~1e-7. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Token t, the G query heads sharing KV head kvh: each key and value is loaded once for all G heads.
 * Needs d % 16 == 0, d <= 256, G <= 8. scores: [G, max_ctx]; out: [G, d] bfloat16. */
static void attend_group(const mh_model *m, const mh_step *s, int layer, int t, int kvh, float *scores,
                         uint16_t *out) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, tpp = m->tokens_per_page, KVd = m->kv_heads * d;
    const int QKV = (m->heads + 2 * m->kv_heads) * d, ms = s->max_ctx;
    const int seq = s->seq_of[t], p = s->pos[t];
    int lo = 0;
    if (m->sliding_window > 0 && p - m->sliding_window + 1 > 0) lo = p - m->sliding_window + 1;
    const int n = p - lo + 1;
    const float scale = 1.0f / sqrtf((float)d);
    uint16_t qb[8 * 256];
    for (int g = 0; g < G; g++) {
        const float *q = s->qkv + (size_t)t * QKV + (size_t)(kvh * G + g) * d;
        for (int c = 0; c < d; c++) qb[g * d + c] = f32_to_bf16(q[c] * scale);
    }
    const int32_t *table = s->block_tables + (size_t)seq * s->max_pages;
    const uint16_t *layer_keys = m->cache + (int64_t)layer * m->layer_stride + (int64_t)kvh * d;
    float mx[8], sum[8], res[8];
    for (int g = 0; g < G; g++) mx[g] = -INFINITY;
    for (int j = lo; j <= p;) { /* page by page */
        const int pi = j / tpp, end = (pi + 1) * tpp - 1 < p ? (pi + 1) * tpp - 1 : p;
        const uint16_t *base = layer_keys + (int64_t)table[pi] * m->page_stride;
        for (; j <= end; j++) {
            row_dots(base + (size_t)(j - pi * tpp) * KVd, d, qb, d, res, G);
            for (int g = 0; g < G; g++) {
                scores[(size_t)g * ms + j - lo] = res[g];
                if (res[g] > mx[g]) mx[g] = res[g];
            }
        }
    }
    for (int g = 0; g < G; g++) { /* softmax numerators in place, and their sums */
        float *sc = scores + (size_t)g * ms;
        __m512 acc = _mm512_setzero_ps(), mv = _mm512_set1_ps(mx[g]);
        for (int j = 0; j < n; j += 16) {
            __mmask16 mask = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1u);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sc + j), mv));
            e = _mm512_maskz_mov_ps(mask, e);
            _mm512_mask_storeu_ps(sc + j, mask, e);
            acc = _mm512_add_ps(acc, e);
        }
        sum[g] = _mm512_reduce_add_ps(acc);
    }
    for (int c = 0; c < d; c += 16) { /* 16 output columns of every head, over all values */
        __m512 o[8];
        for (int g = 0; g < G; g++) o[g] = _mm512_setzero_ps();
        for (int j = lo; j <= p;) {
            const int pi = j / tpp, end = (pi + 1) * tpp - 1 < p ? (pi + 1) * tpp - 1 : p;
            const uint16_t *base = layer_keys + m->kv_stride + (int64_t)table[pi] * m->page_stride + c;
            for (; j <= end; j++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(base + (size_t)(j - pi * tpp) * KVd));
                __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                for (int g = 0; g < G; g++)
                    o[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(size_t)g * ms + j - lo]), v, o[g]);
            }
        }
        for (int g = 0; g < G; g++) {
            float tmp[16];
            _mm512_storeu_ps(tmp, _mm512_div_ps(o[g], _mm512_set1_ps(sum[g])));
            for (int i = 0; i < 16; i++) out[g * d + c + i] = f32_to_bf16(tmp[i]);
        }
    }
}
#endif

#endif
