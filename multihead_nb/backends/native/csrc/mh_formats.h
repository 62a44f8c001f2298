/* The weight formats' blocks, element by element: GGUF's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K (layouts
 * as llama.cpp's ggml-common.h defines them; the code is written here from those layouts), plain bfloat16, and the
 * same blocks with rows interleaved 8 at a time (mh_kernel.h; read back here, for the embedding lookup).
 *
 * Every quantized format is seen through one shape, 32 elements at a time ("a 32-block"): unsigned integers u
 * (signed for Q8_0), a float scale dw, an integer scale per 16 elements sc[2], and a float offset per 16 elements
 * off[2], so that weight[i] = dw * sc[i / 16] * u[i] + off[i / 16]. A dot product with activations quantized per
 * 32-block (x[i] = dx * q[i]) is then dw * dx * sum(sc u q) + off . (dx * sums of q): integer products and a few
 * float operations per block. The SIMD kernels compute the same per format without unpacking to memory; this
 * scalar version is the scalar build's kernel, the embedding lookup, and the reading of the layouts.
 * Owns no state; knows nothing of tiling or threads. */
#ifndef MH_FORMATS_H
#define MH_FORMATS_H
#include "mh_kernel.h"

static inline int fmt_block_elems(int fmt) {
    switch (fmt) {
    case MH_BF16: return 1;
    case MH_Q4_K: case MH_Q5_K: case MH_Q6_K: case MH_Q4_KX8: case MH_Q5_KX8: case MH_Q6_KX8: return 256;
    default: return 32;
    }
}

static inline int fmt_block_bytes(int fmt) {
    switch (fmt) {
    case MH_BF16: return 2;
    case MH_Q8_0: case MH_Q8_0X8: return 34;  /* d f16, qs int8[32] */
    case MH_Q4_0: case MH_Q4_0X8: return 18; /* d f16, qs[16]: element i < 16 is qs[i] & 15, else qs[i - 16] >> 4;
                                                 minus 8 */
    case MH_Q4_1: case MH_Q4_1X8: return 20;  /* d f16, m f16, qs[16] as Q4_0's; d q + m */
    case MH_Q5_0: case MH_Q5_0X8: return 22; /* d f16, qh[4] (bit i: element i's fifth bit), qs[16] as Q4_0's;
                                                 minus 16 */
    case MH_Q5_1: case MH_Q5_1X8: return 24; /* d f16, m f16, qh[4], qs[16]; d q + m */
    case MH_Q4_K: case MH_Q4_KX8: return 144; /* d f16, dmin f16, scales[12] (6-bit scale and min of 8 sub-blocks),
                                                 qs[128] */
    case MH_Q5_K: case MH_Q5_KX8: return 176; /* Q4_K's fields with qh[32] (bit j of byte l: the fifth bit of
                                                 element l of sub-block j) before qs[128] */
    case MH_Q6_K: case MH_Q6_KX8: return 210; /* ql[128] low 4 bits, qh[64] high 2 bits, scales int8[16], d f16 */
    default: return 0;
    }
}

/* The block format of an interleaved format (MH_Q8_0X8 -> MH_Q8_0, ...), 0 for the others. */
static inline int x8_base(int fmt) {
    switch (fmt) {
    case MH_Q8_0X8: return MH_Q8_0;
    case MH_Q4_0X8: return MH_Q4_0;
    case MH_Q4_1X8: return MH_Q4_1;
    case MH_Q5_0X8: return MH_Q5_0;
    case MH_Q5_1X8: return MH_Q5_1;
    case MH_Q4_KX8: return MH_Q4_K;
    case MH_Q5_KX8: return MH_Q5_K;
    case MH_Q6_KX8: return MH_Q6_K;
    default: return 0;
    }
}

/* Bytes before the quants in a block of an interleaved format's base: d (and m for Q4_1 / Q5_1), 2 bytes each. */
static inline int x8_head_bytes(int base) { return base == MH_Q4_1 || base == MH_Q5_1 ? 4 : 2; }

/* Block b of row r of an interleaved matrix (data, row_bytes rb) put back as its base format's block. */
static inline void x8_block(int fmt, const uint8_t *data, int64_t rb, int r, int b, uint8_t *out) {
    const int base = x8_base(fmt), bb = fmt_block_bytes(base), hb = x8_head_bytes(base), i = r % 8;
    const int q5 = base == MH_Q5_0 || base == MH_Q5_1, qb = bb - hb - 4 * q5; /* bytes of qs */
    if (qb > 32) return; /* never (at most 32 bytes of quants); tells the compiler so */
    const uint8_t *blk = data + (size_t)(r / 8) * 8 * rb + (size_t)b * 8 * bb;
    for (int f = 0; f < hb / 2; f++) memcpy(out + 2 * f, blk + 16 * f + 2 * i, 2);
    if (q5) { /* qh bit 4 c + k from bit c of fifth-bit byte k */
        const uint8_t *h = blk + 8 * hb + 4 * i;
        uint32_t qh = 0;
        for (int k = 0; k < 4; k++)
            for (int c = 0; c < 8; c++) qh |= (uint32_t)((h[k] >> c) & 1) << (4 * c + k);
        memcpy(out + hb, &qh, 4);
    }
    const uint8_t *qs = blk + 8 * (bb - qb);
    for (int c = 0; c < qb / 4; c++) memcpy(out + bb - qb + 4 * c, qs + 32 * c + 4 * i, 4);
}

/* Q4_K's 6-bit scale and min of sub-block j (0..7) from its 12 scale bytes. */
static inline void q4k_scale_min(int j, const uint8_t *q, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* 32-block b of a packed row: u[32] (as bytes; Q8_0's are signed), dw, sc[2], off[2] as described above. */
static inline void unpack32(int fmt, const uint8_t *row, int b, uint8_t *u, float *dw, int sc[2], float off[2]) {
    sc[0] = sc[1] = 1;
    *dw = off[0] = off[1] = 0.0f;
    switch (fmt) {
    case MH_Q8_0: {
        const uint8_t *blk = row + (size_t)b * 34;
        *dw = f16_to_f32(rd16(blk));
        memcpy(u, blk + 2, 32);
        off[0] = off[1] = 0.0f;
        break;
    }
    case MH_Q4_0: case MH_Q4_1: {
        const int bytes = fmt == MH_Q4_0 ? 18 : 20;
        const uint8_t *blk = row + (size_t)b * bytes, *qs = blk + bytes - 16;
        *dw = f16_to_f32(rd16(blk));
        for (int i = 0; i < 16; i++) {
            u[i] = qs[i] & 15;
            u[i + 16] = qs[i] >> 4;
        }
        off[0] = off[1] = fmt == MH_Q4_0 ? -8.0f * *dw : f16_to_f32(rd16(blk + 2));
        break;
    }
    case MH_Q5_0: case MH_Q5_1: {
        const int bytes = fmt == MH_Q5_0 ? 22 : 24;
        const uint8_t *blk = row + (size_t)b * bytes, *qs = blk + bytes - 16;
        uint32_t qh;
        memcpy(&qh, blk + bytes - 20, 4);
        *dw = f16_to_f32(rd16(blk));
        for (int i = 0; i < 16; i++) {
            u[i] = (uint8_t)((qs[i] & 15) | (((qh >> i) & 1) << 4));
            u[i + 16] = (uint8_t)((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
        }
        off[0] = off[1] = fmt == MH_Q5_0 ? -16.0f * *dw : f16_to_f32(rd16(blk + 2));
        break;
    }
    case MH_Q4_K:
    case MH_Q5_K: { /* Q5_K: Q4_K's with bit j of qh[i] as element i's fifth bit */
        const int q5 = fmt == MH_Q5_K;
        const uint8_t *blk = row + (size_t)(b / 8) * (q5 ? 176 : 144);
        const int j = b % 8;
        const uint8_t *qs = blk + (q5 ? 48 : 16) + (j / 2) * 32;
        int s, m;
        q4k_scale_min(j, blk + 4, &s, &m);
        *dw = f16_to_f32(rd16(blk)) * (float)s;
        for (int i = 0; i < 32; i++)
            u[i] = (uint8_t)((j & 1 ? qs[i] >> 4 : qs[i] & 15) | (q5 ? ((blk[16 + i] >> j) & 1) << 4 : 0));
        off[0] = off[1] = -f16_to_f32(rd16(blk + 2)) * (float)m;
        break;
    }
    case MH_Q6_K: {
        const uint8_t *blk = row + (size_t)(b / 8) * 210;
        const int j = b % 8, half = j / 4, k = j % 4; /* k: which quarter of the 128-element half */
        const uint8_t *ql = blk + half * 64 + (k & 1) * 32, *qh = blk + 128 + half * 32;
        const int8_t *scales = (const int8_t *)(blk + 192) + half * 8 + 2 * k;
        *dw = f16_to_f32(rd16(blk + 208));
        for (int i = 0; i < 32; i++) {
            const int lo = k < 2 ? ql[i] & 15 : ql[i] >> 4;
            u[i] = (uint8_t)(lo | (((qh[i] >> (2 * k)) & 3) << 4));
        }
        sc[0] = scales[0];
        sc[1] = scales[1];
        off[0] = -32.0f * *dw * (float)sc[0];
        off[1] = -32.0f * *dw * (float)sc[1];
        break;
    }
    default: memset(u, 0, 32); break;
    }
}

/* Row r of W as float32 (the embedding lookup; tests' reference). */
static void dequant_row(const mh_matrix *W, int r, float *out) {
    const uint8_t *row = W->data + (size_t)r * W->row_bytes;
    if (W->format == MH_BF16) {
        for (int k = 0; k < W->cols; k++) out[k] = bf16_to_f32(rd16(row + 2 * (size_t)k));
        return;
    }
    uint8_t u[32], blk[210]; /* one block of an interleaved 32-element format (at most 34 bytes), sized for any
                              * format's so that unpack32's every case reads inside it (GCC's -Warray-bounds) */
    float dw, off[2];
    int sc[2];
    const int base = x8_base(W->format), fmt = base ? base : W->format;
    if (fmt_block_elems(W->format) == 256 && base) { /* super-blocks put back together, read as base's */
        /* runs of (field bytes, fields) in block order, each field of the 8 rows side by side (quant.py's _FIELDS):
         * Q4_K, Q5_K, Q6_K */
        static const int runs[3][4][2] = {{{2, 2}, {1, 12}, {4, 32}, {0, 0}}, {{2, 2}, {1, 12}, {4, 8}, {4, 32}},
                                          {{4, 32}, {4, 16}, {1, 16}, {2, 1}}};
        const int q = base == MH_Q4_K ? 0 : base == MH_Q5_K ? 1 : 2, bb = fmt_block_bytes(base), i = r % 8;
        uint8_t sb[210];
        for (int s = 0; s < W->cols / 256; s++) {
            const uint8_t *g = W->data + (size_t)(r / 8) * 8 * W->row_bytes + (size_t)s * 8 * bb;
            int at = 0, from = 0;
            for (int k = 0; k < 4 && runs[q][k][0]; k++) {
                const int wd = runs[q][k][0], n = runs[q][k][1];
                for (int f = 0; f < n; f++, at += wd) memcpy(sb + at, g + from + (8 * f + i) * wd, (size_t)wd);
                from += 8 * wd * n;
            }
            for (int j = 0; j < 8; j++) {
                unpack32(base, sb, j, u, &dw, sc, off);
                for (int e = 0; e < 32; e++)
                    out[256 * s + 32 * j + e] = dw * (float)sc[e / 16] * (float)u[e] + off[e / 16];
            }
        }
        return;
    }
    for (int b = 0; b < W->cols / 32; b++) {
        if (base) {
            x8_block(W->format, W->data, W->row_bytes, r, b, blk);
            unpack32(fmt, blk, 0, u, &dw, sc, off);
        } else {
            unpack32(fmt, row, b, u, &dw, sc, off);
        }
        for (int i = 0; i < 32; i++) {
            const float v = fmt == MH_Q8_0 ? (float)(int8_t)u[i] : (float)u[i];
            out[b * 32 + i] = dw * (float)sc[i / 16] * v + off[i / 16];
        }
    }
}

#endif
