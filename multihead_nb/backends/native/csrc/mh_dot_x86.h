/* x86 tile kernels: NR weight rows x MT token rows of one format, AVX2 + FMA (+ F16C), 256-bit. AVX-512 builds
 * use these too, with vdpbf16ps over 512 bits for bfloat16 weights where AVX-512 BF16 is present (activations then
 * in bfloat16; prefill 4 weight rows x 4 token rows); builds with AVX-VNNI or AVX-512 VNNI sum the integer products
 * with vpdpbusd (MH_VNNI, mh_dot_x86_int.h), AVX-512 VNNI ones Q4_0 / Q4_1 / Q5_0 / Q5_1 512 bits wide
 * (mh_dot_x86_x8.h). Every tile prefetches its weights MH_PF_AHEAD bytes ahead.
 *
 * bfloat16: a 256-bit load holds 16 weights; shifting each 32-bit lane left by 16 gives the even elements as
 * float32, masking off the low half gives the odd ones (no shuffles), so the activations are stored per 16
 * elements as 8 even then 8 odd (MH_F_CHUNK), one accumulator per (row, token) pair.
 * The quantized formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) use integer products against int8 activations
 * (mh_dot_x86_int.h; rows interleaved 8 at a time, mh_dot_x86_x8.h, the usual case) unless the model asks for
 * float32 activations; then they are dequantized to float32 (mh_dot_x86_float.h); bfloat16 weights are
 * mh_dot_x86_bf16.h's. This file: what they share (prefetch, sums) and the dispatch. */
#ifndef MH_DOT_X86_H
#define MH_DOT_X86_H

#define MH_F_CHUNK 16
#define AI static inline __attribute__((always_inline))
/* Before a loop over a tile's token rows (MT <= 8, a constant): unrolled whatever the CPU GCC tunes for. Tuned for an
 * Intel Xeon (-mtune=native), GCC 12 kept tile_x8_blocks2's and the 512-bit K-quant tiles' token loops rolled, their
 * accumulators in memory: a 3-row Q4_0 product's arithmetic took 1.53 ms instead of 1.32 (bench/README.md). */
#define MH_EACH_TOKEN _Pragma("GCC unroll 8")

/* How far ahead of a tile's weight reads to prefetch (bytes), in the first token tile (t0 == 0: the one that reads
 * the rows from memory; later tiles find them in cache). A decode step reads every weight once, a contiguous stream
 * per thread; the hardware prefetchers alone keep too few lines in flight once the products between the loads get
 * heavier (several token rows): 4 KiB ahead took a batch-3 Q4_0 step from ~7.5 to ~6.1 ms on Zen 3
 * (bench/README.md); the row-layout and float32-activation tiles prefetch each row ahead too. */
#ifndef MH_PF_AHEAD
#define MH_PF_AHEAD 4096
#endif
AI void prefetch_ahead(const void *p, int bytes) {
    for (int c = 0; c < bytes; c += 64) _mm_prefetch((const char *)p + MH_PF_AHEAD + c, _MM_HINT_T0);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#include "mh_dot_x86_bf16.h"
#include "mh_dot_x86_float.h"
#include "mh_dot_x86_int.h"
#include "mh_dot_x86_x8.h"

/* ---- dispatch: the format and (NR, MT) as constants in each branch -------------------------------------- */
#define MH_NR 1 /* the most rows and token rows of any tile */
#define MH_BF16_PAIRS 8 /* token rows from which bfloat16 rows go two at a time */
#define MH_MT 8

/* The tile shape the driver asks for: one weight row (read as one stream) against up to 6 token rows for
 * bfloat16 (12 accumulators) in decode, two rows against 3 in prefill (8+ token rows: tile_bf16x2), 4 token rows for
 * quantized weights (8 accumulators and 4 registers of dequantized weights), 3 for interleaved Q4_0 / Q4_1 in
 * prefill (two groups of 8 rows against 3 token rows, tile_x8_pair, took 11% less time per token than one group
 * against 4). With AVX-512 VNNI, prefill's interleaved Q8_0 against 8 token rows and Q4_0 / Q4_1 (two groups,
 * tile_x8_groups2) against 4: a 128-token prefill 2109-2142 -> 2348-2375 tokens/s (Q8_0) and 2108-2151 -> 2277-2287
 * (Q4_0) on an Intel Xeon with 2 threads, each weight block unpacked once for more token rows. */
static inline void tile_shape(int fmt, int T, int *nr, int *mt) {
#ifdef MH_BF16_DOT
    const int bf = 0;
#else
    const int bf = fmt == MH_BF16;
#endif
    *nr = x8_base(fmt) ? 8 : 1; /* the interleaved layouts: row blocks of whole groups of 8 */
    *mt = bf ? (T >= MH_BF16_PAIRS ? 3 : 6) : T >= MH_X8_PAIRS && (fmt == MH_Q4_0X8 || fmt == MH_Q4_1X8) ? 3 : 4;
#ifdef MH_X8_ZMM /* prefill's 512-bit tiles: each weight block unpacked once for more token rows */
#ifdef MH_X8_Q8_YMM
    if (T >= MH_X8_PAIRS && fmt == MH_Q8_0X8) *mt = 4; /* tile_x8_groups2, one chain: 4 sums, 8 pieces */
#else
    if (T >= MH_X8_PAIRS && fmt == MH_Q8_0X8) *mt = 8;                        /* tile_x8_blocks2: 8 sums, 8 pieces */
#endif
    if (T >= MH_X8_PAIRS && (fmt == MH_Q4_0X8 || fmt == MH_Q4_1X8)) *mt = 4; /* tile_x8_groups2: 16 sums, 8 pieces */
#endif
}

#ifndef MH_BF16_DOT
/* Prefill's bfloat16 rows, two at a time (tile_shape), an odd last one alone: a function of its own, so that its
 * registers are allocated apart from the dispatch's many inlined tiles (inlined there, the compiler spilled the
 * token pointers and a weight half, and the tile ran 40% slower). */
AI void bf16_pair_rows_mt(const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0, const int MT,
                          const mh_part *P, int n0) {
    float res[6];
    int n = 0;
    for (; n + 2 <= nrows; n += 2) {
        tile_bf16x2(w + (size_t)n * rb, rb, a, t0, MT, res);
        store_out(P, n0 + n, t0, MT, res);
        store_out(P, n0 + n + 1, t0, MT, res + MT);
    }
    if (n < nrows) {
        tile_bf16(w + (size_t)n * rb, rb, 1, a, t0, MT, res);
        store_out(P, n0 + n, t0, MT, res);
    }
}

static __attribute__((noinline)) void bf16_pair_rows(const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0,
                                                     int mt, const mh_part *P, int n0) {
    switch (mt) {
    case 1: bf16_pair_rows_mt(w, rb, nrows, a, t0, 1, P, n0); break;
    case 2: bf16_pair_rows_mt(w, rb, nrows, a, t0, 2, P, n0); break;
    default: bf16_pair_rows_mt(w, rb, nrows, a, t0, 3, P, n0); break;
    }
}
#endif

#define MH_TILE_ROWS 1
#define MH_MT_BF16(CALL)                                                                                           \
    switch (mt) {                                                                                                  \
    case 1: CALL(1); break;                                                                                        \
    case 2: CALL(2); break;                                                                                        \
    case 3: CALL(3); break;                                                                                        \
    case 4: CALL(4); break;                                                                                        \
    case 5: CALL(5); break;                                                                                        \
    default: CALL(6); break;                                                                                       \
    }
#define MH_MT_Q(CALL)                                                                                              \
    switch (mt) {                                                                                                  \
    case 1: CALL(1); break;                                                                                        \
    case 2: CALL(2); break;                                                                                        \
    case 3: CALL(3); break;                                                                                        \
    default: CALL(4); break;                                                                                       \
    }

/* nrows consecutive rows against one token tile (MT constant): the tile inlined in the row loop, results stored. */
AI void bf16_rows_mt(const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0, const int MT, const mh_part *P,
                     int n0) {
    float res[6];
    for (int n = 0; n < nrows; n++) {
        tile_bf16(w + (size_t)n * rb, rb, 1, a, t0, MT, res);
        store_out(P, n0 + n, t0, MT, res);
    }
}

/* bfloat16 rows against one token tile of mt rows, in a function of its own (as bf16_pair_rows). */
static __attribute__((noinline)) void bf16_rows(const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0,
                                                int mt, const mh_part *P, int n0) {
#ifndef MH_BF16_DOT
    if (a->T >= MH_BF16_PAIRS && mt <= 3) { /* prefill: rows from L2, two at a time */
        bf16_pair_rows(w, rb, nrows, a, t0, mt, P, n0);
        return;
    }
#define MH_ROWS_BF16(M) bf16_rows_mt(w, rb, nrows, a, t0, M, P, n0)
    MH_MT_BF16(MH_ROWS_BF16)
#else
    if (a->T >= MH_BF16_PAIRS && mt == 4) { /* prefill: rows from L2, four at a time */
        float res[16];
        int n = 0;
        for (; n + 4 <= nrows; n += 4) {
            tile_bf16_4x4(w + (size_t)n * rb, rb, a, t0, res);
            for (int r = 0; r < 4; r++) store_out(P, n0 + n + r, t0, 4, res + 4 * r);
        }
        for (; n < nrows; n++) {
            tile_bf16(w + (size_t)n * rb, rb, 1, a, t0, 4, res);
            store_out(P, n0 + n, t0, 4, res);
        }
        return;
    }
#define MH_ROWS_BF16(M) bf16_rows_mt(w, rb, nrows, a, t0, M, P, n0)
    MH_MT_Q(MH_ROWS_BF16)
#endif
#undef MH_ROWS_BF16
}

AI void q_rows(const int fmt, const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0, const int MT,
               const mh_part *P, int n0) {
    float res[4];
    for (int n = 0; n < nrows; n++) {
        tile_q(fmt, w + (size_t)n * rb, rb, 1, a, t0, MT, res);
        store_out(P, n0 + n, t0, MT, res);
    }
}

/* The 8-row token tile: Q8_0x8's in prefill with AVX-512 VNNI (tile_shape); no other function has one. */
#define MH_NO_8(ROWS, F)
#ifdef MH_X8_ZMM
#define MH_ROWS_8(ROWS, F) case 8: ROWS(F, w, rb, nrows, a, t0, 8, P, n0); break;
#else
#define MH_ROWS_8 MH_NO_8
#endif

/* One function per format and kind of product, the token tile's height a constant in each branch: each has its
 * registers allocated on its own (inlined together into the dispatch, the tiles spilled: +17-40%). More token rows
 * than its tiles take (a token block's last 5-7 rows where Q8_0x8's take 8): 4, then the rest. */
#define MH_ROWS_FN(NAME, ROWS, F, EIGHT)                                                                           \
    static __attribute__((noinline)) void NAME(const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0,  \
                                               int mt, const mh_part *P, int n0) {                                \
        switch (mt) {                                                                                              \
        case 1: ROWS(F, w, rb, nrows, a, t0, 1, P, n0); break;                                                     \
        case 2: ROWS(F, w, rb, nrows, a, t0, 2, P, n0); break;                                                     \
        case 3: ROWS(F, w, rb, nrows, a, t0, 3, P, n0); break;                                                     \
        case 4: ROWS(F, w, rb, nrows, a, t0, 4, P, n0); break;                                                     \
        EIGHT(ROWS, F)                                                                                             \
        default:                                                                                                   \
            ROWS(F, w, rb, nrows, a, t0, 4, P, n0);                                                                \
            NAME(w, rb, nrows, a, t0 + 4, mt - 4, P, n0);                                                          \
        }                                                                                                          \
    }
MH_ROWS_FN(rows_q8_0_int, qi_rows, MH_Q8_0, MH_NO_8)
MH_ROWS_FN(rows_q4_0_int, qi_rows, MH_Q4_0, MH_NO_8)
MH_ROWS_FN(rows_q4_1_int, qi_rows, MH_Q4_1, MH_NO_8)
MH_ROWS_FN(rows_q5_0_int, qi_rows, MH_Q5_0, MH_NO_8)
MH_ROWS_FN(rows_q5_1_int, qi_rows, MH_Q5_1, MH_NO_8)
MH_ROWS_FN(rows_q4_k_int, qi_rows, MH_Q4_K, MH_NO_8)
MH_ROWS_FN(rows_q5_k_int, qi_rows, MH_Q5_K, MH_NO_8)
MH_ROWS_FN(rows_q6_k_int, qi_rows, MH_Q6_K, MH_NO_8)
MH_ROWS_FN(rows_q8_0_f32, q_rows, MH_Q8_0, MH_NO_8)
MH_ROWS_FN(rows_q4_0_f32, q_rows, MH_Q4_0, MH_NO_8)
MH_ROWS_FN(rows_q4_1_f32, q_rows, MH_Q4_1, MH_NO_8)
MH_ROWS_FN(rows_q5_0_f32, q_rows, MH_Q5_0, MH_NO_8)
MH_ROWS_FN(rows_q5_1_f32, q_rows, MH_Q5_1, MH_NO_8)
MH_ROWS_FN(rows_q4_k_f32, q_rows, MH_Q4_K, MH_NO_8)
MH_ROWS_FN(rows_q5_k_f32, q_rows, MH_Q5_K, MH_NO_8)
MH_ROWS_FN(rows_q6_k_f32, q_rows, MH_Q6_K, MH_NO_8)
MH_ROWS_FN(rows_q8_0x8, x8_rows, MH_Q8_0X8, MH_ROWS_8)
MH_ROWS_FN(rows_q4_0x8, x8_rows, MH_Q4_0X8, MH_NO_8)
MH_ROWS_FN(rows_q4_1x8, x8_rows, MH_Q4_1X8, MH_NO_8)
MH_ROWS_FN(rows_q5_0x8, x8_rows, MH_Q5_0X8, MH_NO_8)
MH_ROWS_FN(rows_q5_1x8, x8_rows, MH_Q5_1X8, MH_NO_8)
MH_ROWS_FN(rows_q4_kx8, x8_rows, MH_Q4_KX8, MH_NO_8)
MH_ROWS_FN(rows_q5_kx8, x8_rows, MH_Q5_KX8, MH_NO_8)
MH_ROWS_FN(rows_q6_kx8, x8_rows, MH_Q6_KX8, MH_NO_8)
#undef MH_ROWS_FN

typedef void (*mh_rows_fn)(const uint8_t *, int64_t, int, const mh_act *, int, int, const mh_part *, int);

/* Rows n0 .. n0 + nrows - 1 of a part (w: the first one) against token rows t0 .. t0 + mt - 1. */
static void tile_rows(int fmt, const uint8_t *w, int64_t rb, int nrows, const mh_act *a, int t0, int mt,
                      const mh_part *P, int n0) {
    const int q = (a->forms & ACT_Q) != 0; /* integer products (else float32) */
    mh_rows_fn f = NULL;
    switch (fmt) {
    case MH_BF16: f = bf16_rows; break;
    case MH_Q8_0: f = q ? rows_q8_0_int : rows_q8_0_f32; break;
    case MH_Q4_0: f = q ? rows_q4_0_int : rows_q4_0_f32; break;
    case MH_Q4_1: f = q ? rows_q4_1_int : rows_q4_1_f32; break;
    case MH_Q5_0: f = q ? rows_q5_0_int : rows_q5_0_f32; break;
    case MH_Q5_1: f = q ? rows_q5_1_int : rows_q5_1_f32; break;
    case MH_Q4_K: f = q ? rows_q4_k_int : rows_q4_k_f32; break;
    case MH_Q5_K: f = q ? rows_q5_k_int : rows_q5_k_f32; break;
    case MH_Q6_K: f = q ? rows_q6_k_int : rows_q6_k_f32; break;
    case MH_Q8_0X8: f = rows_q8_0x8; break;
    case MH_Q4_0X8: f = rows_q4_0x8; break;
    case MH_Q4_1X8: f = rows_q4_1x8; break;
    case MH_Q5_0X8: f = rows_q5_0x8; break;
    case MH_Q5_1X8: f = rows_q5_1x8; break;
    case MH_Q4_KX8: f = rows_q4_kx8; break;
    case MH_Q5_KX8: f = rows_q5_kx8; break;
    case MH_Q6_KX8: f = rows_q6_kx8; break;
    default: return;
    }
    f(w, rb, nrows, a, t0, mt, P, n0);
}

#endif
