/* The lone-token attention's inner loops 512 bits wide, for AVX-512 builds: mh_attention_avx2.h includes it, and
 * where MH_ATT_ZMM is defined takes this scores_4x3 in place of its 256-bit one and values_64x3 for each 64 value
 * columns. Every lane does the multiply-adds the 8-lane loops do, in the same order, so a token's attention is the
 * same bits as there (and as in a prompt block, mh_attention_block.h) in half the instructions: a batch-3 step's
 * attention 1.27 -> 1.14 M cycles on a Zen 5. Knows nothing of chunks, pages or threads. */
#ifndef MH_ATTENTION_ZMM_H
#define MH_ATTENTION_ZMM_H
#if defined(MH_ISA_X86) && defined(__AVX512F__) && defined(__AVX512DQ__)
#define MH_ATT_ZMM 1
/* 8 bfloat16 of row a and 8 of row b -> 16 float32, a's in the low half (exact). */
static inline __m512 widen8x2(const uint16_t *a, const uint16_t *b) {
    const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                               _mm_loadu_si128((const __m128i *)b), 1);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(ab), 16));
}

/* 16 bfloat16 -> float32 (exact). */
static inline __m512 widen16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* scores_4x3 with two keys' 8 lanes per vector (keys 0 and 2 in the low halves). */
static inline void scores_4x3(const float *const *qg, const uint16_t *const *kp, int d, __m256 acc[3][4]) {
    __m512 z00 = _mm512_setzero_ps(), z01 = z00, z10 = z00, z11 = z00, z20 = z00, z21 = z00;
    for (int c = 0; c < d; c += 8) {
        const __m512 q0 = _mm512_broadcast_f32x8(_mm256_loadu_ps(qg[0] + c));
        const __m512 q1 = _mm512_broadcast_f32x8(_mm256_loadu_ps(qg[1] + c));
        const __m512 q2 = _mm512_broadcast_f32x8(_mm256_loadu_ps(qg[2] + c));
        const __m512 k01 = widen8x2(kp[0] + c, kp[1] + c), k23 = widen8x2(kp[2] + c, kp[3] + c);
        z00 = _mm512_fmadd_ps(q0, k01, z00), z10 = _mm512_fmadd_ps(q1, k01, z10);
        z20 = _mm512_fmadd_ps(q2, k01, z20), z01 = _mm512_fmadd_ps(q0, k23, z01);
        z11 = _mm512_fmadd_ps(q1, k23, z11), z21 = _mm512_fmadd_ps(q2, k23, z21);
    }
    const __m512 zz[3][2] = {{z00, z01}, {z10, z11}, {z20, z21}};
    for (int g = 0; g < 3; g++)
        for (int h = 0; h < 2; h++) {
            acc[g][2 * h] = _mm512_castps512_ps256(zz[g][h]);
            acc[g][2 * h + 1] = _mm512_extractf32x8_ps(zz[g][h], 1);
        }
}

/* values_32x3 for 64 columns, 16 per vector: each output's multiply-adds as there. */
static inline void values_64x3(const uint16_t *const *kp, int64_t off, int n, const float *const *pr, int ng, int d,
                               float *o) {
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    for (int j = 0; j < n; j++) {
        const uint16_t *v = kp[j] + off;
        const __m512 p0 = _mm512_set1_ps(pr[0][j]), p1 = _mm512_set1_ps(pr[1][j]), p2 = _mm512_set1_ps(pr[2][j]);
        __m512 x = widen16(v);
        a00 = _mm512_fmadd_ps(p0, x, a00), a10 = _mm512_fmadd_ps(p1, x, a10), a20 = _mm512_fmadd_ps(p2, x, a20);
        x = widen16(v + 16);
        a01 = _mm512_fmadd_ps(p0, x, a01), a11 = _mm512_fmadd_ps(p1, x, a11), a21 = _mm512_fmadd_ps(p2, x, a21);
        x = widen16(v + 32);
        a02 = _mm512_fmadd_ps(p0, x, a02), a12 = _mm512_fmadd_ps(p1, x, a12), a22 = _mm512_fmadd_ps(p2, x, a22);
        x = widen16(v + 48);
        a03 = _mm512_fmadd_ps(p0, x, a03), a13 = _mm512_fmadd_ps(p1, x, a13), a23 = _mm512_fmadd_ps(p2, x, a23);
    }
    const __m512 res[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    for (int g = 0; g < ng; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + (size_t)g * d + 16 * c, res[g][c]);
}
#endif
#endif
