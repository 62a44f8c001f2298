/* x86 products of bfloat16 weights: float32 activations against 16 weights a 256-bit load (shift and mask give the
 * even and odd elements as float32, activations stored per MH_F_CHUNK as 8 even then 8 odd), or with AVX-512 BF16
 * (MH_BF16_DOT) vdpbf16ps over 512 bits against bfloat16 activations. Included by mh_dot_x86.h (its prefetch and
 * sums); knows nothing of the tiling (mh_matmul.h) or the dispatch. */
#ifndef MH_DOT_X86_BF16_H
#define MH_DOT_X86_BF16_H
#ifndef MH_BF16_DOT
/* Two accumulators per (row, token), the even and the odd elements: one FMA each per 16 weights. Rows are read
 * one after the other (NR = 1): a single stream per thread reads memory faster than interleaved rows. */
AI void tile_bf16(const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT, float *res) {
    const int K = a->K, K16 = K & ~15;
    __m256 ae[1][6], ao[1][6];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) ae[r][t] = ao[r][t] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    const float *x[6];
    for (int t = 0; t < MT; t++) x[t] = a->f + (size_t)(t0 + t) * K;
    for (int k = 0; k < K16; k += 16) {
        for (int r = 0; r < NR; r++) {
            if (t0 == 0 && !(k & 31)) prefetch_ahead(w + (size_t)r * rb + 2 * (size_t)k, 64);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * rb + 2 * (size_t)k));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
            for (int t = 0; t < MT; t++) {
                ae[r][t] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x[t] + k), ae[r][t]);
                ao[r][t] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x[t] + k + 8), ao[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) {
            float s = hsum8(_mm256_add_ps(ae[r][t], ao[r][t]));
            for (int k = K16; k < K; k++) s += bf16_to_f32(rd16(w + (size_t)r * rb + 2 * (size_t)k)) * x[t][k];
            res[r * MT + t] = s;
        }
}
/* Prefill: two rows x MT (<= 3) token rows, each (row, token) pair summed exactly as tile_bf16 sums it (the same two
 * accumulators, the same order), the even elements of both rows first, then the odd ones: each token load serves
 * both rows (10 loads for 12 FMAs, against 13 for one row x 6 token rows; loads bound that tile on Zen 3), and 16
 * registers suffice: 12 accumulators, two rows' halves, one token's. Only for rows already in L2: from memory, two
 * streams per thread read slower than one (decode keeps tile_bf16). */
AI void tile_bf16x2(const uint8_t *w, int64_t rb, const mh_act *a, int t0, const int MT, float *res) {
    const int K = a->K, K16 = K & ~15;
    __m256 ae[2][3], ao[2][3];
    for (int t = 0; t < MT; t++) ae[0][t] = ao[0][t] = ae[1][t] = ao[1][t] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    const float *x[3];
    for (int t = 0; t < MT; t++) x[t] = a->f + (size_t)(t0 + t) * K;
    const uint8_t *w1 = w + rb;
    for (int k = 0; k < K16; k += 16) {
        const __m256i *p0 = (const __m256i *)(w + 2 * (size_t)k), *p1 = (const __m256i *)(w1 + 2 * (size_t)k);
        const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(p0), 16));
        const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(p1), 16));
        for (int t = 0; t < MT; t++) {
            __m256 xe = _mm256_loadu_ps(x[t] + k);
            __asm__("" : "+x"(xe)); /* one load for both rows: keeps the compiler from folding it into each FMA */
            ae[0][t] = _mm256_fmadd_ps(e0, xe, ae[0][t]);
            ae[1][t] = _mm256_fmadd_ps(e1, xe, ae[1][t]);
        }
        __asm__("" : "+r"(p0), "+r"(p1)); /* the odd halves loaded again (from L1), not kept in two registers */
        const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(p0), hi));
        const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(p1), hi));
        for (int t = 0; t < MT; t++) {
            __m256 xo = _mm256_loadu_ps(x[t] + k + 8);
            __asm__("" : "+x"(xo));
            ao[0][t] = _mm256_fmadd_ps(o0, xo, ao[0][t]);
            ao[1][t] = _mm256_fmadd_ps(o1, xo, ao[1][t]);
        }
    }
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < MT; t++) {
            float s = hsum8(_mm256_add_ps(ae[r][t], ao[r][t]));
            for (int k = K16; k < K; k++) s += bf16_to_f32(rd16(w + (size_t)r * rb + 2 * (size_t)k)) * x[t][k];
            res[r * MT + t] = s;
        }
}
#else
/* The lane sums of 16 accumulators as one vector (element i: the sum of a[i]'s 16 lanes), each summed in one order
 * whatever the others hold: within each 128-bit lane elements 0 + 2 and 1 + 3, then those two; then lanes 0 + 2 and
 * 1 + 3, then those two. Every bfloat16 tile ends with it, so that a (row, token) sum has the same bits in any tile. */
AI __m512 sum16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of a = a[2i], b = a[2i + 1] */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* lane: accumulators 4i .. 4i + 3 */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++) /* lanes [L0 + L2, L1 + L3] of c[2i], then of c[2i + 1] */
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Weights and activations of 32 elements from k (the last, K - k < 32, masked). */
AI __m512i load32_bf16(const uint16_t *p, int k, int K) {
    if (K - k >= 32) return _mm512_loadu_si512(p + k);
    return _mm512_maskz_loadu_epi16((__mmask32)((1u << (K - k)) - 1u), p + k);
}

/* One weight row against MT (<= 4) token rows in bfloat16: one accumulator per token row, 32 elements a step. */
AI void tile_bf16_row(const uint16_t *w, int K, const mh_act *a, int t0, const int MT, float *res) {
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        if (t0 == 0 && !(k & 32)) prefetch_ahead(w + k, 128);
        const __m512i wv = load32_bf16(w, k, K);
        for (int m = 0; m < MT; m++)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)wv, (__m512bh)load32_bf16(a->h + (size_t)(t0 + m) * K, k, K));
    }
    float out[16];
    _mm512_storeu_ps(out, sum16(acc));
    for (int m = 0; m < MT; m++) res[m] = out[m];
}

AI void tile_bf16(const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT, float *res) {
    for (int r = 0; r < NR; r++) tile_bf16_row((const uint16_t *)(w + (size_t)r * rb), a->K, a, t0, MT, res + r * MT);
}

/* Prefill (8+ token rows): four weight rows against four token rows, each (row, token) pair summed exactly as
 * tile_bf16_row sums it; a step's 8 loads feed 16 vdpbf16ps (tile_bf16_row's 1 + MT feed MT). res [4 rows][4]. */
AI void tile_bf16_4x4(const uint8_t *w, int64_t rb, const mh_act *a, int t0, float *res) {
    const int K = a->K;
    const uint16_t *wr[4], *x[4];
    for (int i = 0; i < 4; i++) {
        wr[i] = (const uint16_t *)(w + (size_t)i * rb);
        x[i] = a->h + (size_t)(t0 + i) * K;
    }
    __m512 acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        __m512i wv[4];
        for (int r = 0; r < 4; r++) {
            if (t0 == 0) prefetch_ahead(wr[r] + k, 64);
            wv[r] = load32_bf16(wr[r], k, K);
        }
        for (int m = 0; m < 4; m++) {
            const __m512i xv = load32_bf16(x[m], k, K);
            for (int r = 0; r < 4; r++)
                acc[4 * r + m] = _mm512_dpbf16_ps(acc[4 * r + m], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    _mm512_storeu_ps(res, sum16(acc));
}
#endif

#endif
