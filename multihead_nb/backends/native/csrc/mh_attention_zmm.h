/* The lone-token attention's inner loops 512 bits wide, for AVX-512 builds: mh_attention_x86_ops.h includes it, and
 * where MH_ATT_ZMM is defined takes values_64x3 for each 64 value columns (each output's multiply-adds as the 8-lane
 * loops do them: the same bits as there) and, for head sizes that are multiples of 32, scores16_4x3 (below): each
 * score summed over 16 lanes, an order of this build's own, which the prompt blocks (mh_attention_block.h,
 * block_scores_3x4) follow, so a token's attention is the same bits alone and in a block. For other head sizes
 * scores_4x3 here does the 8-lane loops' multiply-adds two keys per vector (the AVX2 build's bits). With AVX-512
 * BF16 and head sizes that are multiples of 64 (MH_ATT_BF16, at the end), scores and values are vdpbf16ps pairs
 * instead, queries and weights rounded to bfloat16. Knows nothing of chunks, pages or threads. */
#ifndef MH_ATTENTION_ZMM_H
#define MH_ATTENTION_ZMM_H
#if defined(MH_ISA_X86) && defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
#define MH_ATT_ZMM 1
/* 8 bfloat16 of row a and 8 of row b -> 16 float32, a's in the low half (exact). */
static inline __m512 widen8x2(const uint16_t *a, const uint16_t *b) {
    const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                               _mm_loadu_si128((const __m128i *)b), 1);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ab), 16));
}

/* scores_4x3 with two keys' 8 lanes per vector (keys 0 and 2 in the low halves). */
static inline void scores_4x3(const float *const *qg, const uint16_t *const *kp, int d, __m256 acc[3][4]) {
    __m512 z00 = _mm512_setzero_ps(), z01 = z00, z10 = z00, z11 = z00, z20 = z00, z21 = z00;
    for (int c = 0; c < d; c += 8) {
        const __m512 q0 = _mm512_broadcast_f32x8(_mm256_loadu_ps(qg[0] + c));
        const __m512 q1 = _mm512_broadcast_f32x8(_mm256_loadu_ps(qg[1] + c));
        const __m512 q2 = _mm512_broadcast_f32x8(_mm256_loadu_ps(qg[2] + c));
        const __m512 k01 = widen8x2(kp[0] + c, kp[1] + c), k23 = widen8x2(kp[2] + c, kp[3] + c);
        z00 = _mm512_fmadd_ps(q0, k01, z00), z10 = _mm512_fmadd_ps(q1, k01, z10);
        z20 = _mm512_fmadd_ps(q2, k01, z20), z01 = _mm512_fmadd_ps(q0, k23, z01);
        z11 = _mm512_fmadd_ps(q1, k23, z11), z21 = _mm512_fmadd_ps(q2, k23, z21);
    }
    const __m512 zz[3][2] = {{z00, z01}, {z10, z11}, {z20, z21}};
    for (int g = 0; g < 3; g++)
        for (int h = 0; h < 2; h++) {
            acc[g][2 * h] = _mm512_castps512_ps256(zz[g][h]);
            acc[g][2 * h + 1] = _mm512_extractf32x8_ps(zz[g][h], 1);
        }
}

/* Scores over 16 lanes (head sizes d % 32 == 0). Each 32 bfloat16 of a key row are widened by two unpacks with
 * zeros, no shuffles across 128-bit lanes: lane p (0..15) of the low one holds dim f(p) = 8 (p / 4) + p % 4 of the
 * 32, of the high one dim f(p) + 4. Lane p sums q[c] k[c] over the 32-dim units u in order, dims u + f(p) then
 * u + f(p) + 4, by multiply-adds from zero; the 16 lane partials P are then added in one tree: P[e] + P[e + 8],
 * then e + 4, e + 2, e + 1 apart (hsum16x4). The queries are stored in the same lane order once per task
 * (lanes16_q), held in registers for 4 keys at a time: per key and 32 dims one load, two unpacks and six
 * multiply-adds for 3 heads, against eight widenings and broadcasts in the 8-lane order. */
static inline void lanes16_q(const float *q, int d, float *qz) { /* q [d] -> qz [d], per 32: low lanes, high lanes */
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(4));
    for (int u = 0; u < d; u += 32) {
        const __m512 a = _mm512_loadu_ps(q + u), b = _mm512_loadu_ps(q + u + 16);
        _mm512_storeu_ps(qz + u, _mm512_permutex2var_ps(a, lo, b));
        _mm512_storeu_ps(qz + u + 16, _mm512_permutex2var_ps(a, hi, b));
    }
}

/* 4 keys' 16 lane partials -> their 4 sums: P[e] + P[e + 8] (e < 8), then + 4 (e < 4), + 2, + 1 apart. */
static inline __m128 hsum16x4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    /* quarter i: key i's 8 sums; then its 4, then 2, then 1 (in its quarter's first element) */
    const __m512 s4 = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
    const __m512 s2 = _mm512_add_ps(s4, _mm512_permute_ps(s4, 0x4E));
    const __m512 s1 = _mm512_add_ps(s2, _mm512_permute_ps(s2, 0xB1));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                          0, 0, 0, 0), s1));
}

/* Scores of 4 keys (kp[i], d % 32 == 0 bfloat16 each) x 3 query rows in lane order (qz[g], lanes16_q) -> out[g]
 * (key i in element i), each summed as above. */
static inline void scores16_4x3(const float *const *qz, const uint16_t *const *kp, int d, __m128 out[3]) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    const __m512i z = _mm512_setzero_si512();
    for (int u = 0; u < d; u += 32) {
        const __m512 q0l = _mm512_loadu_ps(qz[0] + u), q0h = _mm512_loadu_ps(qz[0] + u + 16);
        const __m512 q1l = _mm512_loadu_ps(qz[1] + u), q1h = _mm512_loadu_ps(qz[1] + u + 16);
        const __m512 q2l = _mm512_loadu_ps(qz[2] + u), q2h = _mm512_loadu_ps(qz[2] + u + 16);
#define MH_KEY16(i, x0, x1, x2)                                                                                    \
    {                                                                                                              \
        const __m512i k = _mm512_loadu_si512((const void *)(kp[i] + u));                                           \
        const __m512 kl = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, k));                                        \
        const __m512 kh = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, k));                                        \
        x0 = _mm512_fmadd_ps(q0h, kh, _mm512_fmadd_ps(q0l, kl, x0));                                               \
        x1 = _mm512_fmadd_ps(q1h, kh, _mm512_fmadd_ps(q1l, kl, x1));                                               \
        x2 = _mm512_fmadd_ps(q2h, kh, _mm512_fmadd_ps(q2l, kl, x2));                                               \
    }
        MH_KEY16(0, a00, a10, a20) MH_KEY16(1, a01, a11, a21) MH_KEY16(2, a02, a12, a22) MH_KEY16(3, a03, a13, a23)
#undef MH_KEY16
    }
    out[0] = hsum16x4(a00, a01, a02, a03);
    out[1] = hsum16x4(a10, a11, a12, a13);
    out[2] = hsum16x4(a20, a21, a22, a23);
}

/* 3 heads' 64 columns in the unpacks' lane order (a[g][2 h]: lanes f(p) of the 32 columns from 32 h, a[g][2 h + 1]:
 * f(p) + 4) -> o rows g < ng (d apart), in column order. */
static inline void store_cols64x3(__m512 a00, __m512 a01, __m512 a02, __m512 a03, __m512 a10, __m512 a11, __m512 a12,
                                  __m512 a13, __m512 a20, __m512 a21, __m512 a22, __m512 a23, int ng, int d, float *o) {
    /* lanes -> columns: of 32 columns, 0-15 from the low/high pair's (0-3 low, 4-7 high, 8-11 low, ...), 16-31 */
    const __m512i c0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i c1 = _mm512_add_epi32(c0, _mm512_set1_epi32(8));
    const __m512 res[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    for (int g = 0; g < ng; g++)
        for (int h = 0; h < 2; h++) {
            const __m512 lo = res[g][2 * h], hi = res[g][2 * h + 1];
            _mm512_storeu_ps(o + (size_t)g * d + 32 * h, _mm512_permutex2var_ps(lo, c0, hi));
            _mm512_storeu_ps(o + (size_t)g * d + 32 * h + 16, _mm512_permutex2var_ps(lo, c1, hi));
        }
}

/* values_32x3 for 64 columns, 16 per vector: each output's multiply-adds as there. Each 32 bfloat16 of a value row
 * are widened by two unpacks with zeros (lane p of the low one column f(p) = 8 (p / 4) + p % 4, of the high one
 * f(p) + 4, as in scores16_4x3), the columns put back in order once at the end. */
static inline void values_64x3(const uint16_t *const *kp, int64_t off, int n, const float *const *pr, int ng, int d,
                               float *o) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    const __m512i z = _mm512_setzero_si512();
    for (int j = 0; j < n; j++) {
        const uint16_t *v = kp[j] + off;
        if (j + MH_VALUES_AHEAD < n) { /* both lines of the row MH_VALUES_AHEAD keys on */
            _mm_prefetch((const char *)(kp[j + MH_VALUES_AHEAD] + off), _MM_HINT_T0);
            _mm_prefetch((const char *)(kp[j + MH_VALUES_AHEAD] + off + 32), _MM_HINT_T0);
        }
        const __m512 p0 = _mm512_set1_ps(pr[0][j]), p1 = _mm512_set1_ps(pr[1][j]), p2 = _mm512_set1_ps(pr[2][j]);
        const __m512i v0 = _mm512_loadu_si512((const void *)v), v1 = _mm512_loadu_si512((const void *)(v + 32));
        __m512 x = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, v0));
        a00 = _mm512_fmadd_ps(p0, x, a00), a10 = _mm512_fmadd_ps(p1, x, a10), a20 = _mm512_fmadd_ps(p2, x, a20);
        x = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, v0));
        a01 = _mm512_fmadd_ps(p0, x, a01), a11 = _mm512_fmadd_ps(p1, x, a11), a21 = _mm512_fmadd_ps(p2, x, a21);
        x = _mm512_castsi512_ps(_mm512_unpacklo_epi16(z, v1));
        a02 = _mm512_fmadd_ps(p0, x, a02), a12 = _mm512_fmadd_ps(p1, x, a12), a22 = _mm512_fmadd_ps(p2, x, a22);
        x = _mm512_castsi512_ps(_mm512_unpackhi_epi16(z, v1));
        a03 = _mm512_fmadd_ps(p0, x, a03), a13 = _mm512_fmadd_ps(p1, x, a13), a23 = _mm512_fmadd_ps(p2, x, a23);
    }
    store_cols64x3(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, ng, d, o);
}
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define MH_ATT_BF16 1
/* Attention's multiply-adds by vdpbf16ps (AVX-512 BF16 builds, head sizes that are multiples of 64): the keys and
 * values as stored, the queries (scaled) and the softmax weights rounded to bfloat16 (RNE) once per task (llama.cpp
 * rounds both to fp16), each instruction two products per lane: half the instructions of the float32 multiply-adds,
 * no widening (a 64-key task 1135-1141 -> 657-660 cycles with its keys in L2; prompts 10-36% faster, bench/README.md;
 * the logits 0.92 -> 1.01e-2 from the float32 reference with bfloat16 weights). Scores: lane i of a key's partial
 * holds dims u + 2 i and u + 2 i + 1 of each 32-dim unit u, summed over the units in order from zero, the 16
 * partials then added as hsum16x4 adds them. Values: keys in pairs from the chunk's first (a pair past the chunk's
 * end weighs 0 against a zero row), each output column summed over the pairs in order from zero. The prompt blocks
 * (mh_attention_block.h) form every lane from the same operands by the same instruction, so a token's attention is
 * the same bits alone and in a block. */
static inline int att_bf16(int d) { return d % 64 == 0; }

/* 3 rows of d floats -> bfloat16 qb [3, d]. */
static inline void rows_bf16(const float *const *qg, int d, uint16_t *qb) {
    for (int g = 0; g < 3; g++)
        for (int u = 0; u < d; u += 32) {
            const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qg[g] + u + 16), _mm512_loadu_ps(qg[g] + u));
            _mm512_storeu_si512((void *)(qb + (size_t)g * d + u), (__m512i)b);
        }
}

/* row [n] floats -> bfloat16 in place, at the row's start, and a 0 after them up to a multiple of 32 (the row
 * holds at least 32 floats past n's last 32: its bfloat16 never reach floats not yet read). */
static inline void row_bf16_inplace(float *row, int n) {
    for (int j = 0; j < n; j += 32) {
        const int left = n - j;
        const __mmask16 m0 = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        const __mmask16 m1 = left >= 32 ? 0xffff : left > 16 ? (__mmask16)((1u << (left - 16)) - 1) : 0;
        const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, row + j + 16),
                                               _mm512_maskz_loadu_ps(m0, row + j));
        _mm512_storeu_si512((void *)((uint16_t *)row + j), (__m512i)b);
    }
}

/* Scores of 4 keys (kp[i], d bfloat16 each) x 3 query rows (qb [3, d] bfloat16) -> out[g] (key i in element i). */
static inline void scores_bf16_4x3(const uint16_t *qb, const uint16_t *const *kp, int d, __m128 out[3]) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int u = 0; u < d; u += 32) {
        const __m512bh q0 = (__m512bh)_mm512_loadu_si512((const void *)(qb + u));
        const __m512bh q1 = (__m512bh)_mm512_loadu_si512((const void *)(qb + d + u));
        const __m512bh q2 = (__m512bh)_mm512_loadu_si512((const void *)(qb + 2 * d + u));
#define MH_KEYBF(i, x0, x1, x2)                                                                                    \
    {                                                                                                              \
        const __m512bh k = (__m512bh)_mm512_loadu_si512((const void *)(kp[i] + u));                               \
        x0 = _mm512_dpbf16_ps(x0, q0, k), x1 = _mm512_dpbf16_ps(x1, q1, k), x2 = _mm512_dpbf16_ps(x2, q2, k);      \
    }
        MH_KEYBF(0, a00, a10, a20) MH_KEYBF(1, a01, a11, a21) MH_KEYBF(2, a02, a12, a22) MH_KEYBF(3, a03, a13, a23)
#undef MH_KEYBF
    }
    out[0] = hsum16x4(a00, a01, a02, a03);
    out[1] = hsum16x4(a10, a11, a12, a13);
    out[2] = hsum16x4(a20, a21, a22, a23);
}

/* 64 columns of n value rows (kp[j] + off) weighted by 3 heads' bfloat16 pb[g][j] (a 0 at pb[g][n] when n is odd)
 * -> o rows g < ng (d apart). Per pair of rows, two loads each and four vpunpck{l,h}wd interleave them: lane p of
 * the low one holds column f(p) = 8 (p / 4) + p % 4 of the 32 of both rows, of the high one f(p) + 4 (as in
 * values_64x3); the columns put back in order once at the end. */
static inline void values_bf16_64x3(const uint16_t *const *kp, int64_t off, int n, const uint16_t *const *pb, int ng,
                                    int d, float *o) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int j = 0; j < n; j += 2) {
        const uint16_t *v = kp[j] + off;
        for (int i = j + MH_VALUES_AHEAD; i < j + MH_VALUES_AHEAD + 2 && i < n; i++) { /* the rows MH_VALUES_AHEAD on */
            _mm_prefetch((const char *)(kp[i] + off), _MM_HINT_T0);
            _mm_prefetch((const char *)(kp[i] + off + 32), _MM_HINT_T0);
        }
        const __m512i v0 = _mm512_loadu_si512((const void *)v), v1 = _mm512_loadu_si512((const void *)(v + 32));
        __m512i w0 = _mm512_setzero_si512(), w1 = w0;
        if (j + 1 < n) {
            const uint16_t *w = kp[j + 1] + off;
            w0 = _mm512_loadu_si512((const void *)w), w1 = _mm512_loadu_si512((const void *)(w + 32));
        }
        int32_t e0, e1, e2; /* the heads' weights of rows j and j + 1 */
        memcpy(&e0, pb[0] + j, 4), memcpy(&e1, pb[1] + j, 4), memcpy(&e2, pb[2] + j, 4);
        const __m512bh p0 = (__m512bh)_mm512_set1_epi32(e0), p1 = (__m512bh)_mm512_set1_epi32(e1);
        const __m512bh p2 = (__m512bh)_mm512_set1_epi32(e2);
        __m512bh x = (__m512bh)_mm512_unpacklo_epi16(v0, w0);
        a00 = _mm512_dpbf16_ps(a00, p0, x), a10 = _mm512_dpbf16_ps(a10, p1, x), a20 = _mm512_dpbf16_ps(a20, p2, x);
        x = (__m512bh)_mm512_unpackhi_epi16(v0, w0);
        a01 = _mm512_dpbf16_ps(a01, p0, x), a11 = _mm512_dpbf16_ps(a11, p1, x), a21 = _mm512_dpbf16_ps(a21, p2, x);
        x = (__m512bh)_mm512_unpacklo_epi16(v1, w1);
        a02 = _mm512_dpbf16_ps(a02, p0, x), a12 = _mm512_dpbf16_ps(a12, p1, x), a22 = _mm512_dpbf16_ps(a22, p2, x);
        x = (__m512bh)_mm512_unpackhi_epi16(v1, w1);
        a03 = _mm512_dpbf16_ps(a03, p0, x), a13 = _mm512_dpbf16_ps(a13, p1, x), a23 = _mm512_dpbf16_ps(a23, p2, x);
    }
    store_cols64x3(a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, ng, d, o);
}
#endif
#endif
#endif
