/* x86 integer products for the quantized formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants Q4_K, Q5_K, Q6_K): one
 * weight row against up to 4 token rows whose activations were quantized to int8 per 32-block (scale d, and d times
 * the sums of each 16 and each 32 elements, as llama.cpp quantizes activations to Q8_0 / Q8_K), AVX2.
 *
 * A 32-element block (a K-quant's 32-element sub-block) becomes 32 bytes in one register: signed for Q8_0 and Q4_0
 * (q - 8), unsigned for the others (their offset, -16 d for Q5_0, m for Q4_1 / Q5_1, -dmin m_j for Q4_K, -32 d sc
 * for Q6_K per 16 elements, is added through the activations' block sums). vpmaddubsw multiplies unsigned by
 * signed bytes, so signed weights go in as |q| with the activations' signs flipped where q is negative (no pair sum
 * can saturate: |q| <= 128 and |x| <= 127; Q6_K's 6-bit q: 2 x 63 x 127); vpmaddwd sums the pairs into 8 int32,
 * with ones, or with Q6_K's two int8 scales (one per 16 elements: low and high 128-bit lane), then converted and
 * scaled by d_w * d_x (Q4_K: d sc_j) into one float32 accumulator per (row, token). Per block and token: one load,
 * 2-5 integer operations, one conversion, one FMA; against 4 loads and 4 FMAs plus a dequantization per row in
 * float32 (mh_dot_x86_float.h), which left decode compute-bound. The error is the activations' rounding to int8
 * (bench/accuracy.py measures it). Knows nothing of the tiling (mh_matmul.h). */
#ifndef MH_DOT_X86_INT_H
#define MH_DOT_X86_INT_H

/* vpdpbusd where the CPU has it (AVX-VNNI; AVX-512 VNNI with VL): acc + in each 32-bit lane the sum of the 4 products
 * of unsigned bytes u and signed bytes s, with no 16-bit stage (one instruction for vpmaddubsw + vpmaddwd + vpaddd).
 * Every sum the integer products form fits 16 bits in the vpmaddubsw path too, so both give the same integers and
 * the same results. MH_VNNI_EMULATE (the tests, on CPUs without VNNI) computes them with AVX2 instead. */
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(MH_VNNI_EMULATE)
#define MH_VNNI 1
AI __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(MH_VNNI_EMULATE) /* bytes to 16 bits (u zero-, s sign-extended), pairs to 32 bits, adjacent pairs added */
    const __m256i z = _mm256_setzero_si256();
    const __m256i lo = _mm256_madd_epi16(_mm256_unpacklo_epi8(u, z), _mm256_srai_epi16(_mm256_unpacklo_epi8(s, s), 8));
    const __m256i hi = _mm256_madd_epi16(_mm256_unpackhi_epi8(u, z), _mm256_srai_epi16(_mm256_unpackhi_epi8(s, s), 8));
    return _mm256_add_epi32(acc, _mm256_hadd_epi32(lo, hi));
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#endif

/* The formats with integer products: every quantized one (these kernels', and the interleaved layouts' in
 * mh_dot_x86_x8.h); with activations="float32" they are dequantized to float32 instead (mh_dot_x86_float.h). */
static inline int int_dot_format(int fmt) { return fmt != MH_BF16; }

/* One token row x [K] (K % 32 == 0) to int8 per 32-block: q = rint(x * 127 / amax), d = amax / 127, and d times
 * the sums of q over each 16 and each 32 elements (what mh_matmul.h's scalar prep_row computes, 8 at a time); and
 * iz [K / 32 rounded up to even] 128 times each block's sum of q, in integers (Q8_0's offset with VNNI: its q + 128
 * are unsigned, vpdpbusd's left operand), a zero after an odd count (mh_matmul.h's ACT_Z reads them in pairs). */
static inline void quantize_row_avx2(const float *x, int K, int8_t *q, float *d, float *s16, float *s32,
                                     int32_t *iz) {
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        __m256 v[4], m;
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xb + 8 * i);
        m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], nosign), _mm256_and_ps(v[1], nosign)),
                          _mm256_max_ps(_mm256_and_ps(v[2], nosign), _mm256_and_ps(v[3], nosign)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h), db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m256 iv = _mm256_set1_ps(inv);
        __m256i n[4];
        for (int i = 0; i < 4; i++) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv)); /* round to nearest even */
        /* packs work per 128-bit lane: (n0, n1) -> 16 bit as 0-3 8-11 4-7 12-15; then bytes; one permute fixes both */
        const __m256i w01 = _mm256_packs_epi32(n[0], n[1]), w23 = _mm256_packs_epi32(n[2], n[3]);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23),
                                                          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + 32 * b), bytes);
        const __m256i lo = _mm256_add_epi32(n[0], n[1]), hi = _mm256_add_epi32(n[2], n[3]);
        const int sum_lo = (int)hsum8(_mm256_cvtepi32_ps(lo)), sum_hi = (int)hsum8(_mm256_cvtepi32_ps(hi));
        d[b] = db;
        s16[2 * b] = db * (float)sum_lo;
        s16[2 * b + 1] = db * (float)sum_hi;
        s32[b] = db * (float)(sum_lo + sum_hi);
        iz[b] = 128 * (sum_lo + sum_hi);
    }
    if ((K / 32) & 1) iz[K / 32] = 0;
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0-15) in the low half, high nibbles (16-31) above. */
AI __m256i nibbles32(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(15));
}

/* Bit i of `bits` as 16 in byte i (the fifth bit of Q5_0 / Q5_1 element i). */
AI __m256i fifth_bits(uint32_t bits) {
    const __m256i which = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, /* byte i / 8 of bits */
                                           2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), which);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL); /* byte i: 1 << (i % 8) */
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(16));
}

/* The sums that carry a block's offset: off times the 32-block's (off16[0], off16[1] times the 16-element halves'
 * for Q6_K), and the vpmaddwd multipliers of its pair sums (ones, or Q6_K's two scales). */
typedef struct {
    float dw, off, off16[2];
    __m256i pairs;
} int_scales;

/* Q4_K (q5 = 0) or Q5_K 32-block j of a 256-element super-block blk: its nibbles (Q5_K: bit j of qh[i] above
 * element i's), d sc_j and -dmin m_j. */
AI __m256i q4k_block(const uint8_t *blk, int j, const int q5, int_scales *S) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + (q5 ? 48 : 16) + (j / 2) * 32));
    int sc, mn;
    q4k_scale_min(j, blk + 4, &sc, &mn);
    S->dw = f16_to_f32(rd16(blk)) * (float)sc;
    S->off = -f16_to_f32(rd16(blk + 2)) * (float)mn;
    const __m256i u = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(15));
    if (!q5) return u;
    const __m256i h = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(blk + 16)), _mm_cvtsi32_si128(j));
    return _mm256_or_si256(u, _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 4)); /* within bytes */
}

/* Q6_K 32-block j of a super-block: the unsigned 6-bit quants (ql's nibble | qh's 2 bits << 4), d, and the two
 * halves' int8 scales as pair multipliers with their -32 d sc offsets. */
AI __m256i q6k_block(const uint8_t *blk, int j, int_scales *S) {
    const int half = j / 4, k = j % 4;
    const __m256i l = _mm256_loadu_si256((const __m256i *)(blk + half * 64 + (k & 1) * 32));
    const __m256i h = _mm256_loadu_si256((const __m256i *)(blk + 128 + half * 32));
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
    const __m256i lo = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(l, 4) : l, m4);
    const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * k)), m3);
    const int8_t *sc = (const int8_t *)(blk + 192) + half * 8 + 2 * k;
    const float d = f16_to_f32(rd16(blk + 208));
    S->dw = d;
    S->off = 0.0f;
    S->off16[0] = -32.0f * d * (float)sc[0];
    S->off16[1] = -32.0f * d * (float)sc[1];
    S->pairs = _mm256_set_m128i(_mm_set1_epi16(sc[1]), _mm_set1_epi16(sc[0]));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)); /* hi <= 3: no bits cross into the next byte */
}

/* Block b of a row: its 32 weights as bytes (signed for Q8_0 / Q4_0, else unsigned), scale and offsets. */
AI __m256i int_block(const int fmt, const uint8_t *row, int b, int_scales *S) {
    S->pairs = _mm256_set1_epi16(1);
    if (fmt == MH_Q4_K) return q4k_block(row + (size_t)(b / 8) * 144, b % 8, 0, S);
    if (fmt == MH_Q5_K) return q4k_block(row + (size_t)(b / 8) * 176, b % 8, 1, S);
    if (fmt == MH_Q6_K) return q6k_block(row + (size_t)(b / 8) * 210, b % 8, S);
    const uint8_t *blk = row + (size_t)b * fmt_block_bytes(fmt);
    S->dw = f16_to_f32(rd16(blk));
    uint32_t qh;
    switch (fmt) {
    case MH_Q8_0: S->off = 0.0f; return _mm256_loadu_si256((const __m256i *)(blk + 2));
    case MH_Q4_0: S->off = 0.0f; return _mm256_sub_epi8(nibbles32(blk + 2), _mm256_set1_epi8(8));
    case MH_Q4_1: S->off = f16_to_f32(rd16(blk + 2)); return nibbles32(blk + 4);
    case MH_Q5_0:
        memcpy(&qh, blk + 2, 4);
        S->off = -16.0f * S->dw;
        return _mm256_or_si256(nibbles32(blk + 6), fifth_bits(qh));
    default: /* Q5_1 */
        memcpy(&qh, blk + 4, 4);
        S->off = f16_to_f32(rd16(blk + 2));
        return _mm256_or_si256(nibbles32(blk + 8), fifth_bits(qh));
    }
}

/* Block b of row w against the MT token rows, added to acc[t] and corr[t]. */
AI void qi_block(const int fmt, const int sgn, const uint8_t *w, int b, const int MT, const int8_t *const *xq,
                 const float *const *xd, const float *const *xs, const float *const *xs16, __m256 *acc, float *corr) {
    int_scales S;
    const __m256i u = int_block(fmt, w, b, &S);
    const __m256i au = sgn ? _mm256_sign_epi8(u, u) : u;
    for (int t = 0; t < MT; t++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(xq[t] + 32 * b));
        if (sgn) x = _mm256_sign_epi8(x, u);
#ifdef MH_VNNI
        const __m256i p = fmt == MH_Q6_K ? _mm256_madd_epi16(_mm256_maddubs_epi16(au, x), S.pairs)
                                         : dpbusd(_mm256_setzero_si256(), au, x); /* [8] int32 */
#else
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(au, x), S.pairs); /* [8] int32 */
#endif
        acc[t] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(S.dw * xd[t][b])), acc[t]);
        if (fmt == MH_Q6_K)
            corr[t] += S.off16[0] * xs16[t][2 * b] + S.off16[1] * xs16[t][2 * b + 1];
        else if (!sgn)
            corr[t] += S.off * xs[t][b];
    }
}

/* One row w against token rows t0 .. t0 + MT - 1 (MT <= 4): res[t]. Two accumulators per token, the even and the
 * odd blocks (one chain alone would wait on its own latency at batch 1), summed in a fixed order with the
 * offsets' sums: each (row, token) result is the same alone or in any batch. */
AI void tile_qi(const int fmt, const uint8_t *w, const mh_act *a, int t0, const int MT, float *res) {
    const int K = a->K, nb = K / 32, sgn = fmt == MH_Q8_0 || fmt == MH_Q4_0;
    __m256 acc0[4], acc1[4];
    float corr0[4], corr1[4];
    const int8_t *xq[4];
    const float *xd[4], *xs[4], *xs16[4];
    for (int t = 0; t < MT; t++) {
        xq[t] = a->q + (size_t)(t0 + t) * K;
        xd[t] = a->d + (size_t)(t0 + t) * nb;
        xs[t] = a->s32 + (size_t)(t0 + t) * nb;
        xs16[t] = a->s16 + (size_t)(t0 + t) * 2 * nb;
        acc0[t] = acc1[t] = _mm256_setzero_ps();
        corr0[t] = corr1[t] = 0.0f;
    }
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        qi_block(fmt, sgn, w, b, MT, xq, xd, xs, xs16, acc0, corr0);
        qi_block(fmt, sgn, w, b + 1, MT, xq, xd, xs, xs16, acc1, corr1);
    }
    if (b < nb) qi_block(fmt, sgn, w, b, MT, xq, xd, xs, xs16, acc0, corr0);
    for (int t = 0; t < MT; t++) res[t] = hsum8(_mm256_add_ps(acc0[t], acc1[t])) + (corr0[t] + corr1[t]);
}

AI void qi_rows(const int fmt, const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0, const int MT,
                const mh_part *P, int n0) {
    float res[4];
    for (int n = 0; n < nrows; n++) {
        if (t0 == 0) prefetch_ahead(w + (size_t)n * rb, (int)rb);
        tile_qi(fmt, w + (size_t)n * rb, a, t0, MT, res);
        store_out(P, n0 + n, t0, MT, res);
    }
}

#endif
