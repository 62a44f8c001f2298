/* x86 products of quantized weights in float32 (AVX2 + FMA): each 32-block of a row dequantized into 4 registers
 * and multiplied with float32 activations; in prefill, rows dequantized once per token block into a scratch. What
 * every quantized format uses with activations="float32". Included by
 * mh_dot_x86.h; knows nothing of the tiling (mh_matmul.h). */
#ifndef MH_DOT_X86_FLOAT_H
#define MH_DOT_X86_FLOAT_H

/* ---- quantized weights: dequantized 32 at a time into registers, float32 products ------------------------ */
/* 8 signed bytes -> 8 floats */
AI __m256 cvt8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

/* The 32 weights of 32-block b of a packed row, dequantized in order: w[i] = q[i] * dw + off (off per 16). */
AI void deq32(const int fmt, const uint8_t *row, int b, __m256 w[4]) {
    if (fmt == MH_Q8_0) {
        const uint8_t *blk = row + (size_t)b * 34;
        const __m256 d = _mm256_set1_ps(f16_to_f32(rd16(blk)));
        for (int i = 0; i < 4; i++)
            w[i] = _mm256_mul_ps(cvt8(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * i))), d);
    } else if (fmt == MH_Q4_0 || fmt == MH_Q4_1) {
        /* element i < 16 is the low nibble of byte i, element 16 + i its high nibble: 8 bytes zero-extended to
         * 32-bit lanes give elements i..i+7 masked and i+16..i+23 shifted */
        const int bb = fmt == MH_Q4_0 ? 18 : 20;
        const uint8_t *blk = row + (size_t)b * bb, *qs = blk + bb - 16;
        const float dv = f16_to_f32(rd16(blk));
        const __m256 d = _mm256_set1_ps(dv);
        const __m256 off = _mm256_set1_ps(fmt == MH_Q4_0 ? -8.0f * dv : f16_to_f32(rd16(blk + 2)));
        const __m256i m = _mm256_set1_epi32(15);
        const __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
        const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
        w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q0, m)), d, off);
        w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q1, m)), d, off);
        w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q0, 4)), d, off);
        w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q1, 4)), d, off);
    } else if (fmt == MH_Q5_0 || fmt == MH_Q5_1) { /* Q4_0's nibbles plus bit i of qh as element i's fifth bit */
        const int bb = fmt == MH_Q5_0 ? 22 : 24;
        const uint8_t *blk = row + (size_t)b * bb, *qs = blk + bb - 16;
        uint32_t qh;
        memcpy(&qh, blk + bb - 20, 4);
        const float dv = f16_to_f32(rd16(blk));
        const __m256 d = _mm256_set1_ps(dv);
        const __m256 off = _mm256_set1_ps(fmt == MH_Q5_0 ? -16.0f * dv : f16_to_f32(rd16(blk + 2)));
        const __m256i m = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1), hv = _mm256_set1_epi32((int)qh);
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
        const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
        const __m256i parts[4] = {_mm256_and_si256(q0, m), _mm256_and_si256(q1, m), _mm256_srli_epi32(q0, 4),
                                  _mm256_srli_epi32(q1, 4)};
        for (int i = 0; i < 4; i++) {
            const __m256i hb = _mm256_and_si256(_mm256_srlv_epi32(hv, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * i))),
                                                one);
            w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_or_si256(parts[i], _mm256_slli_epi32(hb, 4))), d, off);
        }
    } else if (fmt == MH_Q4_K || fmt == MH_Q5_K) { /* Q5_K: bit j of qh[i] above element i's nibble */
        const int q5 = fmt == MH_Q5_K;
        const uint8_t *blk = row + (size_t)(b / 8) * (q5 ? 176 : 144);
        const int j = b % 8;
        int sc, mn;
        q4k_scale_min(j, blk + 4, &sc, &mn);
        const __m256 d = _mm256_set1_ps(f16_to_f32(rd16(blk)) * (float)sc);
        const __m256 off = _mm256_set1_ps(-f16_to_f32(rd16(blk + 2)) * (float)mn);
        const uint8_t *qs = blk + (q5 ? 48 : 16) + (j / 2) * 32; /* sub-block j: low (even j) or high nibbles */
        const __m256i m = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1);
        for (int i = 0; i < 4; i++) {
            const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * i)));
            __m256i u = j & 1 ? _mm256_srli_epi32(q, 4) : _mm256_and_si256(q, m);
            if (q5) {
                const __m256i h = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 16 + 8 * i)));
                u = _mm256_or_si256(u, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, j), one), 4));
            }
            w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(u), d, off);
        }
    } else { /* Q6_K */
        const uint8_t *blk = row + (size_t)(b / 8) * 210;
        const int j = b % 8, half = j / 4, k = j % 4;
        const uint8_t *ql = blk + half * 64 + (k & 1) * 32, *qh = blk + 128 + half * 32;
        const int8_t *scales = (const int8_t *)(blk + 192) + half * 8 + 2 * k;
        const float dv = f16_to_f32(rd16(blk + 208));
        const __m128i m = _mm_set1_epi8(15), m3 = _mm_set1_epi8(3);
        for (int h = 0; h < 2; h++) {
            __m128i l = _mm_loadu_si128((const __m128i *)(ql + 16 * h));
            l = _mm_and_si128(k >= 2 ? _mm_srli_epi16(l, 4) : l, m);
            const __m128i hb = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(qh + 16 * h)),
                                                           _mm_cvtsi32_si128(2 * k)), m3);
            const __m128i u = _mm_sub_epi8(_mm_or_si128(l, _mm_slli_epi16(hb, 4)), _mm_set1_epi8(32));
            const __m256 d = _mm256_set1_ps(dv * (float)scales[h]);
            w[2 * h] = _mm256_mul_ps(cvt8(u), d);
            w[2 * h + 1] = _mm256_mul_ps(cvt8(_mm_srli_si128(u, 8)), d);
        }
    }
}

/* NR rows x MT token rows: each 32-block of each row dequantized once into 4 registers, then 4 FMAs per token
 * into the (row, token) pair's two accumulators (elements 0-7 and 16-23, 8-15 and 24-31), in element order. */
AI void tile_q(const int fmt, const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT,
               float *res) {
    const int K = a->K, nb = K / 32;
    __m256 acc0[1][4], acc1[1][4];
    const float *x[4];
    for (int t = 0; t < MT; t++) x[t] = a->x + (size_t)(t0 + t) * a->ldx;
    for (int r = 0; r < NR; r++) {
        if (t0 == 0) prefetch_ahead(w + (size_t)r * rb, (int)rb);
        for (int t = 0; t < MT; t++) acc0[r][t] = acc1[r][t] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < NR; r++) {
            __m256 wv[4];
            deq32(fmt, w + (size_t)r * rb, b, wv);
            for (int t = 0; t < MT; t++) {
                const float *xb = x[t] + 32 * b;
                acc0[r][t] = _mm256_fmadd_ps(wv[0], _mm256_loadu_ps(xb), acc0[r][t]);
                acc1[r][t] = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xb + 8), acc1[r][t]);
                acc0[r][t] = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xb + 16), acc0[r][t]);
                acc1[r][t] = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xb + 24), acc1[r][t]);
            }
        }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) res[r * MT + t] = hsum8(_mm256_add_ps(acc0[r][t], acc1[r][t]));
}


/* ---- prefill: K-quant rows dequantized once per token block into a float32 scratch ------------------------ */
#define MH_DEQ_SCRATCH 1

/* Rows [0, nr) of packed w, every 32-block as deq32 gives it, into dst [nr, K] float32. */
static void deq_rows(int fmt, const uint8_t *w, int64_t rb, int nr, int K, float *dst) {
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < K / 32; b++) {
            __m256 wv[4];
            switch (fmt) { /* the format as a constant in each branch */
            case MH_Q8_0: deq32(MH_Q8_0, w + (size_t)r * rb, b, wv); break;
            case MH_Q4_0: deq32(MH_Q4_0, w + (size_t)r * rb, b, wv); break;
            case MH_Q4_1: deq32(MH_Q4_1, w + (size_t)r * rb, b, wv); break;
            case MH_Q5_0: deq32(MH_Q5_0, w + (size_t)r * rb, b, wv); break;
            case MH_Q5_1: deq32(MH_Q5_1, w + (size_t)r * rb, b, wv); break;
            case MH_Q4_K: deq32(MH_Q4_K, w + (size_t)r * rb, b, wv); break;
            case MH_Q5_K: deq32(MH_Q5_K, w + (size_t)r * rb, b, wv); break;
            default: deq32(MH_Q6_K, w + (size_t)r * rb, b, wv); break;
            }
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(dst + (size_t)r * K + 32 * b + 8 * i, wv[i]);
        }
}

/* tile_q on a row already dequantized (wf [K]): the same accumulators, the same order, so the same results. */
AI void tile_qf(const float *wf, const mh_act *a, int t0, const int MT, float *res) {
    const int nb = a->K / 32;
    __m256 acc0[4], acc1[4];
    const float *x[4];
    for (int t = 0; t < MT; t++) {
        x[t] = a->x + (size_t)(t0 + t) * a->ldx;
        acc0[t] = acc1[t] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const float *wb = wf + 32 * b;
        const __m256 w0 = _mm256_loadu_ps(wb), w1 = _mm256_loadu_ps(wb + 8);
        const __m256 w2 = _mm256_loadu_ps(wb + 16), w3 = _mm256_loadu_ps(wb + 24);
        for (int t = 0; t < MT; t++) {
            const float *xb = x[t] + 32 * b;
            acc0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc1[t]);
            acc0[t] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc1[t]);
        }
    }
    for (int t = 0; t < MT; t++) res[t] = hsum8(_mm256_add_ps(acc0[t], acc1[t]));
}

AI void qf_rows(const float *wf, int K, int nrows, const mh_act *a, int t0, const int MT, const mh_part *P, int n0) {
    float res[4];
    for (int n = 0; n < nrows; n++) {
        tile_qf(wf + (size_t)n * K, a, t0, MT, res);
        store_out(P, n0 + n, t0, MT, res);
    }
}

static void tile_f_rows(const float *wf, int K, int nrows, const mh_act *a, int t0, int mt, const mh_part *P, int n0) {
    switch (mt) {
    case 1: qf_rows(wf, K, nrows, a, t0, 1, P, n0); break;
    case 2: qf_rows(wf, K, nrows, a, t0, 2, P, n0); break;
    case 3: qf_rows(wf, K, nrows, a, t0, 3, P, n0); break;
    default: qf_rows(wf, K, nrows, a, t0, 4, P, n0); break;
    }
}

#endif
