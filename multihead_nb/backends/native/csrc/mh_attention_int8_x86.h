/* Attention over an int8 K/V cache (mh_attention_int8.h's rows, one scale a row) in AVX2 + FMA, 16 lanes wide in
 * AVX-512 builds: one chunk of a lone token's keys for KV heads [h0, h0 + nh), all of them in one task where a key's
 * row for every KV head is a few cache lines (att_allkv_fits), else one. Scores: 4 keys x 3 query heads at a time,
 * each key's int8 turned to float32 in registers once for the 3 heads, summed over the lanes (hsum4x8 / hsum16x4), then
 * times the 4 keys' scales. Values: each softmax weight times its row's scale once, then 32 columns x 3 heads of
 * multiply-adds in registers. Outputs as attend_part_avx2's (merged by attn_merge). Included by mh_attention_avx2.h
 * (its helpers: softmax_rows, hsum4x8, store_scores4, rows3); knows nothing of the threads' split. */
#ifndef MH_ATTENTION_INT8_X86_H
#define MH_ATTENTION_INT8_X86_H

static inline __m256 kv8_f32x8(const int8_t *p) { /* 8 int8 -> float32 (exact) */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

#if defined(MH_ATT_ZMM)
static inline __m512 kv8_f32x16(const int8_t *p) { /* 16 int8 -> float32 (exact) */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* Scores of 4 int8 key rows (kp[i], d % 16 == 0) x 3 query rows (qg[g], floats) -> out[g] (key i in element i),
 * unscaled: lane l sums q[c] k[c] over c = l, l + 16, ... by multiply-adds in that order, then hsum16x4. */
static inline void kv8_scores_4x3(const float *const *qg, const int8_t *const *kp, int d, __m128 out[3]) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int c = 0; c < d; c += 16) {
        const __m512 q0 = _mm512_loadu_ps(qg[0] + c), q1 = _mm512_loadu_ps(qg[1] + c);
        const __m512 q2 = _mm512_loadu_ps(qg[2] + c);
#define MH_KV8_KEY(i, x0, x1, x2)                                                                                  \
    {                                                                                                              \
        const __m512 k = kv8_f32x16(kp[i] + c);                                                                    \
        x0 = _mm512_fmadd_ps(q0, k, x0), x1 = _mm512_fmadd_ps(q1, k, x1), x2 = _mm512_fmadd_ps(q2, k, x2);         \
    }
        MH_KV8_KEY(0, a00, a10, a20) MH_KV8_KEY(1, a01, a11, a21) MH_KV8_KEY(2, a02, a12, a22)
        MH_KV8_KEY(3, a03, a13, a23)
#undef MH_KV8_KEY
    }
    out[0] = hsum16x4(a00, a01, a02, a03);
    out[1] = hsum16x4(a10, a11, a12, a13);
    out[2] = hsum16x4(a20, a21, a22, a23);
}

/* 32 value columns of n int8 rows (rows[j] + off) weighted by 3 heads' pr[g][j] (each already times its row's
 * scale), summed in key order -> o rows g < ng (d apart). */
static inline void kv8_values_32x3(const int8_t *const *rows, int64_t off, int n, const float *const *pr, int ng,
                                   int d, float *o) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    for (int j = 0; j < n; j++) {
        const int8_t *v = rows[j] + off;
        const __m512 p0 = _mm512_set1_ps(pr[0][j]), p1 = _mm512_set1_ps(pr[1][j]), p2 = _mm512_set1_ps(pr[2][j]);
        const __m512 x0 = kv8_f32x16(v), x1 = kv8_f32x16(v + 16);
        a00 = _mm512_fmadd_ps(p0, x0, a00), a10 = _mm512_fmadd_ps(p1, x0, a10), a20 = _mm512_fmadd_ps(p2, x0, a20);
        a01 = _mm512_fmadd_ps(p0, x1, a01), a11 = _mm512_fmadd_ps(p1, x1, a11), a21 = _mm512_fmadd_ps(p2, x1, a21);
    }
    const __m512 res[3][2] = {{a00, a01}, {a10, a11}, {a20, a21}};
    for (int g = 0; g < ng; g++)
        for (int i = 0; i < 2; i++) _mm512_storeu_ps(o + (size_t)g * d + 16 * i, res[g][i]);
}

/* The same for 64 columns (each weight broadcast once for them). */
static inline void kv8_values_64x3(const int8_t *const *rows, int64_t off, int n, const float *const *pr, int ng,
                                   int d, float *o) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int j = 0; j < n; j++) {
        const int8_t *v = rows[j] + off;
        const __m512 p0 = _mm512_set1_ps(pr[0][j]), p1 = _mm512_set1_ps(pr[1][j]), p2 = _mm512_set1_ps(pr[2][j]);
        __m512 x = kv8_f32x16(v);
        a00 = _mm512_fmadd_ps(p0, x, a00), a10 = _mm512_fmadd_ps(p1, x, a10), a20 = _mm512_fmadd_ps(p2, x, a20);
        x = kv8_f32x16(v + 16);
        a01 = _mm512_fmadd_ps(p0, x, a01), a11 = _mm512_fmadd_ps(p1, x, a11), a21 = _mm512_fmadd_ps(p2, x, a21);
        x = kv8_f32x16(v + 32);
        a02 = _mm512_fmadd_ps(p0, x, a02), a12 = _mm512_fmadd_ps(p1, x, a12), a22 = _mm512_fmadd_ps(p2, x, a22);
        x = kv8_f32x16(v + 48);
        a03 = _mm512_fmadd_ps(p0, x, a03), a13 = _mm512_fmadd_ps(p1, x, a13), a23 = _mm512_fmadd_ps(p2, x, a23);
    }
    const __m512 res[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    for (int g = 0; g < ng; g++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(o + (size_t)g * d + 16 * i, res[g][i]);
}
#else
/* As above, 8 lanes (c = l, l + 8, ...; hsum4x8). */
static inline void kv8_scores_4x3(const float *const *qg, const int8_t *const *kp, int d, __m128 out[3]) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int c = 0; c < d; c += 8) {
        const __m256 q0 = _mm256_loadu_ps(qg[0] + c), q1 = _mm256_loadu_ps(qg[1] + c);
        const __m256 q2 = _mm256_loadu_ps(qg[2] + c);
#define MH_KV8_KEY(i, x0, x1, x2)                                                                                  \
    {                                                                                                              \
        const __m256 k = kv8_f32x8(kp[i] + c);                                                                     \
        x0 = _mm256_fmadd_ps(q0, k, x0), x1 = _mm256_fmadd_ps(q1, k, x1), x2 = _mm256_fmadd_ps(q2, k, x2);         \
    }
        MH_KV8_KEY(0, a00, a10, a20) MH_KV8_KEY(1, a01, a11, a21) MH_KV8_KEY(2, a02, a12, a22)
        MH_KV8_KEY(3, a03, a13, a23)
#undef MH_KV8_KEY
    }
    out[0] = hsum4x8(a00, a01, a02, a03);
    out[1] = hsum4x8(a10, a11, a12, a13);
    out[2] = hsum4x8(a20, a21, a22, a23);
}

static inline void kv8_values_32x3(const int8_t *const *rows, int64_t off, int n, const float *const *pr, int ng,
                                   int d, float *o) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int j = 0; j < n; j++) {
        const int8_t *v = rows[j] + off;
        const __m256 p0 = _mm256_set1_ps(pr[0][j]), p1 = _mm256_set1_ps(pr[1][j]), p2 = _mm256_set1_ps(pr[2][j]);
        __m256 x = kv8_f32x8(v);
        a00 = _mm256_fmadd_ps(p0, x, a00), a10 = _mm256_fmadd_ps(p1, x, a10), a20 = _mm256_fmadd_ps(p2, x, a20);
        x = kv8_f32x8(v + 8);
        a01 = _mm256_fmadd_ps(p0, x, a01), a11 = _mm256_fmadd_ps(p1, x, a11), a21 = _mm256_fmadd_ps(p2, x, a21);
        x = kv8_f32x8(v + 16);
        a02 = _mm256_fmadd_ps(p0, x, a02), a12 = _mm256_fmadd_ps(p1, x, a12), a22 = _mm256_fmadd_ps(p2, x, a22);
        x = kv8_f32x8(v + 24);
        a03 = _mm256_fmadd_ps(p0, x, a03), a13 = _mm256_fmadd_ps(p1, x, a13), a23 = _mm256_fmadd_ps(p2, x, a23);
    }
    const __m256 res[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    for (int g = 0; g < ng; g++)
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + (size_t)g * d + 8 * i, res[g][i]);
}
#endif

#if defined(MH_ATT_ZMM) && defined(__AVX512VNNI__)
/* AVX-512 VNNI builds, head sizes that are multiples of 64: scores as integer dot products, as llama.cpp's CPU
 * attention does over a q8_0 cache. Each query row (scaled by 1 / sqrt(d)) rounded to int8 with its own scale
 * (amax / 127) once per task; per 64 elements of a key, one vpdpbusd per query head of k + 128 (unsigned) times the
 * query's int8, then 128 times the query's int8 sum taken off. Every sum is an integer below 2^24, so exact in
 * float32 in any order: the score is (the integer) x the query's scale x the key's scale. */
#define MH_KV8_VNNI 1
static inline int kv8_vnni(int d) { return d % 64 == 0; }

/* q [R, d] floats times `scale` -> q8 [R, d] int8 (to nearest, ties to even), qsc [R] their scales, q128 [R] 128 x
 * the sum of each row's int8. */
static inline void kv8_queries_i8(const float *q, int R, int d, float scale, int8_t *q8, float *qsc, float *q128) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (int r = 0; r < R; r++) {
        const float *x = q + (size_t)r * d;
        __m512 amax = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_mul_ps(_mm512_loadu_ps(x + c), sv)));
        const float top = _mm512_reduce_max_ps(amax), inv = top > 0.0f ? 127.0f / top : 0.0f;
        const __m512 iv = _mm512_set1_ps(inv);
        __m512i sum = _mm512_setzero_si512();
        for (int c = 0; c < d; c += 16) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + c), sv), iv));
            _mm_storeu_si128((__m128i *)(q8 + (size_t)r * d + c), _mm512_cvtepi32_epi8(v));
            sum = _mm512_add_epi32(sum, v);
        }
        qsc[r] = top / 127.0f, q128[r] = 128.0f * (float)_mm512_reduce_add_epi32(sum);
    }
}

/* Integer scores of 4 int8 key rows (kp[i]) x 3 int8 query rows (qg[g]), d % 64 == 0 -> out[g] (key i in element i):
 * sum over c of (k[c] + 128) q[c], exact. */
static inline void kv8_scores_vnni_4x3(const int8_t *const *qg, const int8_t *const *kp, int d, __m128 out[3]) {
    __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m512i a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int c = 0; c < d; c += 64) {
        const __m512i q0 = _mm512_loadu_si512((const void *)(qg[0] + c));
        const __m512i q1 = _mm512_loadu_si512((const void *)(qg[1] + c));
        const __m512i q2 = _mm512_loadu_si512((const void *)(qg[2] + c));
#define MH_KV8_KEY(i, x0, x1, x2)                                                                                  \
    {                                                                                                              \
        const __m512i k = _mm512_xor_si512(_mm512_loadu_si512((const void *)(kp[i] + c)), flip);                   \
        x0 = _mm512_dpbusd_epi32(x0, k, q0), x1 = _mm512_dpbusd_epi32(x1, k, q1), x2 = _mm512_dpbusd_epi32(x2, k, q2); \
    }
        MH_KV8_KEY(0, a00, a10, a20) MH_KV8_KEY(1, a01, a11, a21) MH_KV8_KEY(2, a02, a12, a22)
        MH_KV8_KEY(3, a03, a13, a23)
#undef MH_KV8_KEY
    }
#define MH_F(x) _mm512_cvtepi32_ps(x)
    out[0] = hsum16x4(MH_F(a00), MH_F(a01), MH_F(a02), MH_F(a03));
    out[1] = hsum16x4(MH_F(a10), MH_F(a11), MH_F(a12), MH_F(a13));
    out[2] = hsum16x4(MH_F(a20), MH_F(a21), MH_F(a22), MH_F(a23));
#undef MH_F
}
#endif

/* How many keys ahead the scores' loop fetches a key's rows and scale: about MH_ALLKV_LINES_AHEAD cache lines, as
 * attend_part_allkv (more lines asked for at once wait for the L1's miss buffers). */
static inline int kv8_keys_ahead(int row) { return (MH_ALLKV_LINES_AHEAD + row / 64) / (row / 64 + 1); }
#define MH_KV8_MAX_ROW 256    /* values of a key's row over the task's KV heads (att_allkv_fits: 2 d KV <= 512) */

/* One chunk [j0, j1] of token t's keys for KV heads [h0, h0 + nh) (nh d <= MH_KV8_MAX_ROW, d % 32 == 0, G <=
 * MH_GROUP_MAX; check_step and kv_cache_problem hold every model to these): q the queries of head h0's first query head on ([nh, G, d], unscaled); per KV head hh of the task:
 * o[hh] [G, d] unnormalized, mx[hh] and sm[hh] [G] (attend_part_avx2's outputs). sc: scratch [nh G, ldsc >= n]. */
static void attend_part_int8_x86(const mh_model *m, const mh_step *s, int layer, int t, int h0, int nh,
                                 const float *q, int j0, int j1, float *sc, int ldsc, float *const *o,
                                 float *const *mx, float *const *sm) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, n = j1 - j0 + 1, R = nh * G, row = nh * d;
    const int64_t vrow = m->kv_stride, vsc = m->kv_stride / d;
    float qs[MH_GROUP_MAX * MH_KV8_MAX_ROW], mxa[MH_GROUP_MAX * MH_KV8_MAX_ROW / 16];
    float sma[MH_GROUP_MAX * MH_KV8_MAX_ROW / 16];
    const float scale = 1.0f / sqrtf((float)d);
#if defined(MH_KV8_VNNI)
    int8_t q8[MH_GROUP_MAX * MH_KV8_MAX_ROW];
    float qsc[MH_GROUP_MAX * MH_KV8_MAX_ROW / 16], q128[MH_GROUP_MAX * MH_KV8_MAX_ROW / 16];
    const int vnni = kv8_vnni(d);
    if (vnni)
        kv8_queries_i8(q, R, d, scale, q8, qsc, q128);
    else
#endif
        for (int i = 0; i < R * d; i++) qs[i] = q[i] * scale;
    const int8_t *rows[n];
    const float *scs[n];
    kv8_rows(m, s, layer, s->seq_of[t], h0, j0, n, rows, scs); /* head h0's; head h0 + hh's hh d (hh scales) on */
    const int ahead = kv8_keys_ahead(row);
    for (int j = 0; j < n && j < ahead; j++) {
        for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(rows[j] + c), _MM_HINT_T0);
        _mm_prefetch((const char *)scs[j], _MM_HINT_T0);
    }
    for (int k0 = 0; k0 < n; k0 += 4) {
        const int nk = n - k0 < 4 ? n - k0 : 4;
        for (int i = 0; i < nk; i++) {
            const int ja = k0 + ahead + i, j = k0 + i;
            if (ja < n) {
                for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(rows[ja] + c), _MM_HINT_T0);
                _mm_prefetch((const char *)scs[ja], _MM_HINT_T0);
            }
            for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(rows[j] + vrow + c), _MM_HINT_T0);
            _mm_prefetch((const char *)(scs[j] + vsc), _MM_HINT_T0);
        }
        const int8_t *kp[4]; /* keys past the chunk repeat its last (their scores are not stored) */
        for (int i = 0; i < 4; i++) kp[i] = rows[k0 + (i < nk ? i : nk - 1)];
        for (int hh = 0; hh < nh; hh++) {
            const int8_t *kh[4] = {kp[0] + hh * d, kp[1] + hh * d, kp[2] + hh * d, kp[3] + hh * d};
            const __m128 kscale = _mm_setr_ps(scs[k0][hh], scs[k0 + (nk > 1)][hh], scs[k0 + (nk > 2 ? 2 : nk - 1)][hh],
                                              scs[k0 + (nk > 3 ? 3 : nk - 1)][hh]);
            for (int g0 = 0; g0 < G; g0 += 3) {
                const int ng = G - g0 < 3 ? G - g0 : 3;
                __m128 r4s[3];
#if defined(MH_KV8_VNNI)
                if (vnni) {
                    const int8_t *qg[3];
                    for (int g = 0; g < 3; g++) qg[g] = q8 + (size_t)(hh * G + g0 + (g < ng ? g : ng - 1)) * d;
                    kv8_scores_vnni_4x3(qg, kh, d, r4s);
                    for (int g = 0; g < ng; g++) {
                        const int r = hh * G + g0 + g;
                        const __m128 sq = _mm_mul_ps(_mm_set1_ps(qsc[r]), kscale);
                        store_scores4(sc + (size_t)r * ldsc, k0, ldsc, nk, _mm_mul_ps(_mm_sub_ps(r4s[g],
                                      _mm_set1_ps(q128[r])), sq));
                    }
                    continue;
                }
#endif
                const float *qg[3];
                rows3(qs + (size_t)hh * G * d, d, g0, ng, qg);
                kv8_scores_4x3(qg, kh, d, r4s);
                for (int g = 0; g < ng; g++)
                    store_scores4(sc + (size_t)(hh * G + g0 + g) * ldsc, k0, ldsc, nk, _mm_mul_ps(r4s[g], kscale));
            }
        }
    }
    softmax_rows(sc, ldsc, R, n, mxa, sma);
    for (int hh = 0; hh < nh; hh++) {
        float vs[n]; /* the value rows' scales */
        for (int j = 0; j < n; j++) vs[j] = scs[j][vsc + hh];
        for (int g = 0; g < G; g++) {
            float *w = sc + (size_t)(hh * G + g) * ldsc;
            mx[hh][g] = mxa[hh * G + g], sm[hh][g] = sma[hh * G + g];
            for (int j = 0; j < n; j++) w[j] *= vs[j]; /* each weight times its value row's scale */
        }
        for (int g0 = 0; g0 < G; g0 += 3) {
            const int ng = G - g0 < 3 ? G - g0 : 3;
            const float *pr[3];
            rows3(sc + (size_t)hh * G * ldsc, ldsc, g0, ng, pr);
            int c0 = 0;
#if defined(MH_ATT_ZMM)
            for (; d - c0 >= 64; c0 += 64) kv8_values_64x3(rows, vrow + hh * d + c0, n, pr, ng, d, o[hh] + (size_t)g0 * d + c0);
#endif
            for (; c0 < d; c0 += 32) kv8_values_32x3(rows, vrow + hh * d + c0, n, pr, ng, d, o[hh] + (size_t)g0 * d + c0);
        }
    }
}

#endif
