/* x86 integer products of the row-interleaved layouts (Q8_0x8, Q4_0x8, Q4_1x8, Q5_0x8, Q5_1x8, Q4_Kx8, Q5_Kx8,
 * Q6_Kx8; mh_kernel.h describes the bytes):
 * 8 weight rows at once against up to 4 token rows of int8 activations, AVX2. llama.cpp repacks Q4_0 for
 * AVX2 to the same end (rows side by side); this layout and its code are written here from that idea.
 *
 * A 32-byte load holds 4 quants of each of the 8 rows (lane i: row i); the token row's 4 matching int8 activations
 * are broadcast to all lanes, so vpmaddubsw + vpmaddwd give each row's partial sum in its own lane: no horizontal
 * sums, and each block's scales are one vector for the 8 rows (vcvtph2ps). Per block of 8 rows and token: 8
 * broadcasts and 8 vpmaddubsw (with VNNI: 8 vpdpbusd and no vpmaddwd), one conversion and two FMAs (against, per
 * row, a load, 2-5 integer operations, a horizontal sum's share and a scalar scale in mh_dot_x86_int.h).
 * - Q4_0 / Q4_1: the nibbles stay unsigned (0..15); the offset (-8 d, or m) is added through the activations'
 *   block sums, in a second accumulator. Low nibbles are elements 4c .. 4c + 3 of piece c, high nibbles 16 + 4c ..;
 *   eight vpmaddubsw of 4-bit by 7-bit values sum in 16 bits without overflow (8 x 2 x 15 x 127 < 2^15).
 * - Q5_0 / Q5_1: Q4's nibbles, each piece's fifth bits or-ed in from the block's fifth-bit bytes (one mask and one
 *   shift per piece: bit c of byte k is element 4 c + k's); offsets -16 d or m; 5-bit values sum in 16 bits over
 *   four pieces (4 x 2 x 31 x 127 < 2^15), so the low and the high nibbles' pieces each have their own sum.
 * - Q8_0: signed quants, as |q| times the activations with q's signs (vpsignb), summed in 32 bits per piece.
 * - K-quants: each 32-element sub-block as one such block (tile_q4kx8, tile_q6kx8), its scales per row as vectors.
 * Each (row, token) result is one accumulator sequence over the blocks, the same alone or in any batch.
 * Knows nothing of the tiling (mh_matmul.h). */
#ifndef MH_DOT_X86_X8_H
#define MH_DOT_X86_X8_H

/* Fifth-bit bytes H: bit b of each byte moved to 16 (b is a constant once inlined), the rest cleared. */
AI __m256i fifth_x8(__m256i H, const int b) {
    const __m256i x = _mm256_and_si256(H, _mm256_set1_epi8((char)(1 << b)));
    return b < 4 ? _mm256_slli_epi16(x, 4 - b) : b > 4 ? _mm256_srli_epi16(x, b - 4) : x; /* within each byte */
}

AI __m256i bcast4(const int8_t *p) { /* 4 int8 activations into every 32-bit lane */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

#ifdef MH_VNNI
/* Pieces c0 .. c1 - 1 of 8 rows (u[c]: elements 4 c .. 4 c + 3 of each row, unsigned) against the token row's
 * matching int8 activations x: [8] int32, each row's sum in its lane (two chains of vpdpbusd). */
AI __m256i vnni_pieces(const __m256i *u, const int8_t *x, int c0, int c1) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0;
    for (int c = c0; c < c1; c += 2) {
        s0 = dpbusd(s0, u[c], bcast4(x + 4 * c));
        s1 = dpbusd(s1, u[c + 1], bcast4(x + 4 * c + 4));
    }
    return _mm256_add_epi32(s0, s1);
}
#endif

/* One 32-element block of 8 rows against token rows t0 .. t0 + MT - 1, added to acc[t] (d_w d_x times the integer
 * sums) and corr[t] (off times the activations' block sums): u[c] holds elements 4 c .. 4 c + 3 of each row, u[4 + c]
 * 16 + 4 c .., unsigned; 4-bit values (wide = 0) sum in 16 bits over the 8 pieces, 5-bit ones over 4. */
AI void x8_block_tokens(const __m256i *u, const int wide, __m256 dw, __m256 off, const mh_act *a, int t0,
                        const int MT, int b, __m256 *acc, __m256 *corr) {
    const int K = a->K;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int t = 0; t < MT; t++) {
        const int8_t *x = a->q + (size_t)(t0 + t) * K + 32 * b;
#ifdef MH_VNNI
        (void)wide, (void)ones;
        const __m256i p = vnni_pieces(u, x, 0, 8); /* u[4 + c] holds elements 16 + 4 c ..: piece 4 + c */
#else
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256(); /* [16] int16 each */
        for (int c = 0; c < 4; c++) {
            s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(u[c], bcast4(x + 4 * c)));
            s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(u[c + 4], bcast4(x + 16 + 4 * c)));
        }
        const __m256i p = wide ? _mm256_add_epi32(_mm256_madd_epi16(s0, ones), _mm256_madd_epi16(s1, ones))
                               : _mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones); /* [8] int32 */
#endif
        const size_t xb = (size_t)(t0 + t) * (K / 32) + b;
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(a->d[xb])), acc[t]);
        corr[t] = _mm256_fmadd_ps(off, _mm256_set1_ps(a->s32[xb]), corr[t]);
    }
}

/* The 8 rows from w (their first byte; nb blocks) against token rows t0 .. t0 + MT - 1: res[t], lane i = row i. */
AI void tile_x8(const int fmt, const uint8_t *w, int nb, const mh_act *a, int t0, const int MT, __m256 *res) {
    const int base = x8_base(fmt), bb = fmt_block_bytes(base), hb = 8 * x8_head_bytes(base), K = a->K;
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(15);
    __m256 acc[4], corr[4];
    for (int t = 0; t < MT; t++) acc[t] = corr[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * 8 * bb, *qs = blk + hb;
        if (t0 == 0) prefetch_ahead(blk, 8 * bb);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)); /* [8] the rows' scales */
        if (base == MH_Q8_0) {
            __m256i q[8];
            for (int c = 0; c < 8; c++) q[c] = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            for (int t = 0; t < MT; t++) {
                const int8_t *x = a->q + (size_t)(t0 + t) * K + 32 * b;
#ifdef MH_VNNI
                (void)ones;
                __m256i s0 = _mm256_setzero_si256(), s1 = s0; /* [8] int32 each (|q| against x with q's signs) */
                for (int c = 0; c < 8; c += 2) {
                    s0 = dpbusd(s0, _mm256_sign_epi8(q[c], q[c]), _mm256_sign_epi8(bcast4(x + 4 * c), q[c]));
                    s1 = dpbusd(s1, _mm256_sign_epi8(q[c + 1], q[c + 1]),
                                _mm256_sign_epi8(bcast4(x + 4 * c + 4), q[c + 1]));
                }
                const __m256i s = _mm256_add_epi32(s0, s1);
#else
                __m256i s = _mm256_setzero_si256(); /* [8] int32 */
                for (int c = 0; c < 8; c++) {
                    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q[c], q[c]),
                                                           _mm256_sign_epi8(bcast4(x + 4 * c), q[c]));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                }
#endif
                const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(a->d[(size_t)(t0 + t) * (K / 32) + b]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
            }
        } else {
            const int q5 = base == MH_Q5_0 || base == MH_Q5_1, with_m = base == MH_Q4_1 || base == MH_Q5_1;
            const __m256 off = with_m ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)))
                                      : _mm256_mul_ps(dw, _mm256_set1_ps(q5 ? -16.0f : -8.0f));
            const uint8_t *nib = qs + (q5 ? 32 : 0); /* Q5: the fifth-bit bytes come first */
            __m256i u[8]; /* low nibbles: elements 0-15, high nibbles: 16-31 */
            for (int c = 0; c < 4; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(nib + 32 * c));
                u[c] = _mm256_and_si256(v, low4);
                u[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            }
            if (q5) {
                const __m256i H = _mm256_loadu_si256((const __m256i *)qs);
                u[0] = _mm256_or_si256(u[0], fifth_x8(H, 0));
                u[1] = _mm256_or_si256(u[1], fifth_x8(H, 1));
                u[2] = _mm256_or_si256(u[2], fifth_x8(H, 2));
                u[3] = _mm256_or_si256(u[3], fifth_x8(H, 3));
                u[4] = _mm256_or_si256(u[4], fifth_x8(H, 4));
                u[5] = _mm256_or_si256(u[5], fifth_x8(H, 5));
                u[6] = _mm256_or_si256(u[6], fifth_x8(H, 6));
                u[7] = _mm256_or_si256(u[7], fifth_x8(H, 7));
            }
            x8_block_tokens(u, q5, dw, off, a, t0, MT, b, acc, corr);
        }
    }
    for (int t = 0; t < MT; t++) res[t] = _mm256_add_ps(acc[t], corr[t]);
}

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
    const __m256i low4 = _mm256_set1_epi8(15);
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
            __m256i u[8];
            for (int c = 0; c < 8; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                u[c] = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(v, 4) : v, low4);
                if (q5) { /* bit j of each qh byte, to 16 (16-bit shifts: the byte's own bit lands in bit 0) */
                    const __m256i h = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(qh + 32 * c)), jj);
                    u[c] = _mm256_or_si256(u[c], _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 4));
                }
            }
            x8_block_tokens(u, q5, dw, off, a, t0, MT, b, acc, corr);
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

/* nrows (a multiple of 8) rows from w, the first n0, against token rows t0 .. t0 + MT - 1, stored 8 at a time. */
AI void x8_rows(const int fmt, const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0, const int MT,
                const mh_part *P, int n0) {
    __m256 res[4];
    for (int g = 0; g < nrows; g += 8) {
        if (fmt == MH_Q4_KX8 || fmt == MH_Q5_KX8)
            tile_q4kx8(w + (size_t)g * rb, a->K / 256, fmt == MH_Q5_KX8, a, t0, MT, res);
        else if (fmt == MH_Q6_KX8)
            tile_q6kx8(w + (size_t)g * rb, a->K / 256, a, t0, MT, res);
        else
            tile_x8(fmt, w + (size_t)g * rb, a->K / 32, a, t0, MT, res);
        const int n = n0 + g;
        const __m256 bias = P->bias ? _mm256_loadu_ps(P->bias + n) : _mm256_setzero_ps();
        for (int t = 0; t < MT; t++) {
            float *o = P->out + (size_t)(t0 + t) * P->ldo + n;
            const __m256 v = _mm256_add_ps(res[t], bias);
            _mm256_storeu_ps(o, P->accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), v) : v);
        }
    }
}

#endif
