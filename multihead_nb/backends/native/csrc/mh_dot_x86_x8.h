/* x86 integer products of the row-interleaved layouts (Q8_0x8, Q4_0x8, Q4_1x8, Q5_0x8, Q5_1x8, Q4_Kx8, Q5_Kx8,
 * Q6_Kx8; mh_kernel.h describes the bytes):
 * 8 weight rows at once against up to 4 token rows of int8 activations, AVX2. With AVX-512 VNNI every one of these
 * formats runs 512 bits wide instead: two blocks (sub-blocks) per vector against activations arranged once per
 * product (mh_dot_x86_x8z.h, the K-quants mh_dot_x86_x8kz.h). llama.cpp repacks Q4_0 for AVX2 to the same end
 * (rows side by side); this layout and its code are written here from that idea.
 *
 * A 32-byte load holds 4 quants of each of the 8 rows (lane i: row i); the token row's 4 matching int8 activations
 * are broadcast to all lanes, so vpmaddubsw + vpmaddwd give each row's partial sum in its own lane: no horizontal
 * sums, and each block's scales are one vector for the 8 rows (vcvtph2ps). Per block of 8 rows and token: 8
 * broadcasts and 8 vpmaddubsw (with VNNI: 8 vpdpbusd and no vpmaddwd), one conversion and two FMAs (against, per
 * row, a load, 2-5 integer operations, a horizontal sum's share and a scalar scale in mh_dot_x86_int.h).
 * On Zen 3 these loops are bound by the FP unit's loads and stores (2 a cycle) and its 4 pipes, not by the
 * multiplies: with several token rows, the 4- and 5-bit blocks go half by half (4 unpacked vectors live, not 8) and
 * a token row at a time (an empty volatile asm between token rows: GCC otherwise hoists every row's products and
 * spills them), so nothing is spilled: 10-18% less time for 3-4 token rows with the rows in L2 (bench/README.md;
 * Q8_0 and Q6_K keep one pass). In prefill, Q4_0 / Q4_1 go two groups of 8 rows per broadcast (tile_x8_pair).
 * - Q4_0 / Q4_1: the nibbles stay unsigned (0..15); the offset (-8 d, or m) is added through the activations'
 *   block sums, in a second accumulator. Low nibbles are elements 4c .. 4c + 3 of piece c, high nibbles 16 + 4c ..;
 *   eight vpmaddubsw of 4-bit by 7-bit values sum in 16 bits without overflow (8 x 2 x 15 x 127 < 2^15).
 * - Q5_0 / Q5_1: Q4's nibbles, each piece's fifth bits or-ed in from the block's fifth-bit bytes (one mask and one
 *   shift per piece: bit c of byte k is element 4 c + k's); offsets -16 d or m; 5-bit values sum in 16 bits over
 *   four pieces (4 x 2 x 31 x 127 < 2^15), so the low and the high nibbles' pieces each have their own sum.
 * - Q8_0: signed quants, as |q| times the activations with q's signs (vpsignb), summed in 32 bits per piece; with
 *   VNNI (256 and 512 bits wide) as q + 128, unsigned, and 128 times the activations' block sum (iz) taken off
 *   after: the same integers without the two vpsignb per piece and token row (Q8_0 at 3 token rows, AVX2 + VNNI).
 * - K-quants: each 32-element sub-block as one such block, its scales per row as vectors (mh_dot_x86_x8k.h; 512
 *   bits wide in mh_dot_x86_x8kz.h).
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

/* Half h of a 32-element block of 8 rows (u[c]: elements 16 h + 4 c .. 16 h + 4 c + 3 of each row, unsigned)
 * against token rows t0 .. t0 + MT - 1: the 4 pieces' products into s[t], each row's in its lane, started (h = 0)
 * or added to (h = 1): 16-bit sums of 4-bit values (wide = 0), summed over both halves without overflow
 * (8 x 2 x 15 x 127 < 2^15); 32-bit sums of 5-bit values (4 x 2 x 31 x 127 < 2^15 per half) and with VNNI.
 * Integer sums: the same in any order. */
AI void x8_half_tokens(const __m256i *u, const int h, const int wide, const mh_act *a, int t0, const int MT, int b,
                       __m256i *s) {
    const int K = a->K;
    for (int t = 0; t < MT; t++) {
        const int8_t *x = a->q + (size_t)(t0 + t) * K + 32 * b + 16 * h;
#ifdef MH_VNNI
        (void)wide;
        const __m256i s0 = dpbusd(h ? s[t] : _mm256_setzero_si256(), u[0], bcast4(x));
        const __m256i s1 = dpbusd(_mm256_setzero_si256(), u[1], bcast4(x + 4));
        s[t] = _mm256_add_epi32(dpbusd(s0, u[2], bcast4(x + 8)), dpbusd(s1, u[3], bcast4(x + 12)));
#else
        const __m256i q = _mm256_add_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(u[0], bcast4(x)), _mm256_maddubs_epi16(u[1], bcast4(x + 4))),
            _mm256_add_epi16(_mm256_maddubs_epi16(u[2], bcast4(x + 8)), _mm256_maddubs_epi16(u[3], bcast4(x + 12))));
        if (wide) {
            const __m256i q32 = _mm256_madd_epi16(q, _mm256_set1_epi16(1));
            s[t] = h ? _mm256_add_epi32(s[t], q32) : q32;
        } else {
            s[t] = h ? _mm256_add_epi16(s[t], q) : q;
        }
#endif
        __asm__ volatile("" : "+x"(s[t])); /* a scheduling barrier: one token's products at a time (no spills) */
    }
}

/* A block's integer sums s[t] (x8_half_tokens, both halves) times d_w d_x, added to acc[t]. */
AI void x8_scale_tokens(const __m256i *s, const int wide, __m256 dw, const mh_act *a, int t0, const int MT, int b,
                        __m256 *acc) {
    const int K = a->K;
    for (int t = 0; t < MT; t++) {
#ifdef MH_VNNI
        (void)wide;
        const __m256i p = s[t];
#else
        const __m256i p = wide ? s[t] : _mm256_madd_epi16(s[t], _mm256_set1_epi16(1)); /* [8] int32 */
#endif
        const size_t xb = (size_t)(t0 + t) * (K / 32) + b;
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_set1_ps(a->d[xb])), acc[t]);
    }
}

/* corr[t] += off times token row t0 + t's block-b activation sum (d_x times the sum of its int8 values). */
AI void x8_offset_tokens(__m256 off, const mh_act *a, int t0, const int MT, int b, __m256 *corr) {
    for (int t = 0; t < MT; t++)
        corr[t] = _mm256_fmadd_ps(off, _mm256_set1_ps(a->s32[(size_t)(t0 + t) * (a->K / 32) + b]), corr[t]);
}

/* Pieces c0 .. c0 + n - 1 of the nibbles at qs (32 bytes a piece), low nibbles (h = 0) or high ones (h = 1), as
 * vectors of unsigned values: for Q4_0x8 / Q4_1x8 u[i] is elements 16 h + 4 (c0 + i) .. + 3 of each row, for a
 * Q4_Kx8 sub-block its pieces c0 .. With q5 (Q5_0x8 / Q5_1x8: the fifth-bit bytes at qs, the nibbles after them;
 * whole halves only, c0 = 0 and n = 4), each element's fifth bit or-ed in. */
AI void x8_unpack(const uint8_t *qs, const int q5, const int h, const int c0, const int n, __m256i *u) {
    const __m256i low4 = _mm256_set1_epi8(15);
    const uint8_t *nib = qs + (q5 ? 32 : 0);
    for (int i = 0; i < n; i++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(nib + 32 * (c0 + i)));
        u[i] = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, low4);
    }
    if (q5) {
        const __m256i H = _mm256_loadu_si256((const __m256i *)qs);
        u[0] = _mm256_or_si256(u[0], h ? fifth_x8(H, 4) : fifth_x8(H, 0));
        u[1] = _mm256_or_si256(u[1], h ? fifth_x8(H, 5) : fifth_x8(H, 1));
        u[2] = _mm256_or_si256(u[2], h ? fifth_x8(H, 6) : fifth_x8(H, 2));
        u[3] = _mm256_or_si256(u[3], h ? fifth_x8(H, 7) : fifth_x8(H, 3));
    }
}

/* Block blk's offset per row: -8 d or -16 d (Q4_0 / Q5_0), or m (Q4_1 / Q5_1). */
AI __m256 x8_offset(const int base, const uint8_t *blk) {
    if (base == MH_Q4_1 || base == MH_Q5_1) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16)));
    return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)),
                         _mm256_set1_ps(base == MH_Q5_0 ? -16.0f : -8.0f));
}

/* The 8 rows from w (their first byte; nb blocks) against token rows t0 .. t0 + MT - 1: res[t], lane i = row i.
 * One token row (decode): each block's 8 unpacked vectors and its offsets in one pass. Several (x8_half_tokens):
 * each block's halves one after the other, so 4 unpacked vectors are live instead of 8 and, with the MT sums and
 * accumulators, everything stays in the 16 registers; the offsets' products in a second pass over the scales
 * (their own accumulators: the same operations and bits as in one pass). */
AI void tile_x8(const int fmt, const uint8_t *w, int nb, const mh_act *a, int t0, const int MT, __m256 *res) {
    const int base = x8_base(fmt), bb = fmt_block_bytes(base), hb = 8 * x8_head_bytes(base), K = a->K;
    const int q5 = base == MH_Q5_0 || base == MH_Q5_1;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4], corr[4];
    for (int t = 0; t < MT; t++) acc[t] = corr[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * 8 * bb, *qs = blk + hb;
        if (t0 == 0) prefetch_ahead(blk, 8 * bb);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)); /* [8] the rows' scales */
        if (base == MH_Q8_0) {
            __m256i q[8];
            for (int c = 0; c < 8; c++) q[c] = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
#ifdef MH_VNNI /* q xor 0x80 = q + 128, unsigned: vpdpbusd's left operand, shared by the token rows */
            for (int c = 0; c < 8; c++) q[c] = _mm256_xor_si256(q[c], _mm256_set1_epi8((char)0x80));
#endif
            for (int t = 0; t < MT; t++) {
                const int8_t *x = a->q + (size_t)(t0 + t) * K + 32 * b;
#ifdef MH_VNNI
                (void)ones;
                __m256i s0 = _mm256_setzero_si256(), s1 = s0; /* [8] int32 each: (q + 128) x */
                for (int c = 0; c < 8; c += 2) {
                    s0 = dpbusd(s0, q[c], bcast4(x + 4 * c));
                    s1 = dpbusd(s1, q[c + 1], bcast4(x + 4 * c + 4));
                }
                /* less 128 times the block's sum of x (iz: a token row's zpairs(K) * 2): q x, the integers of the
                 * vpsignb path below */
                const int32_t sx = a->iz[(size_t)(t0 + t) * 2 * zpairs(K) + b];
                const __m256i s = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_set1_epi32(sx));
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
            continue;
        }
        __m256i s[4];
        if (MT == 1) {
            __m256i u[8];
            x8_unpack(qs, q5, 0, 0, 4, u);
            x8_unpack(qs, q5, 1, 0, 4, u + 4);
            x8_half_tokens(u, 0, q5, a, t0, MT, b, s);
            x8_half_tokens(u + 4, 1, q5, a, t0, MT, b, s);
            x8_offset_tokens(x8_offset(base, blk), a, t0, MT, b, corr);
        } else {
            for (int h = 0; h < 2; h++) {
                __m256i u[4];
                x8_unpack(qs, q5, h, 0, 4, u);
                x8_half_tokens(u, h, q5, a, t0, MT, b, s);
            }
        }
        x8_scale_tokens(s, q5, dw, a, t0, MT, b, acc);
    }
    if (base != MH_Q8_0 && MT > 1)
        for (int b = 0; b < nb; b++) x8_offset_tokens(x8_offset(base, w + (size_t)b * 8 * bb), a, t0, MT, b, corr);
    for (int t = 0; t < MT; t++) res[t] = _mm256_add_ps(acc[t], corr[t]);
}

/* Two groups of 8 rows of Q4_0x8 / Q4_1x8 (the second gb bytes after the first; nb blocks each) against 2 or 3
 * token rows t0 ..:
 * res[g * MT + t]. Each broadcast of 4 activations serves both groups (half the broadcasts of two tile_x8 calls, the
 * loop's most frequent operation after the multiplies): a quarter block (2 pieces) of both groups at a time, so that
 * both groups' sums for every token row stay in registers. Each (row, token) result is the same integers and the
 * same float operations in the same order as tile_x8's, so the same bits. */
AI void tile_x8_pair(const int fmt, const uint8_t *w, int64_t gb, int nb, const mh_act *a, int t0, const int MT,
                     __m256 *res) {
    const int base = x8_base(fmt), bb = fmt_block_bytes(base), hb = 8 * x8_head_bytes(base), K = a->K;
    __m256 acc[6], corr[6];
    for (int i = 0; i < 2 * MT; i++) acc[i] = corr[i] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk0 = w + (size_t)b * 8 * bb, *blk1 = blk0 + gb;
        if (t0 == 0) prefetch_ahead(blk0, 8 * bb), prefetch_ahead(blk1, 8 * bb);
        __m256i s0[3], s1[3]; /* each token row's sums, group 0 and 1 (16-bit; 32-bit with VNNI) */
        for (int h = 0; h < 2; h++)
            for (int qq = 0; qq < 2; qq++) {
                __m256i u0[2], u1[2];
                x8_unpack(blk0 + hb, 0, h, 2 * qq, 2, u0);
                x8_unpack(blk1 + hb, 0, h, 2 * qq, 2, u1);
                for (int t = 0; t < MT; t++) {
                    const int8_t *x = a->q + (size_t)(t0 + t) * K + 32 * b + 16 * h + 8 * qq;
                    const __m256i x0 = bcast4(x), x1 = bcast4(x + 4);
                    const int first = h == 0 && qq == 0;
#ifdef MH_VNNI
                    const __m256i z = _mm256_setzero_si256();
                    s0[t] = dpbusd(dpbusd(first ? z : s0[t], u0[0], x0), u0[1], x1);
                    s1[t] = dpbusd(dpbusd(first ? z : s1[t], u1[0], x0), u1[1], x1);
#else
                    const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(u0[0], x0),
                                                        _mm256_maddubs_epi16(u0[1], x1));
                    const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(u1[0], x0),
                                                        _mm256_maddubs_epi16(u1[1], x1));
                    s0[t] = first ? p0 : _mm256_add_epi16(s0[t], p0);
                    s1[t] = first ? p1 : _mm256_add_epi16(s1[t], p1);
#endif
                    __asm__ volatile("" : "+x"(s0[t]), "+x"(s1[t])); /* one token row at a time, as in tile_x8 */
                }
            }
        x8_scale_tokens(s0, 0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk0)), a, t0, MT, b, acc);
        x8_scale_tokens(s1, 0, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk1)), a, t0, MT, b, acc + MT);
    }
    for (int b = 0; b < nb; b++) {
        x8_offset_tokens(x8_offset(base, w + (size_t)b * 8 * bb), a, t0, MT, b, corr);
        x8_offset_tokens(x8_offset(base, w + gb + (size_t)b * 8 * bb), a, t0, MT, b, corr + MT);
    }
    for (int i = 0; i < 2 * MT; i++) res[i] = _mm256_add_ps(acc[i], corr[i]);
}

#include "mh_dot_x86_x8z.h"
#include "mh_dot_x86_x8k.h"

#endif
