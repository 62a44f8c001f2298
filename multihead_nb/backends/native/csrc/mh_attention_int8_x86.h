/* Attention over an int8 K/V cache (mh_attention_int8.h's rows, a scale per 32 values) in the x86 builds without
 * AVX-512 BF16 (those: mh_attention_int8_bf16.h), in AVX2 + FMA, 16 lanes wide in AVX-512 builds: one chunk of a lone
 * token's keys for KV heads [h0, h0 + nh), all of them in one task where a key's row for every KV head is a few cache
 * lines (att_allkv_fits), else one. Scores: 4 keys x 3 query heads at a time, each key's int8 turned to float32 in
 * registers once for the 3 heads (times its 32 values' scale), summed over the lanes (hsum4x8 / hsum16x4). Values: 32
 * or 64 columns x 3 heads of multiply-adds in registers, each value row's int8 turned to float32 times its scale once
 * for the 3 heads. Outputs as attend_part_avx2's (merged by attn_merge).
 * In AVX2 builds these 8-lane sums are the bfloat16 attention's operations in its order, on rows turned into float32
 * instead of widened, so their prompt blocks run the bfloat16 cache's tiles on such rows (kv8_f32_rows, block_chunk);
 * the AVX-512 ones sum 16 lanes in an order of their own and keep attend_block_int8 (MH_KV8_OWN_BLOCKS). Turning the
 * rows into bfloat16 for the bfloat16 attention, as the AVX-512 BF16 builds do, cost the AVX2 build more than it saved
 * (without vcvtne2ps2bf16 rounding and packing take 7 instructions per 8 values on top of the widening's 3; decode at
 * batch 3 8% slower; bench/README.md).
 * Included by mh_attention_avx2.h (the helpers of mh_attention_x86_ops.h: softmax_rows, hsum4x8, store_scores4,
 * rows3); knows nothing of the threads' split. */
#ifndef MH_ATTENTION_INT8_X86_H
#define MH_ATTENTION_INT8_X86_H
/* Whether the int8 cache's prompt blocks run attend_block_int8 (AVX-512 builds without BF16: their lone tokens' int8
 * scores sum 16 lanes in an order of their own, which the bfloat16 blocks' tiles do not share), or the bfloat16
 * blocks' own tiles (block_chunk) on the rows turned into float32 (AVX2 builds: kv8_f32_rows; their lone tokens' 8-lane
 * order is the tiles') or into bfloat16 (AVX-512 BF16 builds: mh_attention_int8_bf16.h). */
#if defined(MH_ATT_ZMM) && !defined(MH_ATT_BF16)
#define MH_KV8_OWN_BLOCKS 1
#else
#define MH_KV8_OWN_BLOCKS 0
#endif

typedef struct { /* a chunk's int8 rows of one KV head and their scales (kv8_rows), for block_chunk */
    const int8_t *const *rows;
    const float *const *scs;
} mh_kv8_chunk;
#if !defined(MH_ATT_BF16)

static inline __m256 kv8_f32x8(const int8_t *p, __m256 s) { /* 8 int8 -> float32, times s */
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))), s);
}

#if defined(MH_ATT_ZMM)
static inline __m512 kv8_f32x16(const int8_t *p, __m512 s) { /* 16 int8 -> float32, times s */
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))), s);
}

/* Scores of 4 int8 key rows (kp[i], scales ks[i], d % 32 == 0) x 3 query rows (qg[g], floats) -> out[g] (key i in
 * element i): lane l sums q[c] k[c] s over c = l, l + 16, ... by multiply-adds in that order, then hsum16x4. kf: NULL,
 * or the same keys already turned to float32 (kv8_rows_f32: the same values), read instead. */
static inline void kv8_scores_4x3(const float *const *qg, const int8_t *const *kp, const float *const *ks,
                                  const float *const *kf, int d, __m128 out[3]) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int c = 0; c < d; c += 16) {
        const __m512 q0 = _mm512_loadu_ps(qg[0] + c), q1 = _mm512_loadu_ps(qg[1] + c);
        const __m512 q2 = _mm512_loadu_ps(qg[2] + c);
#define MH_KV8_KEY(i, x0, x1, x2)                                                                                  \
    {                                                                                                              \
        const __m512 k = kf ? _mm512_loadu_ps(kf[i] + c) : kv8_f32x16(kp[i] + c, _mm512_set1_ps(ks[i][c / 32])); \
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

/* 64 value columns (two scales) of n int8 rows (rows[j] + off, scales vs[j] + soff) weighted by 3 heads' pr[g][j],
 * summed in key order -> o rows g < ng (d apart). vf: NULL, or the same values already turned to float32 (vf[j] +
 * foff), read instead. */
static inline void kv8_values_64x3(const int8_t *const *rows, int64_t off, const float *const *vs, int64_t soff,
                                   const float *const *vf, int64_t foff, int n, const float *const *pr, int ng, int d,
                                   float *o) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int j = 0; j < n; j++) {
        const __m512 p0 = _mm512_set1_ps(pr[0][j]), p1 = _mm512_set1_ps(pr[1][j]), p2 = _mm512_set1_ps(pr[2][j]);
        __m512 x0, x1, x2, x3;
        if (vf) {
            const float *f = vf[j] + foff;
            x0 = _mm512_loadu_ps(f), x1 = _mm512_loadu_ps(f + 16), x2 = _mm512_loadu_ps(f + 32);
            x3 = _mm512_loadu_ps(f + 48);
        } else {
            const int8_t *v = rows[j] + off;
            const __m512 s0 = _mm512_set1_ps(vs[j][soff]), s1 = _mm512_set1_ps(vs[j][soff + 1]);
            x0 = kv8_f32x16(v, s0), x1 = kv8_f32x16(v + 16, s0), x2 = kv8_f32x16(v + 32, s1);
            x3 = kv8_f32x16(v + 48, s1);
        }
        a00 = _mm512_fmadd_ps(p0, x0, a00), a10 = _mm512_fmadd_ps(p1, x0, a10), a20 = _mm512_fmadd_ps(p2, x0, a20);
        a01 = _mm512_fmadd_ps(p0, x1, a01), a11 = _mm512_fmadd_ps(p1, x1, a11), a21 = _mm512_fmadd_ps(p2, x1, a21);
        a02 = _mm512_fmadd_ps(p0, x2, a02), a12 = _mm512_fmadd_ps(p1, x2, a12), a22 = _mm512_fmadd_ps(p2, x2, a22);
        a03 = _mm512_fmadd_ps(p0, x3, a03), a13 = _mm512_fmadd_ps(p1, x3, a13), a23 = _mm512_fmadd_ps(p2, x3, a23);
    }
    const __m512 res[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    for (int g = 0; g < ng; g++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(o + (size_t)g * d + 16 * i, res[g][i]);
}
#else
/* As above, 8 lanes (c = l, l + 8, ...; hsum4x8). kf: always NULL here (only the 16-lane builds turn a block's rows
 * into float32 first: MH_KV8_OWN_BLOCKS). */
static inline void kv8_scores_4x3(const float *const *qg, const int8_t *const *kp, const float *const *ks,
                                  const float *const *kf, int d, __m128 out[3]) {
    (void)kf;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int c = 0; c < d; c += 8) {
        const __m256 q0 = _mm256_loadu_ps(qg[0] + c), q1 = _mm256_loadu_ps(qg[1] + c);
        const __m256 q2 = _mm256_loadu_ps(qg[2] + c);
#define MH_KV8_KEY(i, x0, x1, x2)                                                                                  \
    {                                                                                                              \
        const __m256 k = kv8_f32x8(kp[i] + c, _mm256_set1_ps(ks[i][c / 32]));                                     \
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
#endif

/* 32 value columns (one scale) of n int8 rows (rows[j] + off, scales vs[j][soff]) weighted by 3 heads' pr[g][j],
 * summed in key order -> o rows g < ng (d apart); vf as kv8_values_64x3's. */
static inline void kv8_values_32x3(const int8_t *const *rows, int64_t off, const float *const *vs, int64_t soff,
                                   const float *const *vf, int64_t foff, int n, const float *const *pr, int ng, int d,
                                   float *o) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int j = 0; j < n; j++) {
        const __m256 p0 = _mm256_set1_ps(pr[0][j]), p1 = _mm256_set1_ps(pr[1][j]), p2 = _mm256_set1_ps(pr[2][j]);
        __m256 x0, x1, x2, x3;
        if (vf) {
            const float *f = vf[j] + foff;
            x0 = _mm256_loadu_ps(f), x1 = _mm256_loadu_ps(f + 8), x2 = _mm256_loadu_ps(f + 16);
            x3 = _mm256_loadu_ps(f + 24);
        } else {
            const int8_t *v = rows[j] + off;
            const __m256 s = _mm256_set1_ps(vs[j][soff]);
            x0 = kv8_f32x8(v, s), x1 = kv8_f32x8(v + 8, s), x2 = kv8_f32x8(v + 16, s), x3 = kv8_f32x8(v + 24, s);
        }
        a00 = _mm256_fmadd_ps(p0, x0, a00), a10 = _mm256_fmadd_ps(p1, x0, a10), a20 = _mm256_fmadd_ps(p2, x0, a20);
        a01 = _mm256_fmadd_ps(p0, x1, a01), a11 = _mm256_fmadd_ps(p1, x1, a11), a21 = _mm256_fmadd_ps(p2, x1, a21);
        a02 = _mm256_fmadd_ps(p0, x2, a02), a12 = _mm256_fmadd_ps(p1, x2, a12), a22 = _mm256_fmadd_ps(p2, x2, a22);
        a03 = _mm256_fmadd_ps(p0, x3, a03), a13 = _mm256_fmadd_ps(p1, x3, a13), a23 = _mm256_fmadd_ps(p2, x3, a23);
    }
    const __m256 res[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    for (int g = 0; g < ng; g++)
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + (size_t)g * d + 8 * i, res[g][i]);
}

/* How many keys ahead the scores' loop fetches a key's rows and scales: about MH_ALLKV_LINES_AHEAD cache lines, as
 * attend_part_allkv (more lines asked for at once wait for the L1's miss buffers). */
static inline int kv8_keys_ahead(int row) { return (MH_ALLKV_LINES_AHEAD + row / 64) / (row / 64 + 1); }

#define MH_KV8_MAX_ROW 256 /* values of a key's row over the task's KV heads (att_allkv_fits: 2 d KV <= 512) */

#if MH_KV8_OWN_BLOCKS /* attend_block_int8's */
/* n key rows (rows[j], scales scs[j], `row` values) and their value rows (m->kv_stride further) -> kf [n, row] and
 * vf [n, row] float32: each int8 times its scale, the values kv8_scores_4x3 and the value sums form in registers. */
static void kv8_rows_f32(const mh_model *m, const int8_t *const *rows, const float *const *scs, int n, int row,
                         float *kf, float *vf) {
    const int64_t vrow = m->kv_stride, vsc = m->kv_stride / 32;
    for (int j = 0; j < n; j++)
        for (int c = 0; c < row; c += 8) {
            const __m256 sk = _mm256_set1_ps(scs[j][c / 32]), sv = _mm256_set1_ps(scs[j][vsc + c / 32]);
            _mm256_storeu_ps(kf + (size_t)j * row + c, kv8_f32x8(rows[j] + c, sk));
            _mm256_storeu_ps(vf + (size_t)j * row + c, kv8_f32x8(rows[j] + vrow + c, sv));
        }
}
#endif

/* A chunk's n key rows (r->rows[j], r->scs[j]: one KV head's; values = 1: their value rows, m->kv_stride bytes
 * further) -> f [n, d] float32, each int8 times its scale: the values kv8_scores_4x3 and kv8_values_32x3 form in
 * registers, so the prompt blocks' tiles on them give a lone token's bits (AVX2 builds). */
static void kv8_f32_rows(const mh_model *m, const mh_kv8_chunk *r, int n, int values, float *f) {
    const int d = m->head_dim;
    const int64_t off = values ? m->kv_stride : 0, soff = values ? m->kv_stride / 32 : 0;
    for (int j = 0; j < n; j++, f += d) {
        if (j + 8 < n) {
            for (int c = 0; c < d; c += 64) _mm_prefetch((const char *)(r->rows[j + 8] + off + c), _MM_HINT_T0);
            _mm_prefetch((const char *)(r->scs[j + 8] + soff), _MM_HINT_T0);
        }
        for (int c = 0; c < d; c += 8)
            _mm256_storeu_ps(f + c, kv8_f32x8(r->rows[j] + off + c, _mm256_set1_ps(r->scs[j][soff + c / 32])));
    }
}

/* Token's chunk of n keys for nh KV heads (rows[j] / scs[j]: KV head 0's of the task; q: [nh, G, d] unscaled): the
 * outputs of attend_part_int8_x86. kf, vf: NULL (the int8 read and widened here, the rows fetched ahead), or the
 * chunk's rows as float32 (kv8_rows_f32, [n, nh d] each): the same operations on the same values, so the same bits. */
static void kv8_token_chunk(const mh_model *m, int nh, const float *q, int n, const int8_t *const *rows,
                            const float *const *scs, const float *kf, const float *vf, float *sc, int ldsc,
                            float *const *o, float *const *mx, float *const *sm) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, R = nh * G, row = nh * d;
    const int64_t vrow = m->kv_stride, vsc = m->kv_stride / 32;
    float qs[MH_GROUP_MAX * MH_KV8_MAX_ROW], mxa[MH_GROUP_MAX * MH_KV8_MAX_ROW / 32];
    float sma[MH_GROUP_MAX * MH_KV8_MAX_ROW / 32];
    const float scale = 1.0f / sqrtf((float)d);
    for (int i = 0; i < R * d; i++) qs[i] = q[i] * scale;
    const int ahead = kf ? 0 : kv8_keys_ahead(row);
    for (int j = 0; j < n && j < ahead; j++) {
        for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(rows[j] + c), _MM_HINT_T0);
        _mm_prefetch((const char *)scs[j], _MM_HINT_T0);
    }
    for (int k0 = 0; k0 < n; k0 += 4) {
        const int nk = n - k0 < 4 ? n - k0 : 4;
        for (int i = 0; i < nk && !kf; i++) {
            const int ja = k0 + ahead + i, j = k0 + i;
            if (ja < n) {
                for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(rows[ja] + c), _MM_HINT_T0);
                _mm_prefetch((const char *)scs[ja], _MM_HINT_T0);
            }
            for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(rows[j] + vrow + c), _MM_HINT_T0);
            _mm_prefetch((const char *)(scs[j] + vsc), _MM_HINT_T0);
        }
        int ki[4]; /* keys past the chunk repeat its last (their scores are not stored) */
        for (int i = 0; i < 4; i++) ki[i] = k0 + (i < nk ? i : nk - 1);
        for (int hh = 0; hh < nh; hh++) {
            const int8_t *kh[4];
            const float *ks[4], *kfh[4];
            for (int i = 0; i < 4; i++) {
                kh[i] = rows[ki[i]] + hh * d, ks[i] = scs[ki[i]] + hh * d / 32;
                kfh[i] = kf ? kf + (size_t)ki[i] * row + hh * d : NULL;
            }
            for (int g0 = 0; g0 < G; g0 += 3) {
                const int ng = G - g0 < 3 ? G - g0 : 3;
                const float *qg[3];
                rows3(qs + (size_t)hh * G * d, d, g0, ng, qg);
                __m128 r4s[3];
                kv8_scores_4x3(qg, kh, ks, kf ? kfh : NULL, d, r4s);
                for (int g = 0; g < ng; g++) store_scores4(sc + (size_t)(hh * G + g0 + g) * ldsc, k0, ldsc, nk, r4s[g]);
            }
        }
    }
    softmax_rows(sc, ldsc, R, n, mxa, sma);
    const float *vrows[vf ? n : 1];
    for (int j = 0; vf && j < n; j++) vrows[j] = vf + (size_t)j * row;
    for (int hh = 0; hh < nh; hh++) {
        for (int g = 0; g < G; g++) mx[hh][g] = mxa[hh * G + g], sm[hh][g] = sma[hh * G + g];
        for (int g0 = 0; g0 < G; g0 += 3) {
            const int ng = G - g0 < 3 ? G - g0 : 3;
            const float *pr[3];
            rows3(sc + (size_t)hh * G * ldsc, ldsc, g0, ng, pr);
            int c0 = 0;
            float *og = o[hh] + (size_t)g0 * d;
#if defined(MH_ATT_ZMM)
            for (; d - c0 >= 64; c0 += 64)
                kv8_values_64x3(rows, vrow + hh * d + c0, scs, vsc + (hh * d + c0) / 32, vf ? vrows : NULL,
                                hh * d + c0, n, pr, ng, d, og + c0);
#endif
            for (; c0 < d; c0 += 32)
                kv8_values_32x3(rows, vrow + hh * d + c0, scs, vsc + (hh * d + c0) / 32, vf ? vrows : NULL,
                                hh * d + c0, n, pr, ng, d, og + c0);
        }
    }
}

/* One chunk [j0, j1] of token t's keys for KV heads [h0, h0 + nh) (nh d <= MH_KV8_MAX_ROW, d % 32 == 0, G <=
 * MH_GROUP_MAX; check_step and kv_cache_problem hold every model to these): q the queries of head h0's first query
 * head on ([nh, G, d], unscaled); per KV head hh of the task: o[hh] [G, d] unnormalized, mx[hh] and sm[hh] [G]
 * (attend_part_avx2's outputs). sc: scratch [nh G, ldsc >= n]. */
static void attend_part_int8_x86(const mh_model *m, const mh_step *s, int layer, int t, int h0, int nh,
                                 const float *q, int j0, int j1, float *sc, int ldsc, float *const *o,
                                 float *const *mx, float *const *sm) {
    const int n = j1 - j0 + 1;
    const int8_t *rows[n];
    const float *scs[n];
    kv8_rows(m, s, layer, s->seq_of[t], h0, j0, n, rows, scs); /* head h0's; head h0 + hh's hh d (hh d / 32) on */
    kv8_token_chunk(m, nh, q, n, rows, scs, NULL, NULL, sc, ldsc, o, mx, sm);
}

#endif
#endif
