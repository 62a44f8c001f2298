/* x86 integer products of the K-quants' row-interleaved layouts (Q4_Kx8, Q5_Kx8, Q6_Kx8; mh_kernel.h describes
 * the bytes), each 32-element sub-block as one block of mh_dot_x86_x8.h's kind with its scales per row as vectors;
 * and x8_rows, the loop over a part's groups of 8 rows that every interleaved tile runs in. Knows nothing of the
 * tiling above the rows (mh_matmul.h). Included by mh_dot_x86_x8.h. */
#ifndef MH_DOT_X86_X8K_H
#define MH_DOT_X86_X8K_H

#define MH_X8_PAIRS 8 /* token rows from which Q4_0 / Q4_1 rows go two groups at a time (x8_rows) */

/* Sub-block j's 6-bit scales and mins of the 8 rows (sc, mn: 8 bytes each, row i in byte i) from a Q4_Kx8
 * super-block's scale bytes s (byte k of row i at 8 k + i): q4k_scale_min for 8 rows at once. */
AI void q4kx8_scale_min(const uint8_t *s, int j, __m128i *sc, __m128i *mn) {
#define MH_B8(k) _mm_loadl_epi64((const __m128i *)(s + 8 * (k)))
    const __m128i m6 = _mm_set1_epi8(63), m4 = _mm_set1_epi8(15), m2 = _mm_set1_epi8(3);
    if (j < 4) {
        *sc = _mm_and_si128(MH_B8(j), m6);
        *mn = _mm_and_si128(MH_B8(j + 4), m6);
    } else { /* low nibble / high nibble of byte j + 4, the top 2 bits of byte j - 4 / j above them */
        const __m128i b = MH_B8(j + 4);
        const __m128i top_s = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(MH_B8(j - 4), 6), m2), 4);
        const __m128i top_m = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(MH_B8(j), 6), m2), 4);
        *sc = _mm_or_si128(_mm_and_si128(b, m4), top_s);
        *mn = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(b, 4), m4), top_m);
    }
#undef MH_B8
}

/* 8 unsigned bytes as 8 floats. */
AI __m256 bytes8_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }

/* Q4_Kx8 (q5 = 0) or Q5_Kx8: the 8 rows from w (nsb super-blocks of 1152 or 1408 bytes) against token rows t0 ..
 * t0 + MT - 1: each 32-element sub-block j as a Q4_1x8 block, its 8 pieces' low (even j) or high (odd j) nibbles
 * (Q5_K: bit j of the matching qh piece's bytes above them, 5-bit values summed in 16 bits over 4 pieces), the
 * rows' d sc_j and dmin m_j as vectors (the 6-bit fields unpacked for the 8 rows at once); res[t], lane i = row i. */
AI void tile_q4kx8(const uint8_t *w, int nsb, const int q5, const mh_act *a, int t0, const int MT, __m256 *res) {
    __m256 acc[4], corr[4];
    for (int t = 0; t < MT; t++) acc[t] = corr[t] = _mm256_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *g = w + (size_t)s * (q5 ? 1408 : 1152);
        if (t0 == 0) prefetch_ahead(g, q5 ? 1408 : 1152);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 16)));
        for (int j = 0; j < 8; j++) {
            const int b = 8 * s + j;
            __m128i sc, mn;
            q4kx8_scale_min(g + 32, j, &sc, &mn);
            const __m256 dw = _mm256_mul_ps(d, bytes8_ps(sc));     /* [8] d sc_j */
            const __m256 off = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), dmin), bytes8_ps(mn)); /* -dmin m_j */
            const uint8_t *qs = g + (q5 ? 384 : 128) + 256 * (j / 2), *qh = g + 128;
            const __m128i jj = _mm_cvtsi32_si128(j);
            __m256i sum[4];
            for (int h = 0; h < 2; h++) {
                __m256i u[4];
                x8_unpack(qs, 0, j & 1, 4 * h, 4, u);
                if (q5)
                    for (int c = 0; c < 4; c++) { /* bit j of each qh byte, to 16 (16-bit shifts: the byte's own bit
                                                     lands in bit 0) */
                        const __m256i hb = _mm256_srl_epi16(
                            _mm256_loadu_si256((const __m256i *)(qh + 32 * (4 * h + c))), jj);
                        u[c] = _mm256_or_si256(u[c], _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(1)), 4));
                    }
                x8_half_tokens(u, h, q5, a, t0, MT, b, sum);
            }
            x8_scale_tokens(sum, q5, dw, a, t0, MT, b, acc);
            x8_offset_tokens(off, a, t0, MT, b, corr);
        }
    }
    for (int t = 0; t < MT; t++) res[t] = _mm256_add_ps(acc[t], corr[t]);
}

/* Q6_Kx8: the 8 rows from w (nsb super-blocks of 1680 bytes) against token rows t0 .. t0 + MT - 1: each 32-element
 * sub-block j from 8 ql and 8 qh pieces (6-bit unsigned quants), its two halves' int8 scales of the 8 rows as the
 * vpmaddwd multipliers (pairs of pieces summed in 16 bits: 2 x 2 x 63 x 127 < 2^15), d per row, and -32 d sc per
 * half through the activations' 16-element sums; res[t], lane i = row i. */
AI void tile_q6kx8(const uint8_t *w, int nsb, const mh_act *a, int t0, const int MT, __m256 *res) {
    const int K = a->K;
    const __m256i low4 = _mm256_set1_epi8(15), three = _mm256_set1_epi8(3), lo16 = _mm256_set1_epi32(0xffff);
    __m256 acc[4], corr[4];
    for (int t = 0; t < MT; t++) acc[t] = corr[t] = _mm256_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *g = w + (size_t)s * 1680, *scales = g + 1536;
        if (t0 == 0) prefetch_ahead(g, 1680);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 1664)));
        for (int j = 0; j < 8; j++) {
            const int half = j / 4, k = j % 4, b = 8 * s + j;
            const uint8_t *pl = g + 32 * (16 * half + 8 * (k & 1)), *ph = g + 1024 + 32 * 8 * half;
            const __m128i shift = _mm_cvtsi32_si128(2 * k);
            __m256i u[8];
            for (int c = 0; c < 8; c++) {
                __m256i l = _mm256_loadu_si256((const __m256i *)(pl + 32 * c));
                l = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(l, 4) : l, low4);
                const __m256i h = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(ph + 32 * c)),
                                                                    shift), three);
                u[c] = _mm256_or_si256(l, _mm256_slli_epi16(h, 4)); /* h <= 3: stays in its byte */
            }
            __m256i pair[2]; /* the halves' scales: int32 (VNNI), or int16 twice per 32-bit lane */
            __m256 off[2];
            for (int hh = 0; hh < 2; hh++) { /* and -32 d sc */
                const uint8_t *sc8 = scales + 8 * (8 * half + 2 * k + hh); /* scale 8 half + 2 k + hh of each row */
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)sc8));
#ifdef MH_VNNI
                (void)lo16;
                pair[hh] = v;
#else
                pair[hh] = _mm256_or_si256(_mm256_and_si256(v, lo16), _mm256_slli_epi32(v, 16));
#endif
                off[hh] = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(v)), _mm256_set1_ps(-32.0f));
            }
            for (int t = 0; t < MT; t++) {
                const int8_t *x = a->q + (size_t)(t0 + t) * K + 32 * b;
#ifdef MH_VNNI
                const __m256i p = _mm256_add_epi32(_mm256_mullo_epi32(vnni_pieces(u, x, 0, 4), pair[0]),
                                                   _mm256_mullo_epi32(vnni_pieces(u, x, 4, 8), pair[1]));
#else
                __m256i p = _mm256_setzero_si256(); /* [8] int32 */
                for (int c = 0; c < 8; c += 2) {
                    const __m256i s2 = _mm256_add_epi16(_mm256_maddubs_epi16(u[c], bcast4(x + 4 * c)),
                                                        _mm256_maddubs_epi16(u[c + 1], bcast4(x + 4 * c + 4)));
                    p = _mm256_add_epi32(p, _mm256_madd_epi16(s2, pair[c / 4]));
                }
#endif
                const size_t xb = (size_t)(t0 + t) * (K / 32) + b;
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(d, _mm256_set1_ps(a->d[xb])), acc[t]);
                corr[t] = _mm256_fmadd_ps(off[0], _mm256_set1_ps(a->s16[2 * xb]), corr[t]);
                corr[t] = _mm256_fmadd_ps(off[1], _mm256_set1_ps(a->s16[2 * xb + 1]), corr[t]);
            }
        }
    }
    for (int t = 0; t < MT; t++) res[t] = _mm256_add_ps(acc[t], corr[t]);
}

#include "mh_dot_x86_x8kz.h"

/* Results res[t] of the 8 rows n .. n + 7 for token rows t0 .. t0 + MT - 1 into the part's output (+ bias). */
AI void x8_store(const mh_part *P, int n, int t0, const int MT, const __m256 *res) {
    const __m256 bias = P->bias ? _mm256_loadu_ps(P->bias + n) : _mm256_setzero_ps();
    for (int t = 0; t < MT; t++) {
        float *o = P->out + (size_t)(t0 + t) * P->ldo + n;
        const __m256 v = _mm256_add_ps(res[t], bias);
        _mm256_storeu_ps(o, P->accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), v) : v);
    }
}

/* nrows (a multiple of 8) rows from w, the first n0, against token rows t0 .. t0 + MT - 1, stored 8 at a time. In
 * prefill (8+ token rows), Q4_0 / Q4_1 against 2 or 3 token rows two groups at a time (tile_x8_pair: 29-30% less time
 * than tile_x8 on Zen 3 with the rows in L2; for Q5_0 / Q5_1 20-25% more, their fifth bits' registers spilled). Not in
 * decode: there the rows come from memory, and two streams per thread read slower than one (a 3-row product of 64 MiB
 * of Q4_0 took 3.8-4.1 ms against 2.8, as bfloat16's pairs do, mh_dot_x86.h). With AVX-512 VNNI, Q8_0 / Q4_0 / Q4_1 /
 * Q5_0 / Q5_1 take two blocks per 512-bit vector (tile_x8_blocks2; one stream: two groups side by side read 10-15%
 * slower at one token row and 1.3-2.1x slower at three), Q4 / Q5 in prefill two groups per broadcast (tile_x8_groups2;
 * 32 registers: no spills), both with even and odd blocks summed apart: on Zen 5, 576 columns, a 3-row Q4_0 product of
 * 64 MiB 1.30 -> 1.09-1.13 ms (1 row: 1.02-1.06), a 128-row product's arithmetic 43 -> 27 ms. With the activations
 * arranged for its lanes once per product (ACT_Z) instead of 10 shuffles per two blocks and token row,
 * tile_x8_blocks2's 3-row arithmetic 1.00 -> 0.69 ms (Q5_0 0.98 -> 0.74; 1 row 0.43 -> 0.37), and a 3-row product from
 * memory takes the 1-row time (0.96 against 0.95 ms). Q8_0 goes the same way (decode and prefill; tile_x8's 256 bits
 * with vpsignb before): 3-row arithmetic 0.72 -> 0.44 ms, 1 row 0.46 -> 0.27, a 128-token Q8_0 prefill 63 -> 45 ms. */
AI void x8_rows(const int fmt, const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0, const int MT,
                const mh_part *P, int n0) {
    __m256 res[8];
    int g = 0;
#ifdef MH_X8_ZMM
    if (fmt == MH_Q4_KX8 || fmt == MH_Q5_KX8 || fmt == MH_Q6_KX8) {
        for (; g < nrows; g += 8) {
            if (fmt == MH_Q6_KX8)
                tile_q6kx8_z(w + (size_t)g * rb, a->K / 256, a, t0, MT, res);
            else
                tile_q4kx8_z(w + (size_t)g * rb, a->K / 256, fmt == MH_Q5_KX8, a, t0, MT, res);
            x8_store(P, n0 + g, t0, MT, res);
        }
        return;
    }
    if (fmt == MH_Q8_0X8 || fmt == MH_Q4_0X8 || fmt == MH_Q4_1X8 || fmt == MH_Q5_0X8 || fmt == MH_Q5_1X8) {
        /* every product of a format: one order. Zen 4 (MH_X8_Q8_YMM): Q8_0's decode 256 bits wide (tile_x8), its
         * prefill two groups per vector in tile_x8's order (tile_x8_groups2) */
#ifdef MH_X8_Q8_YMM
        const int ymm = fmt == MH_Q8_0X8;
#else
        const int ymm = 0;
#endif
        if (a->T >= MH_X8_PAIRS && (fmt != MH_Q8_0X8 || ymm)) /* prefill: rows from L2, two groups per broadcast */
            for (; g + 16 <= nrows; g += 16) {
                tile_x8_groups2(fmt, w + (size_t)g * rb, 8 * rb, a->K / 32, a, t0, MT, res);
                x8_store(P, n0 + g, t0, MT, res);
                x8_store(P, n0 + g + 8, t0, MT, res + MT);
            }
        for (; g < nrows; g += 8) {
            if (ymm)
                tile_x8(fmt, w + (size_t)g * rb, a->K / 32, a, t0, MT, res);
            else
                tile_x8_blocks2(fmt, w + (size_t)g * rb, a->K / 32, a, t0, MT, res);
            x8_store(P, n0 + g, t0, MT, res);
        }
        return;
    }
#endif
    if (a->T >= MH_X8_PAIRS && (MT == 2 || MT == 3) && (fmt == MH_Q4_0X8 || fmt == MH_Q4_1X8))
        for (; g + 16 <= nrows; g += 16) {
            tile_x8_pair(fmt, w + (size_t)g * rb, 8 * rb, a->K / 32, a, t0, MT, res);
            x8_store(P, n0 + g, t0, MT, res);
            x8_store(P, n0 + g + 8, t0, MT, res + MT);
        }
    for (; g < nrows; g += 8) {
        if (fmt == MH_Q4_KX8 || fmt == MH_Q5_KX8)
            tile_q4kx8(w + (size_t)g * rb, a->K / 256, fmt == MH_Q5_KX8, a, t0, MT, res);
        else if (fmt == MH_Q6_KX8)
            tile_q6kx8(w + (size_t)g * rb, a->K / 256, a, t0, MT, res);
        else
            tile_x8(fmt, w + (size_t)g * rb, a->K / 32, a, t0, MT, res);
        x8_store(P, n0 + g, t0, MT, res);
    }
}

#endif
