/* The K-quants' row-interleaved products 512 bits wide, for AVX-512 VNNI builds (MH_X8_ZMM): Q4_Kx8 / Q5_Kx8
 * (tile_q4kx8_z) and Q6_Kx8 (tile_q6kx8_z) two 32-element sub-blocks per vector, row i's in lanes 2i and 2i + 1,
 * as mh_dot_x86_x8z.h's tile_x8_blocks2 takes two blocks, against the same arranged activations (ACT_Z); even and
 * odd sub-blocks summed apart, so each format's products have one order in this build (decode and prefill).
 * Included by mh_dot_x86_x8k.h (its 256-bit tiles run elsewhere); knows nothing of the tiling. */
#ifndef MH_DOT_X86_X8KZ_H
#define MH_DOT_X86_X8KZ_H
#ifdef MH_X8_ZMM
/* tile_q4kx8 512 bits wide (AVX-512 VNNI): sub-blocks 2p and 2p + 1 of a super-block (the low and the high nibbles
 * of the same 8 pieces) in one vector, row i's in lanes 2i and 2i + 1, as tile_x8_blocks2 takes two blocks, against
 * the same arranged activations (ACT_Z: the sub-blocks are the activations' blocks 8s + 2p, 8s + 2p + 1); per lane
 * its sub-block's d sc and -dmin m. Even and odd sub-blocks summed apart, then the two (every Q4_K / Q5_K product
 * of this build: one order). */
AI void tile_q4kx8_z(const uint8_t *w, int nsb, const int q5, const mh_act *a, int t0, const int MT, __m256 *res) {
    const int64_t zp = zpairs(a->K);
    const __m512i low4 = _mm512_set1_epi8(15), one = _mm512_set1_epi8(1);
    __m512 acc[4], corr[4];
    for (int t = 0; t < MT; t++) acc[t] = corr[t] = _mm512_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *g = w + (size_t)s * (q5 ? 1408 : 1152), *qh = g + 128;
        if (t0 == 0) prefetch_ahead(g, q5 ? 1408 : 1152);
        const __m512 d = halves_twice(g), dmin = halves_twice(g + 16);
        for (int p = 0; p < 4; p++) {
            const int j = 2 * p;
            __m128i sc0, mn0, sc1, mn1;
            q4kx8_scale_min(g + 32, j, &sc0, &mn0);
            q4kx8_scale_min(g + 32, j + 1, &sc1, &mn1);
            const __m512 dw = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(sc0, sc1))));
            const __m512 off = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), dmin),
                                             _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(mn0, mn1))));
            const uint8_t *qs = g + (q5 ? 384 : 128) + 256 * p;
            const __m128i jj = _mm_cvtsi32_si128(j), jj1 = _mm_cvtsi32_si128(j + 1);
            __m512i u[8]; /* u[c]: elements 4c .. 4c + 3 of sub-block j (even lanes) and j + 1 (odd) */
            for (int c = 0; c < 8; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                u[c] = _mm512_and_si512(interleave256(v, _mm256_srli_epi16(v, 4)), low4);
                if (q5) { /* bit j (j + 1) of each qh byte, to 16 (16-bit shifts: the byte's own bit lands in bit 0) */
                    const __m256i hb = _mm256_loadu_si256((const __m256i *)(qh + 32 * c));
                    const __m512i h = interleave256(_mm256_srl_epi16(hb, jj), _mm256_srl_epi16(hb, jj1));
                    u[c] = _mm512_or_si512(u[c], _mm512_slli_epi16(_mm512_and_si512(h, one), 4));
                }
            }
            MH_EACH_TOKEN
            for (int t = 0; t < MT; t++)
                z_step(u, a, (size_t)(t0 + t) * zp + 4 * (size_t)s + p, dw, off, 0, acc + t, corr + t);
        }
    }
    x8z_even_odd(acc, corr, MT, res);
}

/* tile_q6kx8 512 bits wide (AVX-512 VNNI): sub-blocks 2p and 2p + 1 (their ql pieces 256 bytes apart, the same
 * nibble and the same qh bytes two bits apart) in one vector, row i's in lanes 2i and 2i + 1, against the ACT_Z
 * activations; each half's int8 scales interleaved the same way as the vpmulld multipliers, -32 d sc through the
 * arranged 16-element sums. Even and odd sub-blocks summed apart, then the two (every Q6_K product of this build).
 * The two p of a half (k = 0, 2) read the same ql bytes (low, then high nibbles) and the same qh bytes (bits 0-3,
 * then 4-7): each piece's two interleaves serve both (the qh bits by per-lane shifts), half the permutes of
 * interleaving per p. */
AI void tile_q6kx8_z(const uint8_t *w, int nsb, const mh_act *a, int t0, const int MT, __m256 *res) {
    const int64_t zp = zpairs(a->K);
    const __m512i low4 = _mm512_set1_epi8(15), three = _mm512_set1_epi8(3);
    /* per lane, the shift of sub-block j's (even lanes) and j + 1's (odd lanes) two qh bits: k = 0, then k = 2 */
    const __m512i sh0 = _mm512_set1_epi64(0x0002000200000000LL), sh2 = _mm512_set1_epi64(0x0006000600040004LL);
    __m512 acc[4], corr[4];
    for (int t = 0; t < MT; t++) acc[t] = corr[t] = _mm512_setzero_ps();
    for (int s = 0; s < nsb; s++) {
        const uint8_t *g = w + (size_t)s * 1680, *scales = g + 1536;
        if (t0 == 0) prefetch_ahead(g, 1680);
        const __m512 d = halves_twice(g + 1664);
        for (int half = 0; half < 2; half++) {
            const uint8_t *pl = g + 32 * 16 * half, *ph = g + 1024 + 32 * 8 * half;
            __m512i u0[8], u2[8]; /* k = 0 and k = 2: sub-blocks 4 half + k and + 1 */
            for (int c = 0; c < 8; c++) {
                const __m512i l = interleave256(_mm256_loadu_si256((const __m256i *)(pl + 32 * c)),
                                                _mm256_loadu_si256((const __m256i *)(pl + 256 + 32 * c)));
                const __m256i hb = _mm256_loadu_si256((const __m256i *)(ph + 32 * c));
                const __m512i h = interleave256(hb, hb);
                const __m512i h0 = _mm512_and_si512(_mm512_srlv_epi16(h, sh0), three);
                const __m512i h2 = _mm512_and_si512(_mm512_srlv_epi16(h, sh2), three);
                u0[c] = _mm512_or_si512(_mm512_and_si512(l, low4), _mm512_slli_epi16(h0, 4)); /* hi <= 3: its byte */
                u2[c] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low4), _mm512_slli_epi16(h2, 4));
            }
            for (int kk = 0; kk < 2; kk++) {
                const int k = 2 * kk, p = 2 * half + kk;
                const __m512i *u = kk ? u2 : u0;
                __m512i mul[2]; /* each half's scales, (j, j + 1) interleaved as the lanes */
                __m512 off[2];  /* and -32 d sc */
                for (int hh = 0; hh < 2; hh++) {
                    const __m128i s0 = _mm_loadl_epi64((const __m128i *)(scales + 8 * (8 * half + 2 * k + hh)));
                    const __m128i s1 = _mm_loadl_epi64((const __m128i *)(scales + 8 * (8 * half + 2 * k + 2 + hh)));
                    mul[hh] = _mm512_cvtepi8_epi32(_mm_unpacklo_epi8(s0, s1));
                    off[hh] = _mm512_mul_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(mul[hh])), _mm512_set1_ps(-32.0f));
                }
                MH_EACH_TOKEN
                for (int t = 0; t < MT; t++) {
                    const size_t z = (size_t)(t0 + t) * zp + 4 * (size_t)s + p;
                    const int8_t *x = a->qz + z * 64;
                    double ds[4];
                    memcpy(ds, a->dz + z * MH_ZF, 32);
                    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
                    for (int c = 0; c < 4; c++) {
                        s0 = _mm512_dpbusd_epi32(s0, u[c], bcast8(x + 8 * c));
                        s1 = _mm512_dpbusd_epi32(s1, u[4 + c], bcast8(x + 8 * (4 + c)));
                    }
                    const __m512i q = _mm512_add_epi32(_mm512_mullo_epi32(s0, mul[0]), _mm512_mullo_epi32(s1, mul[1]));
                    const __m512 dx = _mm512_castpd_ps(_mm512_set1_pd(ds[0]));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(d, dx), acc[t]);
                    corr[t] = _mm512_fmadd_ps(off[0], _mm512_castpd_ps(_mm512_set1_pd(ds[2])), corr[t]);
                    corr[t] = _mm512_fmadd_ps(off[1], _mm512_castpd_ps(_mm512_set1_pd(ds[3])), corr[t]);
                }
            }
        }
    }
    x8z_even_odd(acc, corr, MT, res);
}
#endif
#endif
