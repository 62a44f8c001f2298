/* ARM NEON (aarch64) tile kernels: NR weight rows x MT token rows of one format, 128-bit.
 *
 * bfloat16: a 128-bit load holds 8 weights; shifting each 32-bit lane left by 16 gives the even elements as
 * float32, masking the low half gives the odd ones, so activations are stored per 8 elements as 4 even then 4 odd
 * (MH_F_CHUNK). Quantized: each 32-block's weights become 2 x 16 bytes (unsigned values below 64 read as signed;
 * Q8_0's and Q4_0's (q - 8) signed) multiplied with the int8 activations by sdot where the CPU has dot products (ARMv8.2 dotprod),
 * else by widening multiplies and pairwise adds; then scaled, and offsets via the activations' block sums, as on
 * x86 (mh_dot_x86.h). */
#ifndef MH_DOT_NEON_H
#define MH_DOT_NEON_H

#define MH_F_CHUNK 8
#define MH_NR 2
#define MH_MT 4

static inline void tile_shape(int fmt, int T, int *nr, int *mt) {
    (void)fmt;
    (void)T;
    *nr = 2;
    *mt = 4;
}
#define AI static inline __attribute__((always_inline))

AI int32x4_t dot16(int32x4_t acc, int8x16_t u, int8x16_t x) { /* acc[i] += sum of 4 products */
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(acc, u, x);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(u), vget_low_s8(x));
    const int16x8_t hi = vmull_high_s8(u, x);
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}

/* ---- bfloat16 weights ----------------------------------------------------------------------------------- */
AI void tile_bf16(const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT, float *res) {
    const int K = a->K, K8 = K & ~7;
    float32x4_t ae[MH_NR][MH_MT], ao[MH_NR][MH_MT];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) ae[r][t] = ao[r][t] = vdupq_n_f32(0.0f);
    const uint32x4_t hi = vdupq_n_u32(0xffff0000u);
    for (int k = 0; k < K8; k += 8) {
        for (int r = 0; r < NR; r++) {
            const uint32x4_t v = vreinterpretq_u32_u16(vld1q_u16((const uint16_t *)(w + (size_t)r * rb) + k));
            const float32x4_t we = vreinterpretq_f32_u32(vshlq_n_u32(v, 16));
            const float32x4_t wo = vreinterpretq_f32_u32(vandq_u32(v, hi));
            for (int t = 0; t < MT; t++) {
                const float *x = a->f + (size_t)(t0 + t) * K + k;
                ae[r][t] = vfmaq_f32(ae[r][t], we, vld1q_f32(x));
                ao[r][t] = vfmaq_f32(ao[r][t], wo, vld1q_f32(x + 4));
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) {
            float s = vaddvq_f32(vaddq_f32(ae[r][t], ao[r][t]));
            const float *x = a->f + (size_t)(t0 + t) * K;
            for (int k = K8; k < K; k++) s += bf16_to_f32(rd16(w + (size_t)r * rb + 2 * (size_t)k)) * x[k];
            res[r * MT + t] = s;
        }
}

/* ---- quantized weights ---------------------------------------------------------------------------------- */
typedef struct {
    int8x16_t u0, u1; /* elements 0..15, 16..31 */
    float dw, off0, off1;
    int sc0, sc1;     /* Q6_K's integer scales of the two halves */
} blk32;

AI void blk_acc(const int fmt, const blk32 *B, const mh_act *a, int t, int b, float32x4_t *acc, float *corr) {
    const int K = a->K, nb = K / 32;
    const int8_t *xq = a->q + (size_t)t * K + 32 * (size_t)b;
    const int8x16_t x0 = vld1q_s8(xq), x1 = vld1q_s8(xq + 16);
    int32x4_t p;
    if (fmt == MH_Q6_K)
        p = vaddq_s32(vmulq_n_s32(dot16(vdupq_n_s32(0), B->u0, x0), B->sc0),
                      vmulq_n_s32(dot16(vdupq_n_s32(0), B->u1, x1), B->sc1));
    else
        p = dot16(dot16(vdupq_n_s32(0), B->u0, x0), B->u1, x1);
    *acc = vfmaq_f32(*acc, vmulq_n_f32(vcvtq_f32_s32(p), B->dw), vdupq_n_f32(a->d[(size_t)t * nb + b]));
    if (fmt == MH_Q6_K) {
        const float *s16 = a->s16 + (size_t)t * 2 * nb + 2 * b;
        *corr += B->off0 * s16[0] + B->off1 * s16[1];
    } else if (fmt != MH_Q8_0 && fmt != MH_Q4_0) {
        *corr += B->off0 * a->s32[(size_t)t * nb + b];
    }
}

AI void unpack_k(const int fmt, const uint8_t *blk, int j, blk32 *B) {
    const uint8x16_t m4 = vdupq_n_u8(15);
    if (fmt == MH_Q4_K || fmt == MH_Q5_K) { /* Q5_K: bit j of qh[i] above element i's nibble */
        const int q5 = fmt == MH_Q5_K;
        const uint8_t *qs = blk + (q5 ? 48 : 16) + (j / 2) * 32;
        const uint8x16_t q0 = vld1q_u8(qs), q1 = vld1q_u8(qs + 16);
        uint8x16_t n0 = j & 1 ? vshrq_n_u8(q0, 4) : vandq_u8(q0, m4), n1 = j & 1 ? vshrq_n_u8(q1, 4) : vandq_u8(q1, m4);
        if (q5) {
            const int8x16_t sh = vdupq_n_s8((int8_t)-j); /* a right shift by j */
            const uint8x16_t one = vdupq_n_u8(1);
            n0 = vorrq_u8(n0, vshlq_n_u8(vandq_u8(vshlq_u8(vld1q_u8(blk + 16), sh), one), 4));
            n1 = vorrq_u8(n1, vshlq_n_u8(vandq_u8(vshlq_u8(vld1q_u8(blk + 32), sh), one), 4));
        }
        B->u0 = vreinterpretq_s8_u8(n0);
        B->u1 = vreinterpretq_s8_u8(n1);
        int s, m;
        q4k_scale_min(j, blk + 4, &s, &m);
        B->dw = f16_to_f32(rd16(blk)) * (float)s;
        B->off0 = B->off1 = -f16_to_f32(rd16(blk + 2)) * (float)m;
    } else { /* Q6_K */
        const int half = j / 4, k = j % 4;
        const uint8_t *ql = blk + half * 64 + (k & 1) * 32, *qh = blk + 128 + half * 32;
        uint8x16_t l0 = vld1q_u8(ql), l1 = vld1q_u8(ql + 16);
        if (k >= 2) {
            l0 = vshrq_n_u8(l0, 4);
            l1 = vshrq_n_u8(l1, 4);
        }
        const int8x16_t sh = vdupq_n_s8((int8_t)(-2 * k)); /* a right shift by 2k */
        const uint8x16_t h0 = vandq_u8(vshlq_u8(vld1q_u8(qh), sh), vdupq_n_u8(3));
        const uint8x16_t h1 = vandq_u8(vshlq_u8(vld1q_u8(qh + 16), sh), vdupq_n_u8(3));
        B->u0 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(h0, 4)));
        B->u1 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(h1, 4)));
        const int8_t *scales = (const int8_t *)(blk + 192) + half * 8 + 2 * k;
        const float d = f16_to_f32(rd16(blk + 208));
        B->sc0 = scales[0];
        B->sc1 = scales[1];
        B->dw = d;
        B->off0 = -32.0f * d * (float)scales[0];
        B->off1 = -32.0f * d * (float)scales[1];
    }
}

AI void tile_q(const int fmt, const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT,
               float *res) {
    const int nb = a->K / 32;
    float32x4_t acc[MH_NR][MH_MT];
    float corr[MH_NR][MH_MT];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) {
            acc[r][t] = vdupq_n_f32(0.0f);
            corr[r][t] = 0.0f;
        }
    if (fmt == MH_Q4_K || fmt == MH_Q5_K || fmt == MH_Q6_K) {
        const int bb = fmt_block_bytes(fmt);
        for (int s = 0; s < nb / 8; s++)
            for (int j = 0; j < 8; j++)
                for (int r = 0; r < NR; r++) {
                    blk32 B;
                    unpack_k(fmt, w + (size_t)r * rb + (size_t)s * bb, j, &B);
                    for (int t = 0; t < MT; t++) blk_acc(fmt, &B, a, t0 + t, 8 * s + j, &acc[r][t], &corr[r][t]);
                }
    } else {
        const int bb = fmt_block_bytes(fmt);
        for (int b = 0; b < nb; b++)
            for (int r = 0; r < NR; r++) {
                const uint8_t *blk = w + (size_t)r * rb + (size_t)b * bb;
                blk32 B;
                B.dw = f16_to_f32(rd16(blk));
                if (fmt == MH_Q8_0) {
                    B.u0 = vld1q_s8((const int8_t *)blk + 2);
                    B.u1 = vld1q_s8((const int8_t *)blk + 18);
                } else if (fmt == MH_Q5_0 || fmt == MH_Q5_1) { /* the fifth bits, from unpack32 */
                    uint8_t u[32];
                    float dw, off[2];
                    int sc[2];
                    unpack32(fmt, w + (size_t)r * rb, b, u, &dw, sc, off);
                    B.u0 = vreinterpretq_s8_u8(vld1q_u8(u));
                    B.u1 = vreinterpretq_s8_u8(vld1q_u8(u + 16));
                    B.off0 = B.off1 = off[0];
                } else {
                    const uint8x16_t q = vld1q_u8(blk + bb - 16);
                    B.u0 = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15)));
                    B.u1 = vreinterpretq_s8_u8(vshrq_n_u8(q, 4));
                    if (fmt == MH_Q4_0) { /* signed: q - 8 */
                        B.u0 = vsubq_s8(B.u0, vdupq_n_s8(8));
                        B.u1 = vsubq_s8(B.u1, vdupq_n_s8(8));
                    } else {
                        B.off0 = B.off1 = f16_to_f32(rd16(blk + 2));
                    }
                }
                for (int t = 0; t < MT; t++) blk_acc(fmt, &B, a, t0 + t, b, &acc[r][t], &corr[r][t]);
            }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) res[r * MT + t] = vaddvq_f32(acc[r][t]) + corr[r][t];
}

#define MH_TILE_SHAPES(CALL)                                                                                       \
    switch (nr * 8 + mt) {                                                                                         \
    case 9: CALL(1, 1); break;                                                                                     \
    case 10: CALL(1, 2); break;                                                                                    \
    case 11: CALL(1, 3); break;                                                                                    \
    case 12: CALL(1, 4); break;                                                                                    \
    case 17: CALL(2, 1); break;                                                                                    \
    case 18: CALL(2, 2); break;                                                                                    \
    case 19: CALL(2, 3); break;                                                                                    \
    default: CALL(2, 4); break;                                                                                    \
    }

#define MH_CALL_BF16(R, M) tile_bf16(w, rb, R, a, t0, M, res)
#define MH_CALL_Q(R, M) tile_q(FMT, w, rb, R, a, t0, M, res)

static void tile(int fmt, const uint8_t *w, int64_t rb, int nr, const mh_act *a, int t0, int mt, float *res) {
    switch (fmt) {
    case MH_BF16: MH_TILE_SHAPES(MH_CALL_BF16); break;
#define FMT MH_Q8_0
    case MH_Q8_0: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q4_0
    case MH_Q4_0: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q4_1
    case MH_Q4_1: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q5_0
    case MH_Q5_0: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q5_1
    case MH_Q5_1: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q4_K
    case MH_Q4_K: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q5_K
    case MH_Q5_K: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q6_K
    case MH_Q6_K: MH_TILE_SHAPES(MH_CALL_Q); break;
#undef FMT
    default: break;
    }
}

#endif
