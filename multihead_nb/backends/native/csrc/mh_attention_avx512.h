/* AVX-512 BF16 attention (vdpbf16ps scores, 512-bit value sums) of one token over the G query heads of a KV head.
 * Included by mh_attention.h; knows nothing of layers or of the threads' split. */
#ifndef MH_ATTENTION_AVX512_H
#define MH_ATTENTION_AVX512_H
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
