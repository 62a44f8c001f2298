/* Attention of one token over its sequence's K/V pages (causal, optionally a sliding window), read straight from
 * the arena through the block tables: a per-head version for any shape, a grouped one that serves all the query
 * heads of one KV head per pass (each key and value loaded once; plain C the compiler vectorizes), and grouped
 * one in intrinsics for x86 (mh_attention_avx2.h, AVX-512 builds too); over the int8 K/V cache
 * mh_attention_int8.h's (and its x86 one, mh_attention_int8_x86.h). Scores in float32; output float32.
 * Reads the K/V the forward already wrote for this step; knows nothing of weights. */
#ifndef MH_ATTENTION_H
#define MH_ATTENTION_H
#include "mh_kernel.h"

static inline int64_t slot_offset(const mh_model *m, const mh_step *s, int seq, int p) {
    int32_t page = s->block_tables[(size_t)seq * s->max_pages + p / m->tokens_per_page];
    return (int64_t)page * m->page_stride + (int64_t)(p % m->tokens_per_page) * m->kv_heads * m->head_dim;
}

static inline int window_lo(const mh_model *m, int p) {
    return m->sliding_window > 0 && p - m->sliding_window + 1 > 0 ? p - m->sliding_window + 1 : 0;
}

/* Token t (query q [d]), query head hq: softmax(q . K / sqrt(d)) V over keys [lo, pos] → out [d]. */
static void attend(const mh_model *m, const mh_step *s, int layer, int t, int hq, const float *q, float *scores,
                   float *out) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, kvh = hq / G;
    const int seq = s->seq_of[t], p = s->pos[t], lo = window_lo(m, p);
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
    for (int c = 0; c < d; c++) out[c] = 0.0f;
    float sum = 0.0f;
    for (int j = lo; j <= p; j++) {
        float e = expf(scores[j - lo] - mx);
        sum += e;
        const uint16_t *v = vals + slot_offset(m, s, seq, j);
#pragma omp simd
        for (int c = 0; c < d; c++) out[c] += e * bf16_to_f32(v[c]);
    }
    for (int c = 0; c < d; c++) out[c] /= sum;
}

#define MH_GROUP_MAX 8
#define MH_GROUP_DIM 256

/* Token t, the G (<= 8) query heads sharing KV head kvh (d <= 256): q [G, d] (heads kvh G .. kvh G + G - 1 of
 * the token's queries), scores [G, max_ctx], out [G, d]. */
static __attribute__((unused)) void attend_group_c(const mh_model *m, const mh_step *s, int layer, int t, int kvh, const float *q,
                           float *scores, float *out) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, ms = s->max_ctx;
    const int seq = s->seq_of[t], p = s->pos[t], lo = window_lo(m, p);
    const float scale = 1.0f / sqrtf((float)d);
    float qs[MH_GROUP_MAX * MH_GROUP_DIM], row[MH_GROUP_DIM], mx[MH_GROUP_MAX], sum[MH_GROUP_MAX];
    for (int i = 0; i < G * d; i++) qs[i] = q[i] * scale;
    const uint16_t *keys = m->cache + (int64_t)layer * m->layer_stride + (int64_t)kvh * d;
    const uint16_t *vals = keys + m->kv_stride;
    for (int g = 0; g < G; g++) mx[g] = -INFINITY;
    for (int j = lo; j <= p; j++) {
        const uint16_t *k = keys + slot_offset(m, s, seq, j);
        for (int c = 0; c < d; c++) row[c] = bf16_to_f32(k[c]);
        for (int g = 0; g < G; g++) {
            const float *qg = qs + g * d;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int c = 0; c < d; c++) acc += qg[c] * row[c];
            scores[(size_t)g * ms + j - lo] = acc;
            if (acc > mx[g]) mx[g] = acc;
        }
    }
    for (int g = 0; g < G; g++) {
        float *sc = scores + (size_t)g * ms, tot = 0.0f;
        for (int j = 0; j <= p - lo; j++) {
            sc[j] = expf(sc[j] - mx[g]);
            tot += sc[j];
        }
        sum[g] = tot;
    }
    for (int i = 0; i < G * d; i++) out[i] = 0.0f;
    for (int j = lo; j <= p; j++) {
        const uint16_t *v = vals + slot_offset(m, s, seq, j);
        for (int c = 0; c < d; c++) row[c] = bf16_to_f32(v[c]);
        for (int g = 0; g < G; g++) {
            const float e = scores[(size_t)g * ms + j - lo];
            float *o = out + g * d;
#pragma omp simd
            for (int c = 0; c < d; c++) o[c] += e * row[c];
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < d; c++) out[g * d + c] /= sum[g];
}

#include "mh_attention_int8.h"
#include "mh_attention_avx2.h"


#endif
