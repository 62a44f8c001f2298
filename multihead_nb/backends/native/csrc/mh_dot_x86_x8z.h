/* The row-interleaved layouts' products 512 bits wide, for AVX-512 VNNI builds (MH_X8_ZMM): Q8_0x8 .. Q5_1x8 two
 * consecutive blocks of a group of 8 rows per vector (tile_x8_blocks2: decode, and Q8_0's prefill) and Q4_0x8 ..
 * Q5_1x8 two groups per vector (tile_x8_groups2: prefill), both summing even and odd blocks apart, so one format's
 * products have one order in this build. Where the CPU runs 512-bit operations on 256-bit units (Zen 4:
 * MH_X8_Q8_YMM, set by cpu_isa.py), Q8_0x8's decode takes the 256-bit tile_x8 instead (bench/README.md: Q8_0
 * steps 6-15% faster there) and its prefill tile_x8_groups2 with every block in one chain, in tile_x8's order.
 * Included by mh_dot_x86_x8.h, whose 256-bit tiles the other builds (and the K-quants here) run; reads the
 * activations as mh_matmul.h arranges them (ACT_Z). Knows nothing of the tiling. */
#ifndef MH_DOT_X86_X8Z_H
#define MH_DOT_X86_X8Z_H
#if defined(MH_VNNI) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MH_X8_ZMM 1 /* AVX-512 VNNI: Q8_0x8 .. Q5_1x8 two blocks per 512-bit vector (tile_x8_blocks2) */
/* 32 bytes at p and 32 at p + gb as one vector: p's in the low half, p + gb's in the high. */
AI __m512i load_groups(const uint8_t *p, int64_t gb) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                              _mm256_loadu_si256((const __m256i *)(p + gb)), 1);
}

/* 8 half-precision values at p and 8 at p + gb: [16] float32. */
AI __m512 halves_groups(const uint8_t *p, int64_t gb) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                                   _mm_loadu_si128((const __m128i *)(p + gb)), 1));
}

/* Fifth-bit bytes H (512 bits): bit b of each byte moved to 16 (b a constant once inlined), the rest cleared. */
AI __m512i fifth_zmm(__m512i H, const int b) {
    const __m512i x = _mm512_and_si512(H, _mm512_set1_epi8((char)(1 << b)));
    return b < 4 ? _mm512_slli_epi16(x, 4 - b) : b > 4 ? _mm512_srli_epi16(x, b - 4) : x; /* within each byte */
}

/* Each piece u[c]'s fifth bits (bit c of the bytes H, byte for byte with u's) or-ed in above its nibbles. */
AI void or_fifth_zmm(__m512i H, __m512i *u) {
    u[0] = _mm512_or_si512(u[0], fifth_zmm(H, 0)), u[1] = _mm512_or_si512(u[1], fifth_zmm(H, 1));
    u[2] = _mm512_or_si512(u[2], fifth_zmm(H, 2)), u[3] = _mm512_or_si512(u[3], fifth_zmm(H, 3));
    u[4] = _mm512_or_si512(u[4], fifth_zmm(H, 4)), u[5] = _mm512_or_si512(u[5], fifth_zmm(H, 5));
    u[6] = _mm512_or_si512(u[6], fifth_zmm(H, 6)), u[7] = _mm512_or_si512(u[7], fifth_zmm(H, 7));
}

/* A block's offsets per lane (its scales dw): m (Q4_1 / Q5_1, after the 8 scales; the block at blk and the one gb
 * bytes on) or -8 d (Q4_0; Q5_0 -16 d). */
AI __m512 offsets_groups(const int base, const uint8_t *blk, int64_t gb, __m512 dw) {
    if (base == MH_Q4_1 || base == MH_Q5_1) return halves_groups(blk + 16, gb);
    return _mm512_mul_ps(dw, _mm512_set1_ps(base == MH_Q5_0 ? -16.0f : -8.0f));
}

/* The unsigned values of a block's 8 pieces for 16 lanes (the block at qs: lanes 0-7, the next group's, gb bytes
 * on: 8-15): u[c] elements 4c .. 4c + 3 of each row (low nibbles), u[4 + c] 16 + 4c .. (high); with q5 (its
 * fifth-bit bytes at qs, the nibbles after them) each element's fifth bit or-ed in. */
AI void x8_unpack_zmm(const uint8_t *qs, int64_t gb, const int q5, __m512i *u) {
    const __m512i low4 = _mm512_set1_epi8(15);
    for (int c = 0; c < 4; c++) {
        const __m512i v = load_groups(qs + (q5 ? 32 : 0) + 32 * c, gb);
        u[c] = _mm512_and_si512(v, low4);
        u[4 + c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    if (q5) or_fifth_zmm(load_groups(qs, gb), u);
}

/* The dwords of x and y interleaved: x's dword i in lane 2i, y's in lane 2i + 1 (one vpermt2d). */
AI __m512i interleave256(__m256i x, __m256i y) {
    const __m512i idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutex2var_epi32(_mm512_castsi256_si512(x), idx, _mm512_castsi256_si512(y));
}

/* 8 half-precision values at p (one per row), each in two lanes (2i and 2i + 1): [16] float32. */
AI __m512 halves_twice(const uint8_t *p) {
    const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    return _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p))));
}

/* 32 bytes at p and 32 at p + gb (two = 0: zeros in place of the second) with their dwords interleaved: dword i of
 * p's in lane 2i, of p + gb's in lane 2i + 1. */
AI __m512i load_interleaved(const uint8_t *p, int64_t gb, int two) {
    const __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(p + gb)) : _mm256_setzero_si256();
    return interleave256(_mm256_loadu_si256((const __m256i *)p), hi);
}

/* 8 half-precision values at p and 8 at p + gb (two = 0: zeros in place of the second), interleaved as
 * load_interleaved's lanes: [16] float32. */
AI __m512 halves_interleaved(const uint8_t *p, int64_t gb, int two) {
    const __m128i x = _mm_loadu_si128((const __m128i *)p);
    const __m128i y = two ? _mm_loadu_si128((const __m128i *)(p + gb)) : _mm_setzero_si128();
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_unpackhi_epi16(x, y), _mm_unpacklo_epi16(x, y)));
}

/* The 8 bytes at p in every 64-bit lane, straight from memory (a copy on the stack first costs a store each). */
AI __m512i bcast8(const int8_t *p) { return _mm512_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)p)); }

/* Sums with row i's even blocks in lane 2i and its odd ones in lane 2i + 1 (acc[t], corr[t]) -> res[t], lane i =
 * row i: (even blocks' sum + offsets) + (odd blocks' sum + offsets). */
AI void x8z_even_odd(const __m512 *acc, const __m512 *corr, const int MT, __m256 *res) {
    const __m512i even_odd = _mm512_set_epi32(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0);
    for (int t = 0; t < MT; t++) {
        const __m512 r = _mm512_permutexvar_ps(even_odd, _mm512_add_ps(acc[t], corr[t]));
        res[t] = _mm256_add_ps(_mm512_castps512_ps256(r),
                               _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)));
    }
}

/* One token row's two blocks (or sub-blocks) against their 8 unpacked pieces u (lanes 2i, 2i + 1: row i's even
 * and odd block): the arranged activations' piece z (one 64-bit broadcast per vpdpbusd), the integer sums (Q8_0's
 * less 128 times the activations' sums: its q + 128) times d_w d_x into acc, off times the activations' sums into
 * corr (not Q8_0). */
AI void z_step(const __m512i *u, const mh_act *a, size_t z, __m512 dw, __m512 off, const int q8, __m512 *acc,
               __m512 *corr) {
    const int8_t *x = a->qz + z * 64;
    double ds[2];
    memcpy(ds, a->dz + z * MH_ZF, 16);
    __m512i s0 = _mm512_setzero_si512(), s1 = s0;
    for (int c = 0; c < 8; c += 2) {
        s0 = _mm512_dpbusd_epi32(s0, u[c], bcast8(x + 8 * c));
        s1 = _mm512_dpbusd_epi32(s1, u[c + 1], bcast8(x + 8 * c + 8));
    }
    __m512i sum = _mm512_add_epi32(s0, s1);
    if (q8) { /* the sum of q x: exactly tile_x8's integers */
        int64_t n;
        memcpy(&n, a->iz + z * 2, 8);
        sum = _mm512_sub_epi32(sum, _mm512_set1_epi64(n));
    }
    const __m512 dx = _mm512_castpd_ps(_mm512_set1_pd(ds[0])), sx = _mm512_castpd_ps(_mm512_set1_pd(ds[1]));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, dx), *acc);
    if (!q8) *corr = _mm512_fmadd_ps(off, sx, *corr);
}

/* 8 rows of Q8_0x8 / Q4_0x8 / Q4_1x8 / Q5_0x8 / Q5_1x8 (nb blocks) against MT (<= 8) token rows t0 ..: res[t], lane i =
 * row i. Two consecutive blocks per 512-bit vector (row i of block 2j in lane 2i, of block 2j + 1 in lane 2i + 1), so
 * the rows are read as one stream (the blocks are adjacent) and each vpdpbusd and FMA serves two blocks: per two blocks
 * and token row 8 vpdpbusd where tile_x8 takes 16. The activations come arranged for these lanes (ACT_Z, arrange_z_row:
 * one 64-bit broadcast per vpdpbusd), so a token row costs no shuffle; the weights' 4 permutes per two blocks serve
 * every token row. Each (row, token) sums its even blocks in one lane and its odd blocks in another, then the two:
 * every product of these formats in this build sums in that order (decode and prefill alike), so a token's result is
 * the same alone or in any batch. */
AI void tile_x8_blocks2(const int fmt, const uint8_t *w, int nb, const mh_act *a, int t0, const int MT, __m256 *res) {
    const int base = x8_base(fmt), bb = fmt_block_bytes(base), hb = 8 * x8_head_bytes(base), K = a->K;
    const int64_t gbb = 8 * (int64_t)bb, zp = zpairs(K); /* one block of the 8 rows; ACT_Z pieces per row */
    const int q5 = base == MH_Q5_0 || base == MH_Q5_1, q8 = base == MH_Q8_0;
    const __m512i low4 = _mm512_set1_epi8(15), flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[8], corr[8];
    for (int t = 0; t < MT; t++) acc[t] = corr[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b += 2) {
        const uint8_t *blk = w + (size_t)b * gbb, *qs = blk + hb;
        const int two = b + 1 < nb; /* the last of an odd count alone: the odd lanes stay zero */
        if (t0 == 0) prefetch_ahead(blk, 2 * (int)gbb);
        __m512i u[8]; /* u[c]: elements 4c .. 4c + 3 (Q4 / Q5: low nibbles), u[4 + c]: 16 + 4c .. (high) */
        if (q8) /* signed quants plus 128: unsigned, vpdpbusd's left operand (the 128s taken off in integers) */
            for (int c = 0; c < 8; c++) u[c] = _mm512_xor_si512(load_interleaved(qs + 32 * c, gbb, two), flip);
        else
            for (int c = 0; c < 4; c++) {
                const __m512i v = load_interleaved(qs + (q5 ? 32 : 0) + 32 * c, gbb, two);
                u[c] = _mm512_and_si512(v, low4);
                u[4 + c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
        if (q5) or_fifth_zmm(load_interleaved(qs, gbb, two), u);
        const __m512 dw = halves_interleaved(blk, gbb, two);
        const __m512 off = base == MH_Q4_1 || base == MH_Q5_1
                               ? halves_interleaved(blk + 16, gbb, two)
                               : _mm512_mul_ps(dw, _mm512_set1_ps(base == MH_Q5_0 ? -16.0f : -8.0f));
        MH_EACH_TOKEN
        for (int t = 0; t < MT; t++) z_step(u, a, (size_t)(t0 + t) * zp + b / 2, dw, off, q8, acc + t, corr + t);
    }
    x8z_even_odd(acc, corr, MT, res);
}

/* Block b of two groups against MT token rows, added to acc[t] and corr[t] (tile_x8_groups2's step). Q8_0 (its
 * prefill where MH_X8_Q8_YMM takes its decode 256 bits wide): q + 128 against the activations less 128 times their
 * block sum, no offsets: each lane tile_x8's integers and float operations. */
AI void groups2_block(const int base, const uint8_t *blk, int64_t gb, int hb, const mh_act *a, int t0, const int MT,
                      int b, __m512 *acc, __m512 *corr) {
    const uint8_t *qs = blk + hb;
    const int K = a->K, q5 = base == MH_Q5_0 || base == MH_Q5_1, q8 = base == MH_Q8_0;
    __m512i u[8]; /* u[c]: elements 4 (c % 4) + 16 (c / 4) .. + 3 of each row (Q8_0: piece c, the same elements) */
    if (q8)
        for (int c = 0; c < 8; c++) u[c] = _mm512_xor_si512(load_groups(qs + 32 * c, gb), _mm512_set1_epi8((char)0x80));
    else
        x8_unpack_zmm(qs, gb, q5, u);
    const __m512 dw = halves_groups(blk, gb), off = q8 ? _mm512_setzero_ps() : offsets_groups(base, blk, gb, dw);
    for (int t = 0; t < MT; t++) {
        const int8_t *x = a->q + (size_t)(t0 + t) * K + 32 * b;
        __m512i s0 = _mm512_setzero_si512(), s1 = s0;
        for (int c = 0; c < 8; c += 2) {
            int32_t x0, x1;
            memcpy(&x0, x + 4 * (c % 4) + 16 * (c / 4), 4);
            memcpy(&x1, x + 4 * (c % 4) + 4 + 16 * (c / 4), 4);
            s0 = _mm512_dpbusd_epi32(s0, u[c], _mm512_set1_epi32(x0));
            s1 = _mm512_dpbusd_epi32(s1, u[c + 1], _mm512_set1_epi32(x1));
        }
        __m512i sum = _mm512_add_epi32(s0, s1);
        if (q8) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(a->iz[(size_t)(t0 + t) * 2 * zpairs(K) + b]));
        const size_t xb = (size_t)(t0 + t) * (K / 32) + b;
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(a->d[xb])), acc[t]);
        if (!q8) corr[t] = _mm512_fmadd_ps(off, _mm512_set1_ps(a->s32[xb]), corr[t]);
    }
}

/* Prefill's form of tile_x8_blocks2: two groups of 8 rows (the second gb bytes after the first) in one 512-bit
 * vector (lane 8 g + i: row i of group g) against MT (<= 4) token rows, the rows from L2: each activation broadcast
 * straight from memory serves both groups (tile_x8_blocks2 moves every token row's activations into place with 10
 * shuffles per two blocks). Even and odd blocks go to accumulators of their own and meet at the end, so each (row,
 * token) is the same float operations in the same order as in tile_x8_blocks2: the same bits. Q8_0 (only where
 * MH_X8_Q8_YMM decodes it with tile_x8): every block into one chain, tile_x8's order (acc + 0 as its acc + corr; the
 * odd chain stays 0 and adds nothing). res[g * MT + t]. */
AI void tile_x8_groups2(const int fmt, const uint8_t *w, int64_t gb, int nb, const mh_act *a, int t0, const int MT,
                        __m256 *res) {
    const int base = x8_base(fmt), bb = fmt_block_bytes(base), hb = 8 * x8_head_bytes(base);
    __m512 acc0[4], corr0[4], acc1[4], corr1[4]; /* even blocks', odd blocks' */
    for (int t = 0; t < MT; t++) acc0[t] = corr0[t] = acc1[t] = corr1[t] = _mm512_setzero_ps();
    const int chain = base == MH_Q8_0; /* blocks in sequence, as tile_x8 */
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        groups2_block(base, w + (size_t)b * 8 * bb, gb, hb, a, t0, MT, b, acc0, corr0);
        groups2_block(base, w + (size_t)(b + 1) * 8 * bb, gb, hb, a, t0, MT, b + 1, chain ? acc0 : acc1,
                      chain ? corr0 : corr1);
    }
    if (b < nb) groups2_block(base, w + (size_t)b * 8 * bb, gb, hb, a, t0, MT, b, acc0, corr0);
    for (int t = 0; t < MT; t++) {
        const __m512 r = _mm512_add_ps(_mm512_add_ps(acc0[t], corr0[t]), _mm512_add_ps(acc1[t], corr1[t]));
        res[t] = _mm512_castps512_ps256(r);
        res[MT + t] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1));
    }
}
#endif

#endif
