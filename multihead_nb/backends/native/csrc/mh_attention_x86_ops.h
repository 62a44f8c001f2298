/* The per-key operations of the x86 attention (every x86 build, AVX-512 ones too), in the one order that a token's
 * chunks, the all-KV-head tasks and the prompt blocks share, so a token's attention is the same bits on every path:
 * where a chunk's key rows lie in the pages (key_rows), widening bfloat16, exp, the softmax of score rows, the scores
 * of 4 keys x 3 query heads and the value sums of 32 or 64 columns x 3 heads, each choosing among the 8-lane loops
 * here, the 16-lane ones and the vdpbf16ps ones (mh_attention_zmm.h, included here). Included by
 * mh_attention_avx2.h; knows nothing of tasks, chunks' merges or the threads' split. */
#ifndef MH_ATTENTION_X86_OPS_H
#define MH_ATTENTION_X86_OPS_H
#if defined(MH_ISA_X86)
static inline float hsum8a(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void prefetch_row(const void *p, int bytes) { /* every cache line of a K or V row into L1 */
    for (int c = 0; c < bytes; c += 64) _mm_prefetch((const char *)p + c, _MM_HINT_T0);
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

/* How many keys ahead the value sums (values_32x3; values_64x3 and values_bf16_64x3 in AVX-512 builds) fetch the cache
 * lines of a value row they will read. The rows were fetched while their keys' scores were formed, but a chunk's 64
 * keys and values (48 KiB for SmolLM2-135M) outgrow the L1, and a profile of batch-3 steps after ~1500-token contexts
 * on a Zen 2 put a fifth of the attention's samples on the value rows' loads. With this (builds alternated in one
 * process, Q4_0, 8 rounds of 24 steps after 1024-token contexts): batch 3 11.39 -> 11.16 ms (faster in every round),
 * batch 1 6.48 -> 6.29; after 160 tokens the same. On a Zen 4 (AVX-512 BF16 build, the same runs): batch 3 10.09 ->
 * 9.79, batch 1 5.93 -> 5.51; after 160 tokens no change; its 16-lane build 10.60 -> 10.40 (bench/README.md). */
#define MH_VALUES_AHEAD 8

#include "mh_attention_zmm.h"

/* Keys per attention task: a token's context of n keys is cut in chunks of this many (64: a lone decode token's
 * attention spreads over the threads; at most 64 chunks); it depends on the token's own context only, so a
 * token's result never depends on its batch-mates. */
static inline int att_chunk(int n) { return n <= 64 * 64 ? 64 : (n + 63) / 64; }

/* 4 accumulators (one key each) -> their 4 sums. */
static inline __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* The rows of keys [j0, j0 + n) of sequence seq, KV head kvh, layer `layer`: kp[j - j0], page by page (no division
 * per key). A key's value row is kv_stride further. */
static void key_rows(const mh_model *m, const mh_step *s, int layer, int seq, int kvh, int j0, int n,
                     const uint16_t **kp) {
    const int tpp = m->tokens_per_page, KVd = m->kv_heads * m->head_dim, j1 = j0 + n - 1;
    const uint16_t *keys = m->cache + (int64_t)layer * m->layer_stride + (int64_t)kvh * m->head_dim;
    const int32_t *table = s->block_tables + (size_t)seq * s->max_pages;
    for (int j = j0; j <= j1;) {
        const int pi = j / tpp, end = (pi + 1) * tpp - 1 < j1 ? (pi + 1) * tpp - 1 : j1;
        const uint16_t *base = keys + (int64_t)table[pi] * m->page_stride + (int64_t)(j - pi * tpp) * KVd;
        for (; j <= end; j++, base += KVd) kp[j - j0] = base;
    }
}

/* n rows (kp[j] + off) of d bfloat16 -> float32 f [n, d] (exact). The pages are scattered in the arena and the
 * weights streamed since this layer's K/V were written have pushed them out of cache: each row is fetched 8 rows
 * ahead, and the row `ahead` elements further (the value row, while its key is widened) too, when ahead != 0 (the
 * hardware prefetchers do not follow a block table). */
static void widen_rows(const uint16_t *const *kp, int64_t off, int n, int d, int64_t ahead, float *f) {
    const int row_bytes = 2 * d;
    for (int j = 0; j < n && j < 8; j++)
        prefetch_row(kp[j] + off, row_bytes);
    for (int j = 0; j < n; j++, f += d) {
        const uint16_t *r = kp[j] + off;
        for (int c = 0; c < row_bytes; c += 64) {
            if (j + 8 < n) _mm_prefetch((const char *)(kp[j + 8] + off) + c, _MM_HINT_T0);
            if (ahead) _mm_prefetch((const char *)(r + ahead) + c, _MM_HINT_T0);
        }
        for (int c = 0; c < d; c += 8) _mm256_storeu_ps(f + c, widen8(r + c));
    }
}

/* Each of the G rows of n scores (sc [G, ldsc]) -> exp(score - its max) in place; the max mx [G] and the sum of the
 * exps sm [G]. */
static void softmax_rows(float *sc, int ldsc, int G, int n, float *mx, float *sm) {
    for (int g = 0; g < G; g++) {
        float *row = sc + (size_t)g * ldsc, best = -INFINITY;
        int j = 0;
        if (n >= 8) { /* the maximum, 8 lanes then across them (exact in any order) */
            __m256 m8 = _mm256_loadu_ps(row);
            for (j = 8; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(row + j));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            best = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        }
        for (; j < n; j++) best = row[j] > best ? row[j] : best;
        const __m256 mv = _mm256_set1_ps(best);
        __m256 acc = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
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
}

/* 32 columns of n value rows (kp[j] + off) weighted by 3 heads' pr[g][j], summed in key order -> o rows g < ng (d
 * apart), each row's line fetched MH_VALUES_AHEAD keys ahead. Named accumulators: kept in an array, GCC stored all
 * twelve to the stack on every key. */
static inline void values_32x3(const uint16_t *const *kp, int64_t off, int n, const float *const *pr, int ng, int d,
                               float *o) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int j = 0; j < n; j++) {
        const uint16_t *v = kp[j] + off;
        if (j + MH_VALUES_AHEAD < n) _mm_prefetch((const char *)(kp[j + MH_VALUES_AHEAD] + off), _MM_HINT_T0);
        const __m256 p0 = _mm256_broadcast_ss(pr[0] + j), p1 = _mm256_broadcast_ss(pr[1] + j);
        const __m256 p2 = _mm256_broadcast_ss(pr[2] + j);
        __m256 x = widen8(v);
        a00 = _mm256_fmadd_ps(p0, x, a00), a10 = _mm256_fmadd_ps(p1, x, a10), a20 = _mm256_fmadd_ps(p2, x, a20);
        x = widen8(v + 8);
        a01 = _mm256_fmadd_ps(p0, x, a01), a11 = _mm256_fmadd_ps(p1, x, a11), a21 = _mm256_fmadd_ps(p2, x, a21);
        x = widen8(v + 16);
        a02 = _mm256_fmadd_ps(p0, x, a02), a12 = _mm256_fmadd_ps(p1, x, a12), a22 = _mm256_fmadd_ps(p2, x, a22);
        x = widen8(v + 24);
        a03 = _mm256_fmadd_ps(p0, x, a03), a13 = _mm256_fmadd_ps(p1, x, a13), a23 = _mm256_fmadd_ps(p2, x, a23);
    }
    const __m256 res[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    for (int g = 0; g < ng; g++)
        for (int c = 0; c < 4; c++) _mm256_storeu_ps(o + (size_t)g * d + 8 * c, res[g][c]);
}

/* The last nc (< 4) groups of 8 columns of n value rows (kp[j] + off) weighted by 3 heads' pr[g][j], summed in key
 * order -> o rows g < ng (d apart): values_32x3's operations for fewer columns. */
static inline void values_tail_x3(const uint16_t *const *kp, int64_t off, int n, const float *const *pr, int ng, int d,
                                  int nc, float *o) {
    __m256 acc[3][3];
    for (int g = 0; g < 3; g++)
        for (int c = 0; c < 3; c++) acc[g][c] = _mm256_setzero_ps();
    for (int j = 0; j < n; j++) {
        const uint16_t *v = kp[j] + off;
        for (int c = 0; c < nc; c++) {
            const __m256 vv = widen8(v + 8 * c);
            for (int g = 0; g < 3; g++) acc[g][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(pr[g] + j), vv, acc[g][c]);
        }
    }
    for (int g = 0; g < ng; g++)
        for (int c = 0; c < nc; c++) _mm256_storeu_ps(o + (size_t)g * d + 8 * c, acc[g][c]);
}

/* Value columns c0 .. d - 1 of n rows (kp[j] + off) weighted by 3 heads' pr[g][j] -> o rows g < ng (d apart;
 * o at column c0): 32 columns at a time (values_32x3), the last ones by values_tail_x3. */
static inline void values_from_x3(const uint16_t *const *kp, int64_t off, int n, const float *const *pr, int ng, int d,
                                  int c0, float *o) {
    for (; d - c0 >= 32; c0 += 32, o += 32) values_32x3(kp, off + c0, n, pr, ng, d, o);
    if (c0 < d) values_tail_x3(kp, off + c0, n, pr, ng, d, (d - c0) / 8, o);
}

/* The 3 rows a 3-head step reads: rows first .. first + ng - 1 of base (stride floats apart), the last repeated past
 * ng (its results are not stored). */
static inline void rows3(const float *base, size_t stride, int first, int ng, const float **r) {
    for (int g = 0; g < 3; g++) r[g] = base + (size_t)(first + (g < ng ? g : ng - 1)) * stride;
}

/* Scores of 4 keys (kp[i], d bfloat16 each) x 3 query rows (qg[g], d floats each) -> the 8 lane partials of each,
 * acc[g][i]: lane l sums q[c] k[c] over c = l, l + 8, ... by multiply-adds in that order. */
#if !defined(MH_ATT_ZMM)
static inline void scores_4x3(const float *const *qg, const uint16_t *const *kp, int d, __m256 acc[3][4]) {
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
}
#endif

/* Scores k0 .. k0 + nk - 1 of a row (ldsc floats) from r4: 4 in one store where the row has room (past n: unread). */
static inline void store_scores4(float *row, int k0, int ldsc, int nk, __m128 r4) {
    if (k0 + 4 <= ldsc) {
        _mm_storeu_ps(row + k0, r4);
        return;
    }
    float r[4];
    _mm_storeu_ps(r, r4);
    for (int i = 0; i < nk; i++) row[k0 + i] = r[i];
}

/* A 3-head step's queries (qg: the scaled rows) in the form this build's scores read, prepared once per task into
 * qf (3 d floats of room): bfloat16 [3, d] where MH_ATT_BF16 and att_bf16(d); scores16_4x3's lane order [3, d] in
 * other AVX-512 builds where d % 32 == 0; else the rows as they are, side by side. */
static inline void queries_x3(const float *const *qg, int d, float *qf) {
#if defined(MH_ATT_BF16)
    if (att_bf16(d)) {
        rows_bf16(qg, d, (uint16_t *)qf);
        return;
    }
#endif
#if defined(MH_ATT_ZMM)
    if (d % 32 == 0) {
        for (int g = 0; g < 3; g++) lanes16_q(qg[g], d, qf + (size_t)g * d);
        return;
    }
#endif
    for (int g = 0; g < 3; g++) memcpy(qf + (size_t)g * d, qg[g], sizeof(float) * d);
}

/* Floats of room for one KV head's G query heads as queries_kvh prepares them: ceil(G / 3) groups of 3 rows of d. */
static inline int queries_kvh_floats(int G, int d) { return (G + 2) / 3 * 3 * d; }

/* One KV head's G query rows q [G, d], scaled by 1 / sqrt(d), prepared 3 heads at a time (queries_x3; heads past G
 * repeat the last) into qf [queries_kvh_floats(G, d)]: group g0 / 3 at qf + g0 d. */
static inline void queries_kvh(const float *q, int G, int d, float *qf) {
    const float scale = 1.0f / sqrtf((float)d);
    float qs[MH_GROUP_MAX * MH_GROUP_DIM];
    for (int i = 0; i < G * d; i++) qs[i] = q[i] * scale;
    for (int g0 = 0; g0 < G; g0 += 3) {
        const float *qg[3];
        rows3(qs, d, g0, G - g0 < 3 ? G - g0 : 3, qg);
        queries_x3(qg, d, qf + (size_t)g0 * d);
    }
}

/* Scores of 4 keys (kp[i], d bfloat16 each) x the 3 heads of qf (queries_x3) -> r4s[g] (key i in element i), g < ng:
 * vdpbf16ps pairs, 16-lane sums or 8-lane sums as queries_x3 prepared them. */
static inline void scores_x3(const float *qf, const uint16_t *const *kp, int d, int ng, __m128 r4s[3]) {
#if defined(MH_ATT_BF16)
    if (att_bf16(d)) {
        scores_bf16_4x3((const uint16_t *)qf, kp, d, r4s);
        return;
    }
#endif
    const float *qg[3] = {qf, qf + d, qf + 2 * d};
#if defined(MH_ATT_ZMM)
    if (d % 32 == 0) {
        scores16_4x3(qg, kp, d, r4s);
        return;
    }
#endif
    __m256 acc[3][4];
    scores_4x3(qg, kp, d, acc);
    for (int g = 0; g < ng; g++) r4s[g] = hsum4x8(acc[g][0], acc[g][1], acc[g][2], acc[g][3]);
}

/* The softmax's weights (rows of n floats, ldsc apart) in the form values_x3 reads: bfloat16 in place where
 * MH_ATT_BF16 and att_bf16(d) (each row's at its start, a 0 after an odd n; ldsc >= 64: room for the pad). */
static inline void weights_for_values(float *sc, int ldsc, int rows, int n, int d) {
#if defined(MH_ATT_BF16)
    if (att_bf16(d))
        for (int r = 0; r < rows; r++) row_bf16_inplace(sc + (size_t)r * ldsc, n);
#else
    (void)sc, (void)ldsc, (void)rows, (void)n, (void)d;
#endif
}

/* All d columns of n value rows (kp[j] + off) weighted by 3 heads' pr[g][j] (weights_for_values) -> o rows g < ng
 * (d apart): by vdpbf16ps pairs (values_bf16_64x3), 64 columns at a time in AVX-512 builds (values_64x3), else and
 * for the columns left 32 at a time (values_from_x3). */
static inline void values_x3(const uint16_t *const *kp, int64_t off, int n, const float *const *pr, int ng, int d,
                             float *o) {
#if defined(MH_ATT_BF16)
    if (att_bf16(d)) {
        const uint16_t *pb[3] = {(const uint16_t *)pr[0], (const uint16_t *)pr[1], (const uint16_t *)pr[2]};
        for (int c0 = 0; c0 < d; c0 += 64) values_bf16_64x3(kp, off + c0, n, pb, ng, d, o + c0);
        return;
    }
#endif
    int c0 = 0;
#if defined(MH_ATT_ZMM)
    for (; d - c0 >= 64; c0 += 64) values_64x3(kp, off + c0, n, pr, ng, d, o + c0);
#endif
    values_from_x3(kp, off, n, pr, ng, d, c0, o + c0);
}
#endif
#endif
