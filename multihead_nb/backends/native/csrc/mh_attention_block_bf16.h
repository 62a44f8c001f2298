/* A prompt block's attention tiles by vdpbf16ps (AVX-512 BF16 builds, MH_ATT_BF16): the block's queries and
 * softmax weights turned into bfloat16 pairs, each pair of key elements (or of two keys' value elements) broadcast
 * against the rows' pairs, in the order a lone token's scores_bf16_4x3 and values_bf16_64x3 take them, so the bits
 * are the same. Included by mh_attention_block.h (its scratch and accumulator macros); knows nothing of chunks,
 * merges or threads. */
#ifndef MH_ATTENTION_BLOCK_BF16_H
#define MH_ATTENTION_BLOCK_BF16_H
#if defined(MH_ATT_BF16)
/* 8 floats a and 8 floats b -> 8 pairs (bfloat16 of a in the low half of each 32 bits, of b in the high; RNE). */
static inline __m256i pairs_bf16(__m256 a, __m256 b) {
    const __m128i x = (__m128i)_mm256_cvtneps_pbh(a), y = (__m128i)_mm256_cvtneps_pbh(b);
    return _mm256_set_m128i(_mm_unpackhi_epi16(x, y), _mm_unpacklo_epi16(x, y));
}

/* The block's queries qt [d, ldr] (floats) -> bfloat16 pairs in place: row k of the [d / 2, ldr] 32-bit view holds
 * (q[2 k], q[2 k + 1]) of each row (lanes, as vdpbf16ps pairs them in a lone token's scores_bf16_4x3). */
static void block_queries_bf16(float *qt, int d, int ldr) {
    for (int k = 0; k < d / 2; k++)
        for (int r = 0; r < ldr; r += 8) {
            const __m256i p = pairs_bf16(_mm256_loadu_ps(qt + (size_t)2 * k * ldr + r),
                                         _mm256_loadu_ps(qt + (size_t)(2 * k + 1) * ldr + r));
            _mm256_storeu_si256((__m256i *)((uint32_t *)qt + (size_t)k * ldr + r), p);
        }
}

/* Scores of 3 row vectors (query pairs qp + 8 r, rows of pairs ldq apart) x 4 keys (kr[i], d bfloat16 each, as
 * stored) -> s + i lds + 8 r for i < nk, as scores_bf16_4x3 forms a lone token's: partial l (0..15) sums the pairs
 * at dims u + 2 l of each 32-dim unit u in order by vdpbf16ps, the 16 then added as hsum16x4 adds them. */
static void block_scores_bf16_3x4(const uint32_t *qp, int ldq, const uint16_t *const *kr, int d, float *part,
                                  float *s, int lds, int nk) {
    for (int l = 0; l < 16; l++) {
        MH_ACC12(a);
        for (int c = 2 * l; c < d; c += 32) {
            const uint32_t *q = qp + (size_t)(c / 2) * ldq;
            const __m256bh q0 = (__m256bh)_mm256_loadu_si256((const __m256i *)q);
            const __m256bh q1 = (__m256bh)_mm256_loadu_si256((const __m256i *)(q + 8));
            const __m256bh q2 = (__m256bh)_mm256_loadu_si256((const __m256i *)(q + 16));
            int32_t e;
#define MH_KPAIR(i, x0, x1, x2)                                                                                    \
    {                                                                                                              \
        memcpy(&e, kr[i] + c, 4);                                                                                  \
        const __m256bh k = (__m256bh)_mm256_set1_epi32(e);                                                         \
        x0 = _mm256_dpbf16_ps(x0, q0, k), x1 = _mm256_dpbf16_ps(x1, q1, k), x2 = _mm256_dpbf16_ps(x2, q2, k);      \
    }
            MH_KPAIR(0, a00, a10, a20) MH_KPAIR(1, a01, a11, a21) MH_KPAIR(2, a02, a12, a22) MH_KPAIR(3, a03, a13, a23)
#undef MH_KPAIR
        }
        const __m256 res[12] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23};
        for (int x = 0; x < 12; x++) _mm256_storeu_ps(part + (size_t)(l * 12 + x) * 8, res[x]);
    }
    block_sum_partials(part, 16, s, lds, nk);
}

/* The chunk's weights s [n, ldr] (floats: exps where key j < nrow[r], anything past) -> bfloat16 pairs in place:
 * row jp of the [(n + 1) / 2, ldr] 32-bit view holds (w[2 jp], w[2 jp + 1]) of each row, 0 for keys past the row's
 * (a lone token's chunk ends there: its last pair's second weight is 0, as row_bf16_inplace pads it). */
static void block_weights_bf16(float *s, int n, int ldr, const int *nrow) {
    for (int jp = 0; jp < (n + 1) / 2; jp++)
        for (int r = 0; r < ldr; r += 8) {
            const __m256i nr = _mm256_loadu_si256((const __m256i *)(nrow + r));
            const __m256 in0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nr, _mm256_set1_epi32(2 * jp)));
            const __m256 in1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nr, _mm256_set1_epi32(2 * jp + 1)));
            const __m256 a = _mm256_and_ps(_mm256_loadu_ps(s + (size_t)2 * jp * ldr + r), in0);
            const __m256 b = 2 * jp + 1 < n ? _mm256_and_ps(_mm256_loadu_ps(s + (size_t)(2 * jp + 1) * ldr + r), in1)
                                            : _mm256_setzero_ps();
            _mm256_storeu_si256((__m256i *)((uint32_t *)s + (size_t)jp * ldr + r), pairs_bf16(a, b));
        }
}

/* n value rows (kp[j] + off, d bfloat16 each) -> pairs vp [(n + 1) / 2, d]: (v[2 jp][c], v[2 jp + 1][c]) in each 32
 * bits, a zero row past n. */
static void block_value_pairs(const uint16_t *const *kp, int64_t off, int n, int d, uint32_t *vp) {
    for (int jp = 0; jp < (n + 1) / 2; jp++, vp += d) {
        const uint16_t *a = kp[2 * jp] + off, *b = 2 * jp + 1 < n ? kp[2 * jp + 1] + off : NULL;
        for (int j = 2 * jp + 8; j < 2 * jp + 10 && j < n; j++) /* 4 pairs on: the prefetchers do not follow pages */
            prefetch_row(kp[j] + off, 2 * d);
        for (int c = 0; c < d; c += 16) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a + c));
            const __m256i y = b ? _mm256_loadu_si256((const __m256i *)(b + c)) : _mm256_setzero_si256();
            const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);
            _mm256_storeu_si256((__m256i *)(vp + c), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i *)(vp + c + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
    }
}

/* Outputs of 3 row vectors x 4 columns from weight pairs (wp + 8 r, rows of pairs lds apart) and value pairs (vp,
 * rows d apart, from column c0): ot[i][8 r ..] = the sum over pairs jp < np in order from zero, by vdpbf16ps, as
 * values_bf16_64x3 sums a lone token's. */
static void block_values_bf16_3x4(const uint32_t *wp, int lds, const uint32_t *vp, int d, int np, float *ot,
                                  int ldo) {
    MH_ACC12(a);
    for (int jp = 0; jp < np; jp++, wp += lds, vp += d) {
        const __m256bh p0 = (__m256bh)_mm256_loadu_si256((const __m256i *)wp);
        const __m256bh p1 = (__m256bh)_mm256_loadu_si256((const __m256i *)(wp + 8));
        const __m256bh p2 = (__m256bh)_mm256_loadu_si256((const __m256i *)(wp + 16));
#define MH_VPAIR(i, c0, c1, c2)                                                                                    \
    {                                                                                                              \
        const __m256bh x = (__m256bh)_mm256_set1_epi32((int)vp[i]);                                                \
        c0 = _mm256_dpbf16_ps(c0, p0, x), c1 = _mm256_dpbf16_ps(c1, p1, x), c2 = _mm256_dpbf16_ps(c2, p2, x);      \
    }
        MH_VPAIR(0, a00, a10, a20) MH_VPAIR(1, a01, a11, a21) MH_VPAIR(2, a02, a12, a22) MH_VPAIR(3, a03, a13, a23)
#undef MH_VPAIR
    }
    const __m256 res[4][3] = {{a00, a10, a20}, {a01, a11, a21}, {a02, a12, a22}, {a03, a13, a23}};
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 3; r++) _mm256_storeu_ps(ot + (size_t)i * ldo + 8 * r, res[i][r]);
}
#endif
#endif
