/* Matrix products out[t, n] (+)= X[t, :] . W[n, :] (+ bias[n]) for any number of token rows t, every weight format,
 * inside the forward's OpenMP region.
 *
 * Owns: preparing a product's input rows once per product ("activations": float32 reordered for the bfloat16
 * kernels, bfloat16 for vdpbf16ps, the float32 rows as they are for every quantized format in the scalar build and
 * on x86 with activations="float32", or int8 per 32-block with its scale and sums, as llama.cpp quantizes
 * activations to Q8_0, for every quantized format on NEON and on x86 by default; with AVX-512 VNNI that int8 also
 * arranged for tile_x8_blocks2's lanes), splitting the output rows of a group of matrices that share one input
 * between threads, and tiling (NR weight rows x MT token rows per call of the ISA's tile kernel, token rows in
 * blocks that stay in cache). Knows nothing of layers; the per-ISA tile kernels are mh_dot_*.h.
 *
 * Batch invariance: each (weight row, token row) result is summed by one accumulator sequence that does not depend
 * on the tile shape or on the other token rows, so a token's result is the same alone or in any batch. */
#ifndef MH_MATMUL_H
#define MH_MATMUL_H
#include "mh_formats.h"

typedef struct {
    int T, K;          /* token rows, elements per row */
    int forms;         /* which of the forms below are filled (ACT_*) */
    const float *x;    /* the rows themselves, float32, ldx apart (ACT_X) */
    int ldx;
    float *f;          /* [T, K] float32, in the order the ISA's bfloat16 kernel reads (MH_F_CHUNK) */
    uint16_t *h;       /* [T, K] bfloat16 */
    int8_t *q;         /* [T, K] int8, K % 32 == 0 */
    float *d, *s16;    /* [T, K / 32] scales; [T, K / 16] scale times the sum of q over 16 elements */
    float *s32;        /* [T, K / 32] scale times the sum of q over the 32-block */
    int8_t *qz;        /* [T, zpairs(K), 64] q as tile_x8_blocks2 reads it (ACT_Z: arrange_z_row) */
    float *dz;         /* [T, zpairs(K), MH_ZF] d, s32 and s16 likewise */
    int32_t *iz;       /* [T, zpairs(K) * 2] 128 times each block's sum of q (Q8_0's offset with VNNI; x86) */
} mh_act;

enum { ACT_F = 1, ACT_H = 2, ACT_Q = 4, ACT_X = 8, ACT_Z = 16 };

/* Pairs of 32-blocks of a row of K elements (the last may hold one block): ACT_Z's rows are this many 64-byte
 * (qz), MH_ZF-float (dz) and 2-int (iz) pieces. */
#define MH_ZF 8
static inline int zpairs(int K) { return (K / 32 + 1) / 2; }

typedef struct {
    const mh_matrix *W;
    const float *bias; /* [rows] or NULL */
    float *out;        /* out[t * ldo + n] */
    int ldo, accumulate;
} mh_part;

/* Results res[m] of row n for token rows t0 .. t0 + mt - 1 into the part's output (+ bias, or added to it). */
static inline void store_out(const mh_part *P, int n, int t0, int mt, const float *res) {
    const float b = P->bias ? P->bias[n] : 0.0f;
    for (int m = 0; m < mt; m++) {
        float *o = P->out + (size_t)(t0 + m) * P->ldo + n;
        const float v = res[m] + b;
        *o = P->accumulate ? *o + v : v;
    }
}

#if defined(MH_ISA_X86)
#include "mh_dot_x86.h"
#elif defined(MH_ISA_NEON)
#include "mh_dot_neon.h"
#else
#include "mh_dot_scalar.h"
#endif

/* What a format's products read: bfloat16 weights reordered float32 (bfloat16 with vdpbf16ps); quantized weights
 * int8 blocks (NEON's sdot, always; x86's vpmaddubsw when `int8`, the model's choice) or the float32 rows as they
 * are. */
static inline int act_form(int fmt, int int8) {
#ifdef MH_BF16_DOT
    if (fmt == MH_BF16) return ACT_H;
#endif
#if defined(MH_ISA_NEON)
    (void)int8;
    return fmt == MH_BF16 ? ACT_F : ACT_Q;
#elif defined(MH_ISA_X86)
    /* the interleaved layouts have integer products only */
#ifdef MH_X8_ZMM
    if (fmt == MH_Q8_0X8 || fmt == MH_Q4_0X8 || fmt == MH_Q4_1X8 || fmt == MH_Q5_0X8 || fmt == MH_Q5_1X8 ||
        fmt == MH_Q4_KX8 || fmt == MH_Q5_KX8 || fmt == MH_Q6_KX8)
        return ACT_Q | ACT_Z;
#endif
    return fmt == MH_BF16 ? ACT_F : (int8 || x8_base(fmt)) && int_dot_format(fmt) ? ACT_Q : ACT_X;
#else
    (void)int8;
    return fmt == MH_BF16 ? ACT_F : ACT_X;
#endif
}

#ifdef MH_X8_ZMM
/* A token row's int8 activations q and scales d, s32 [K / 32] (K % 32 == 0) as tile_x8_blocks2 reads them: per pair
 * of blocks (2j, 2j + 1), 8 pairs of dwords, pair c = dword c of block 2j then of block 2j + 1 (one vpermt2d; one
 * 64-bit broadcast gives every lane the dword its weights multiply), then (d, d), (s32, s32), (s16, s16) of their
 * first halves and of their second halves of the two blocks (the blocks' integer sums, iz, quantize_row_avx2 wrote
 * already in pairs); zeros in place of a last block of an odd count. Vectorized: it runs for every token row of a
 * prefill too (a byte-by-byte form cost a 128-token Q4_0 prefill ~4%). */
static void arrange_z_row(const int8_t *q, const float *d, const float *s16, const float *s32, int K, int8_t *qz,
                          float *dz) {
    const int nb = K / 32;
    for (int b = 0; b < nb; b += 2) {
        const int two = b + 1 < nb, j = b / 2;
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + 32 * b));
        const __m256i x1 = two ? _mm256_loadu_si256((const __m256i *)(q + 32 * (b + 1))) : _mm256_setzero_si256();
        _mm512_storeu_si512((__m512i *)(qz + (size_t)j * 64), interleave256(x0, x1));
        float *f = dz + (size_t)j * MH_ZF;
        f[0] = d[b], f[1] = two ? d[b + 1] : 0.0f, f[2] = s32[b], f[3] = two ? s32[b + 1] : 0.0f;
        f[4] = s16[2 * b], f[5] = two ? s16[2 * b + 2] : 0.0f;
        f[6] = s16[2 * b + 1], f[7] = two ? s16[2 * b + 3] : 0.0f;
    }
}
#endif

/* One token row x[K] into the forms asked for. */
static void prep_row(const float *x, int K, int forms, float *f, uint16_t *h, int8_t *q, float *d, float *s16,
                     float *s32, int8_t *qz, float *dz, int32_t *iz) {
    if (forms & ACT_F) {
        const int C = MH_F_CHUNK, full = C > 1 ? K / C * C : 0;
        for (int c = 0; c < full; c += C)
            for (int i = 0; i < C / 2; i++) {
                f[c + i] = x[c + 2 * i];
                f[c + C / 2 + i] = x[c + 2 * i + 1];
            }
        for (int k = full; k < K; k++) f[k] = x[k];
    }
    if (forms & ACT_H) f32_to_bf16_row(x, K, h);
#ifdef MH_ISA_X86
    if (forms & ACT_Q) quantize_row_avx2(x, K, q, d, s16, s32, iz);
#ifdef MH_X8_ZMM
    if (forms & ACT_Z) arrange_z_row(q, d, s16, s32, K, qz, dz);
#else
    (void)qz, (void)dz;
#endif
#else
    (void)qz, (void)dz, (void)iz;
    if (forms & ACT_Q)
        for (int b = 0; b < K / 32; b++) {
            const float *xb = x + 32 * b;
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
            const float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int sums[2] = {0, 0};
            for (int i = 0; i < 32; i++) {
                const int v = (int)nearbyintf(xb[i] * inv);
                q[32 * b + i] = (int8_t)v;
                sums[i / 16] += v;
            }
            d[b] = db;
            s16[2 * b] = db * (float)sums[0];
            s16[2 * b + 1] = db * (float)sums[1];
            s32[b] = db * (float)(sums[0] + sums[1]);
        }
#endif
}

/* Elements [c0, c0 + n) of token row t of K elements (x: the row's element c0) into a's buffers (rows K apart) in
 * the forms asked for: the same bits as the whole row's, every form being made per element, per 32-block or per
 * pair of blocks (c0 % 64 == 0; n % 64 == 0 unless the piece ends the row). */
static void prep_token_cols(const mh_act *a, int t, const float *x, int K, int c0, int n, int forms) {
    const size_t nb = (size_t)K / 32, r = (size_t)t, zp = (size_t)zpairs(K), e = (size_t)c0;
    prep_row(x, n, forms, a->f + r * K + e, a->h + r * K + e, a->q + r * K + e, a->d + r * nb + e / 32,
             a->s16 + r * 2 * nb + e / 16, a->s32 + r * nb + e / 32, a->qz + (r * zp + e / 64) * 64,
             a->dz + (r * zp + e / 64) * MH_ZF, a->iz + r * zp * 2 + e / 32);
}

/* Token row t of K elements, x [K], into a's buffers (rows K apart) in the forms asked for. */
static void prep_token(const mh_act *a, int t, const float *x, int K, int forms) {
    prep_token_cols(a, t, x, K, 0, K, forms);
}

/* This thread's view of a product's input: rows X [T, ldx], prepared in `forms` (a->T, a->K set by the caller). */
static void act_view(mh_act *a, const float *X, int ldx, int forms) {
    a->forms = forms;
    a->x = X;
    a->ldx = ldx;
}

/* The a->T rows of X [T, ldx] into `a` (a->T, a->K set by the caller; call from every thread). */
static void prep_act(mh_act *a, const float *X, int ldx, int forms) {
    act_view(a, X, ldx, forms);
#pragma omp for schedule(static)
    for (int t = 0; t < a->T; t++) prep_token(a, t, X + (size_t)t * ldx, a->K, forms);
}


/* This thread's share [*n0, *n1) of N rows, in blocks of 8 rows (an interleaved layout's groups: its matrices,
 * and those before it in a group of parts, have rows in multiples of 8), contiguous per thread. */
static void share(int N, int *n0, int *n1) {
    int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int blocks = (N + 7) / 8, per = (blocks + nt - 1) / nt;
    int a = tid * per * 8, b = (tid + 1) * per * 8;
    *n0 = a < N ? a : N;
    *n1 = b < N ? b : N;
}

#ifndef MH_TB
#define MH_TB 48 /* token rows per block: their activations stay in L2 while a thread's weight rows stream */
#endif
#define MH_ROW_BLOCK_BYTES (160 * 1024) /* weight rows per block: they stay in L2 while each token tile passes */

/* The parts' products for all a->T token rows; this thread's share of the parts' rows (call from every thread;
 * no barrier at the end). Loops: token blocks, row blocks (in L2), token tiles (in L1), rows (NR at a time):
 * each weight row is read from memory once per token block, and from L2 once per token tile. */
static void matmul(const mh_part *parts, int np, const mh_act *a) {
    int total = 0;
    for (int p = 0; p < np; p++) total += parts[p].W->rows;
    int r0, r1;
    share(total, &r0, &r1);
#ifndef MH_TILE_ROWS
    float res[MH_NR * MH_MT];
#endif
    const int T = a->T;
    for (int tb = 0; tb < T; tb += MH_TB) {
        const int te = tb + MH_TB < T ? tb + MH_TB : T;
        int base = 0;
        for (int p = 0; p < np; p++) {
            const mh_part *P = &parts[p];
            const int N = P->W->rows;
            const int lo = r0 > base ? r0 - base : 0, hi = r1 - base < N ? r1 - base : N;
            base += N;
            int NR, MT;
            tile_shape(P->W->format, te - tb, &NR, &MT);
            const int64_t rb = P->W->row_bytes;
            int NB = (int)(MH_ROW_BLOCK_BYTES / rb) / NR * NR;
            NB = NB < NR ? NR : NB;
#ifdef MH_DEQ_SCRATCH
            /* quantized rows in prefill: dequantized once per token block into float32 (same values, same sums) */
            const int deq = P->W->format != MH_BF16 && !(int_dot_format(P->W->format) && (a->forms & ACT_Q))
                            && te - tb >= 8 && P->W->cols % 32 == 0;
            float *wf = NULL;
            if (deq) {
                NB = (int)(MH_ROW_BLOCK_BYTES / (4 * (int64_t)P->W->cols));
                NB = NB < 1 ? 1 : NB;
                wf = aligned_alloc(64, ((size_t)NB * P->W->cols * 4 + 63) / 64 * 64);
            }
#endif
            for (int b0 = lo; b0 < hi; b0 += NB) {
                const int b1 = b0 + NB < hi ? b0 + NB : hi;
#ifdef MH_DEQ_SCRATCH
                if (wf) {
                    deq_rows(P->W->format, P->W->data + (size_t)b0 * rb, rb, b1 - b0, P->W->cols, wf);
                    for (int t = tb; t < te; t += MT) {
                        const int mt = te - t < MT ? te - t : MT;
                        tile_f_rows(wf, P->W->cols, b1 - b0, a, t, mt, P, b0);
                    }
                    continue;
                }
#endif
                for (int t = tb; t < te; t += MT) {
                    const int mt = te - t < MT ? te - t : MT;
#ifdef MH_TILE_ROWS
                    tile_rows(P->W->format, P->W->data + (size_t)b0 * rb, rb, b1 - b0, a, t, mt, P, b0);
#else
                    for (int n = b0; n < b1; n += NR) {
                        const int nr = b1 - n < NR ? b1 - n : NR;
                        tile(P->W->format, P->W->data + (size_t)n * rb, rb, nr, a, t, mt, res);
                        for (int r = 0; r < nr; r++) store_out(P, n + r, t, mt, res + r * mt);
                    }
#endif
                }
            }
#ifdef MH_DEQ_SCRATCH
            free(wf);
#endif
        }
    }
}

#endif
