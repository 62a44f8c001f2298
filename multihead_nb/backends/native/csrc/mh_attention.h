/* Attention of one token over its sequence's K/V pages (causal, optionally a sliding window), read straight from
 * the arena through the block tables: a per-head version for any shape, a grouped one that serves all the query
 * heads of one KV head per pass (each key and value loaded once; plain C the compiler vectorizes), and grouped
 * ones in intrinsics for AVX2 and AVX-512 BF16. Scores in float32; output float32.
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

#if defined(MH_ISA_X86) && !defined(MH_BF16_DOT)
static inline float hsum8a(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 widen8(const uint16_t *p) { /* 8 bfloat16 -> float32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* exp(x) for softmax arguments (x <= 0), 8 at a time: 2^n * poly(r), |r| <= ln2 / 2, relative error ~1e-7. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Keys per attention task: a token's context of n keys is cut in chunks of this many (64: a lone decode token's
 * attention spreads over the threads; at most 64 chunks); it depends on the token's own context only, so a
 * token's result never depends on its batch-mates. */
static inline int att_chunk(int n) { return n <= 64 * 64 ? 64 : (n + 63) / 64; }

/* 4 accumulators (one key each) -> their 4 sums. */
static inline __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* One chunk [j0, j1] of token t's keys, the G (<= 8) query heads of KV head kvh (d % 8 == 0, d <= 256), in AVX2 +
 * FMA: scores of 4 keys x 3 heads at a time (each key row widened once for 3 heads), a vectorized exp, values
 * summed 32 columns x 3 heads at a time. Writes the unnormalized output o [G, d], the scores' max mx [G] and the
 * sum of exp(score - max) sm [G]; `attn_merge` combines a token's chunks. sc: scratch [G, ldsc >= n]. */
static void attend_part_avx2(const mh_model *m, const mh_step *s, int layer, int t, int kvh, const float *q, int j0,
                             int j1, float *sc, int ldsc, float *o, float *mx, float *sm) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, n = j1 - j0 + 1, seq = s->seq_of[t];
    const float scale = 1.0f / sqrtf((float)d);
    const uint16_t *keys = m->cache + (int64_t)layer * m->layer_stride + (int64_t)kvh * d;
    float qs[MH_GROUP_MAX * MH_GROUP_DIM];
    for (int i = 0; i < G * d; i++) qs[i] = q[i] * scale;
    const uint16_t *kp_all[n]; /* each key's row, page by page (no division per key) */
    {
        const int tpp = m->tokens_per_page, KVd = m->kv_heads * d;
        const int32_t *table = s->block_tables + (size_t)seq * s->max_pages;
        for (int j = j0; j <= j1;) {
            const int pi = j / tpp, end = (pi + 1) * tpp - 1 < j1 ? (pi + 1) * tpp - 1 : j1;
            const uint16_t *base = keys + (int64_t)table[pi] * m->page_stride + (int64_t)(j - pi * tpp) * KVd;
            for (; j <= end; j++, base += KVd) kp_all[j - j0] = base;
        }
    }
    /* The pages are scattered in the arena and the weights streamed since this layer's keys were written have
     * pushed them out of cache: fetch each key row 8 keys ahead, and its value row while its key is used (the
     * hardware prefetchers do not follow a block table). */
    const int row_bytes = 2 * d;
    for (int j = 0; j < n && j < 8; j++)
        for (int c = 0; c < row_bytes; c += 64) _mm_prefetch((const char *)kp_all[j] + c, _MM_HINT_T0);
    for (int g0 = 0; g0 < G; g0 += 3) {
        const int ng = G - g0 < 3 ? G - g0 : 3;
        const float *qg[3];
        for (int g = 0; g < 3; g++) qg[g] = qs + (size_t)(g0 + (g < ng ? g : ng - 1)) * d;
        for (int k0 = 0; k0 < n; k0 += 4) {
            const int nk = n - k0 < 4 ? n - k0 : 4;
            const uint16_t *kp[4];
            for (int i = 0; i < 4; i++) kp[i] = kp_all[k0 + (i < nk ? i : nk - 1)];
            if (g0 == 0)
                for (int i = 0; i < nk; i++)
                    for (int c = 0; c < row_bytes; c += 64) {
                        if (k0 + 8 + i < n) _mm_prefetch((const char *)kp_all[k0 + 8 + i] + c, _MM_HINT_T0);
                        _mm_prefetch((const char *)(kp_all[k0 + i] + m->kv_stride) + c, _MM_HINT_T0);
                    }
            __m256 acc[3][4];
            for (int g = 0; g < 3; g++)
                for (int i = 0; i < 4; i++) acc[g][i] = _mm256_setzero_ps();
            for (int c = 0; c < d; c += 8) {
                const __m256 q0 = _mm256_loadu_ps(qg[0] + c), q1 = _mm256_loadu_ps(qg[1] + c);
                const __m256 q2 = _mm256_loadu_ps(qg[2] + c);
                for (int i = 0; i < 4; i++) {
                    const __m256 kv = widen8(kp[i] + c);
                    acc[0][i] = _mm256_fmadd_ps(q0, kv, acc[0][i]);
                    acc[1][i] = _mm256_fmadd_ps(q1, kv, acc[1][i]);
                    acc[2][i] = _mm256_fmadd_ps(q2, kv, acc[2][i]);
                }
            }
            for (int g = 0; g < ng; g++) {
                float r[4];
                _mm_storeu_ps(r, hsum4x8(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
                for (int i = 0; i < nk; i++) sc[(size_t)(g0 + g) * ldsc + k0 + i] = r[i];
            }
        }
    }
    for (int g = 0; g < G; g++) { /* exp(score - max) in place, and the sums */
        float *row = sc + (size_t)g * ldsc, best = -INFINITY;
        for (int j = 0; j < n; j++) best = row[j] > best ? row[j] : best;
        const __m256 mv = _mm256_set1_ps(best);
        __m256 acc = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + j), mv));
            _mm256_storeu_ps(row + j, e);
            acc = _mm256_add_ps(acc, e);
        }
        float tot = hsum8a(acc);
        for (; j < n; j++) {
            row[j] = expf(row[j] - best);
            tot += row[j];
        }
        mx[g] = best;
        sm[g] = tot;
    }
    for (int g0 = 0; g0 < G; g0 += 3) {
        const int ng = G - g0 < 3 ? G - g0 : 3;
        for (int c0 = 0; c0 < d; c0 += 32) {
            const int nc = d - c0 < 32 ? (d - c0) / 8 : 4;
            __m256 acc[3][4];
            for (int g = 0; g < 3; g++)
                for (int c = 0; c < 4; c++) acc[g][c] = _mm256_setzero_ps();
            for (int j = 0; j < n; j++) {
                const uint16_t *v = kp_all[j] + m->kv_stride + c0;
                __m256 p[3];
                for (int g = 0; g < ng; g++) p[g] = _mm256_broadcast_ss(sc + (size_t)(g0 + g) * ldsc + j);
                for (int c = 0; c < nc; c++) {
                    const __m256 vv = widen8(v + 8 * c);
                    for (int g = 0; g < ng; g++) acc[g][c] = _mm256_fmadd_ps(p[g], vv, acc[g][c]);
                }
            }
            for (int g = 0; g < ng; g++)
                for (int c = 0; c < nc; c++) _mm256_storeu_ps(o + (size_t)(g0 + g) * d + c0 + 8 * c, acc[g][c]);
        }
    }
}

/* A token's `nch` chunk results (o [nch, G, d], mx and sm [nch, G]) -> its attention output out [G, d]. */
static void attn_merge(int G, int d, int nch, const float *o, const float *mx, const float *sm, float *out) {
    for (int g = 0; g < G; g++) {
        float best = -INFINITY;
        for (int c = 0; c < nch; c++) best = mx[c * G + g] > best ? mx[c * G + g] : best;
        float tot = 0.0f, wgt[64];
        for (int c = 0; c < nch; c++) {
            wgt[c] = nch == 1 ? 1.0f : expf(mx[c * G + g] - best);
            tot += wgt[c] * sm[c * G + g];
        }
        for (int i = 0; i < d; i++) {
            float acc = 0.0f;
            for (int c = 0; c < nch; c++) acc += wgt[c] * o[((size_t)c * G + g) * d + i];
            out[g * d + i] = acc / tot;
        }
    }
}
#endif

#ifdef MH_BF16_DOT
/* One key row (bfloat16) against G <= 8 query rows (bfloat16), d elements: two accumulators per query row. */
static inline __attribute__((always_inline)) void key_dots(const uint16_t *w, int K, const uint16_t *X, float *res,
                                                           const int MT) {
    __m512 a[16];
    for (int i = 0; i < 2 * MT; i++) a[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
        for (int m = 0; m < MT; m++) {
            const uint16_t *x = X + (size_t)m * K + k;
            a[2 * m] = _mm512_dpbf16_ps(a[2 * m], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x));
            a[2 * m + 1] = _mm512_dpbf16_ps(a[2 * m + 1], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + 32));
        }
    }
    for (; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1u);
        __m512i w0 = _mm512_maskz_loadu_epi16(mask, w + k);
        for (int m = 0; m < MT; m++)
            a[2 * m] = _mm512_dpbf16_ps(a[2 * m], (__m512bh)w0,
                                        (__m512bh)_mm512_maskz_loadu_epi16(mask, X + (size_t)m * K + k));
    }
    for (int m = 0; m < MT; m++) res[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[2 * m], a[2 * m + 1]));
}

static inline void key_dots_n(const uint16_t *w, int K, const uint16_t *X, float *res, int MT) {
    switch (MT) {
    case 1: key_dots(w, K, X, res, 1); break;
    case 2: key_dots(w, K, X, res, 2); break;
    case 3: key_dots(w, K, X, res, 3); break;
    case 4: key_dots(w, K, X, res, 4); break;
    case 5: key_dots(w, K, X, res, 5); break;
    case 6: key_dots(w, K, X, res, 6); break;
    case 7: key_dots(w, K, X, res, 7); break;
    default: key_dots(w, K, X, res, 8); break;
    }
}

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

/* attend_group_c with vdpbf16ps scores (queries rounded to bfloat16) and 512-bit value sums; d % 16 == 0. */
static void attend_group(const mh_model *m, const mh_step *s, int layer, int t, int kvh, const float *q,
                         float *scores, float *out) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, tpp = m->tokens_per_page, KVd = m->kv_heads * d;
    const int ms = s->max_ctx, seq = s->seq_of[t], p = s->pos[t], lo = window_lo(m, p);
    const int n = p - lo + 1;
    const float scale = 1.0f / sqrtf((float)d);
    uint16_t qb[MH_GROUP_MAX * MH_GROUP_DIM];
    for (int i = 0; i < G * d; i++) qb[i] = f32_to_bf16(q[i] * scale);
    const int32_t *table = s->block_tables + (size_t)seq * s->max_pages;
    const uint16_t *layer_keys = m->cache + (int64_t)layer * m->layer_stride + (int64_t)kvh * d;
    float mx[8], sum[8], res[8];
    for (int g = 0; g < G; g++) mx[g] = -INFINITY;
    for (int j = lo; j <= p;) { /* page by page */
        const int pi = j / tpp, end = (pi + 1) * tpp - 1 < p ? (pi + 1) * tpp - 1 : p;
        const uint16_t *base = layer_keys + (int64_t)table[pi] * m->page_stride;
        for (; j <= end; j++) {
            key_dots_n(base + (size_t)(j - pi * tpp) * KVd, d, qb, res, G);
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
        for (int g = 0; g < G; g++) _mm512_storeu_ps(out + g * d + c, _mm512_div_ps(o[g], _mm512_set1_ps(sum[g])));
    }
}
#endif

#endif
