/* x86 tile kernels: NR weight rows x MT token rows of one format, AVX2 + FMA (+ F16C), 256-bit.
 * AVX-512 builds use these too, with vpdpbusd for the 8-bit products where VNNI is present, and vdpbf16ps over
 * 512 bits for bfloat16 weights where AVX-512 BF16 is present (activations then in bfloat16).
 *
 * bfloat16: a 256-bit load holds 16 weights; shifting each 32-bit lane left by 16 gives the even elements as
 * float32, masking off the low half gives the odd ones (no shuffles), so the activations are stored per 16
 * elements as 8 even then 8 odd (MH_F_CHUNK), and every (row, token) pair has an even and an odd accumulator.
 * Quantized: each 32-block's weights are unpacked to 32 unsigned bytes in a register (Q8_0's and Q4_0's (q - 8)
 * are signed and use the sign trick: |w| times x with w's sign), multiplied with the int8 activations into eight 32-bit sums (vpmaddubsw + vpmaddwd, or
 * vpdpbusd), converted to float and scaled by the weight's and the activation's block scales; offsets (Q4_1's and
 * Q4_K's mins, Q6_K's -32) go through the activations' block sums as one scalar per block. */
#ifndef MH_DOT_X86_H
#define MH_DOT_X86_H

#define MH_F_CHUNK 16
#define AI static inline __attribute__((always_inline))

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight 32-bit sums of u[i] * x[i] over 4 consecutive bytes each; u unsigned (<= 128 with |x| <= 127: no
 * saturation in vpmaddubsw's 16-bit pairs), x signed. */
AI __m256i dot_u8s8(__m256i u, __m256i x) {
#ifdef MH_VNNI
#if defined(__AVXVNNI__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#endif
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

/* ---- bfloat16 weights ----------------------------------------------------------------------------------- */
#ifndef MH_BF16_DOT
/* One accumulator per (row, token): two FMAs per 16 elements into it, so a tile of NR x MT pairs has NR x MT
 * independent chains (NR = 4 keeps a lone token's chains busy; tiles of up to 12 stay in registers). */
AI void tile_bf16(const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT, float *res) {
    const int K = a->K, K16 = K & ~15;
    __m256 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int k = 0; k < K16; k += 16) {
        for (int r = 0; r < NR; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * rb + 2 * (size_t)k));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
            for (int t = 0; t < MT; t++) {
                const float *x = a->f + (size_t)(t0 + t) * K + k;
                acc[r][t] = _mm256_fmadd_ps(we, _mm256_loadu_ps(x), acc[r][t]);
                acc[r][t] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + 8), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) {
            float s = hsum8(acc[r][t]);
            const float *x = a->f + (size_t)(t0 + t) * K;
            for (int k = K16; k < K; k++) s += bf16_to_f32(rd16(w + (size_t)r * rb + 2 * (size_t)k)) * x[k];
            res[r * MT + t] = s;
        }
}
#else
/* One weight row against MT token rows in bfloat16, 64 elements a step, two accumulators per token row. */
AI void tile_bf16_row(const uint16_t *w, int K, const mh_act *a, int t0, const int MT, float *res) {
    __m512 acc[8];
    for (int i = 0; i < 2 * MT; i++) acc[i] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i w0 = _mm512_loadu_si512(w + k), w1 = _mm512_loadu_si512(w + k + 32);
        for (int m = 0; m < MT; m++) {
            const uint16_t *x = a->h + (size_t)(t0 + m) * K + k;
            acc[2 * m] = _mm512_dpbf16_ps(acc[2 * m], (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x));
            acc[2 * m + 1] = _mm512_dpbf16_ps(acc[2 * m + 1], (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + 32));
        }
    }
    for (; k < K; k += 32) {
        __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1u);
        __m512i w0 = _mm512_maskz_loadu_epi16(mask, w + k);
        for (int m = 0; m < MT; m++)
            acc[2 * m] = _mm512_dpbf16_ps(acc[2 * m], (__m512bh)w0,
                                          (__m512bh)_mm512_maskz_loadu_epi16(mask, a->h + (size_t)(t0 + m) * K + k));
    }
    for (int m = 0; m < MT; m++) res[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * m], acc[2 * m + 1]));
}

AI void tile_bf16(const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT, float *res) {
    for (int r = 0; r < NR; r++) tile_bf16_row((const uint16_t *)(w + (size_t)r * rb), a->K, a, t0, MT, res + r * MT);
}
#endif

/* ---- quantized weights ---------------------------------------------------------------------------------- */
/* The unpacked 32-block of one weight row: bytes, float scale, 16-bit integer scales (or none), offsets. */
typedef struct {
    __m256i u, sc;  /* u: unsigned values, or (Q8_0, Q4_0) signed ones; sc: 16-bit scales (Q6_K only) */
    __m256i ua;     /* |u| for the signed formats */
    __m256 dw;
    float off0, off1;
} blk32;

AI __m256i nibbles(const uint8_t *qs) { /* 16 bytes -> 32: low nibbles then high nibbles */
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(15));
}

/* One token row's activations, from its first block. */
typedef struct {
    const int8_t *q;
    const float *d, *s16, *s32;
} xrow;

AI xrow x_row(const mh_act *a, int t) {
    const int K = a->K, nb = K / 32;
    xrow X = {a->q + (size_t)t * K, a->d + (size_t)t * nb, a->s16 + (size_t)t * 2 * nb, a->s32 + (size_t)t * nb};
    return X;
}

/* Accumulate block b of token row X: acc += (dot * dw) * dx; corr += offsets . sums. */
AI void blk_acc(const int fmt, const blk32 *B, const xrow *X, int b, __m256 *acc, float *corr) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)(X->q + 32 * (size_t)b));
    __m256i p;
    if (fmt == MH_Q8_0 || fmt == MH_Q4_0) /* signed weights: |w| . (x signed by w) */
        p = dot_u8s8(B->ua, _mm256_sign_epi8(x, B->u));
    else if (fmt == MH_Q6_K)
        p = _mm256_madd_epi16(_mm256_maddubs_epi16(B->u, x), B->sc);
    else
        p = dot_u8s8(B->u, x);
    *acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), B->dw), _mm256_broadcast_ss(X->d + b), *acc);
    if (fmt == MH_Q6_K)
        *corr += B->off0 * X->s16[2 * b] + B->off1 * X->s16[2 * b + 1];
    else if (fmt == MH_Q4_1 || fmt == MH_Q4_K)
        *corr += B->off0 * X->s32[b];
}

/* Sub-block j (0..7) of a Q4_K / Q6_K super-block `blk`. */
AI void unpack_k(const int fmt, const uint8_t *blk, int j, blk32 *B) {
    if (fmt == MH_Q4_K) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 16 + (j / 2) * 32));
        B->u = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(15));
        int s, m;
        q4k_scale_min(j, blk + 4, &s, &m);
        B->dw = _mm256_set1_ps(f16_to_f32(rd16(blk)) * (float)s);
        B->off0 = B->off1 = -f16_to_f32(rd16(blk + 2)) * (float)m;
    } else { /* Q6_K */
        const int half = j / 4, k = j % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + half * 64 + (k & 1) * 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + half * 32));
        const __m256i lo = _mm256_and_si256(k < 2 ? ql : _mm256_srli_epi16(ql, 4), _mm256_set1_epi8(15));
        const __m256i h2 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), _mm256_set1_epi8(3));
        B->u = _mm256_or_si256(lo, _mm256_slli_epi16(h2, 4));
        const int8_t *scales = (const int8_t *)(blk + 192) + half * 8 + 2 * k;
        const float d = f16_to_f32(rd16(blk + 208));
        B->sc = _mm256_set_m128i(_mm_set1_epi16(scales[1]), _mm_set1_epi16(scales[0]));
        B->dw = _mm256_set1_ps(d);
        B->off0 = -32.0f * d * (float)scales[0];
        B->off1 = -32.0f * d * (float)scales[1];
    }
}

AI void tile_q(const int fmt, const uint8_t *w, int64_t rb, const int NR, const mh_act *a, int t0, const int MT,
               float *res) {
    const int nb = a->K / 32;
    __m256 acc[2][4];
    float corr[2][4];
    xrow X[4];
    for (int t = 0; t < MT; t++) X[t] = x_row(a, t0 + t);
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) {
            acc[r][t] = _mm256_setzero_ps();
            corr[r][t] = 0.0f;
        }
    if (fmt == MH_Q4_K || fmt == MH_Q6_K) {
        const int bb = fmt == MH_Q4_K ? 144 : 210;
        for (int s = 0; s < nb / 8; s++)
            for (int j = 0; j < 8; j++)
                for (int r = 0; r < NR; r++) {
                    blk32 B;
                    unpack_k(fmt, w + (size_t)r * rb + (size_t)s * bb, j, &B);
                    for (int t = 0; t < MT; t++) blk_acc(fmt, &B, &X[t], 8 * s + j, &acc[r][t], &corr[r][t]);
                }
    } else {
        const int bb = fmt == MH_Q8_0 ? 34 : fmt == MH_Q4_0 ? 18 : 20;
        for (int b = 0; b < nb; b++)
            for (int r = 0; r < NR; r++) {
                const uint8_t *blk = w + (size_t)r * rb + (size_t)b * bb;
                blk32 B;
                const float d = f16_to_f32(rd16(blk));
                B.dw = _mm256_set1_ps(d);
                if (fmt == MH_Q8_0) {
                    B.u = _mm256_loadu_si256((const __m256i *)(blk + 2));
                    B.ua = _mm256_sign_epi8(B.u, B.u);
                } else if (fmt == MH_Q4_0) {
                    B.u = _mm256_sub_epi8(nibbles(blk + 2), _mm256_set1_epi8(8));
                    B.ua = _mm256_sign_epi8(B.u, B.u);
                } else {
                    B.u = nibbles(blk + 4);
                    B.off0 = B.off1 = f16_to_f32(rd16(blk + 2));
                }
                for (int t = 0; t < MT; t++) blk_acc(fmt, &B, &X[t], b, &acc[r][t], &corr[r][t]);
            }
    }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < MT; t++) res[r * MT + t] = hsum8(acc[r][t]) + corr[r][t];
}

/* ---- dispatch: the format and (NR, MT) as constants in each branch -------------------------------------- */
#define MH_NR 4 /* the most rows and token rows of any tile */
#define MH_MT 4

/* The tile shape the driver asks for: bfloat16 4 rows x 3 tokens (12 accumulators), quantized 2 x 4. */
static inline void tile_shape(int fmt, int *nr, int *mt) {
#ifdef MH_BF16_DOT
    const int bf = 0;
#else
    const int bf = fmt == MH_BF16;
#endif
    *nr = bf ? 4 : 2;
    *mt = bf ? 3 : 4;
}

#define MH_SHAPES_BF16(CALL)                                                                                       \
    switch (nr * 8 + mt) {                                                                                         \
    case 9: CALL(1, 1); break;                                                                                     \
    case 10: CALL(1, 2); break;                                                                                    \
    case 11: CALL(1, 3); break;                                                                                    \
    case 17: CALL(2, 1); break;                                                                                    \
    case 18: CALL(2, 2); break;                                                                                    \
    case 19: CALL(2, 3); break;                                                                                    \
    case 25: CALL(3, 1); break;                                                                                    \
    case 26: CALL(3, 2); break;                                                                                    \
    case 27: CALL(3, 3); break;                                                                                    \
    case 33: CALL(4, 1); break;                                                                                    \
    case 34: CALL(4, 2); break;                                                                                    \
    default: CALL(4, 3); break;                                                                                    \
    }

#define MH_SHAPES_Q(CALL)                                                                                          \
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
#ifdef MH_BF16_DOT
    case MH_BF16: MH_SHAPES_Q(MH_CALL_BF16); break;
#else
    case MH_BF16: MH_SHAPES_BF16(MH_CALL_BF16); break;
#endif
#define FMT MH_Q8_0
    case MH_Q8_0: MH_SHAPES_Q(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q4_0
    case MH_Q4_0: MH_SHAPES_Q(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q4_1
    case MH_Q4_1: MH_SHAPES_Q(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q4_K
    case MH_Q4_K: MH_SHAPES_Q(MH_CALL_Q); break;
#undef FMT
#define FMT MH_Q6_K
    case MH_Q6_K: MH_SHAPES_Q(MH_CALL_Q); break;
#undef FMT
    default: break;
    }
}

#endif
