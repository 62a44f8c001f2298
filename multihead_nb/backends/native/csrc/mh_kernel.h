/* Shared by the fused CPU forward's sources: which instruction set this build targets, the structs Python fills
 * (mirrored in cpu_kernel.py), the weight formats, bfloat16 / half conversions and the scratch allocator (alloc64).
 * Owns no state; knows nothing of layers, attention or how a matrix product is tiled. */
#ifndef MH_KERNEL_H
#define MH_KERNEL_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif

/* ---- the instruction set: one per build, chosen by the flags cpu_kernel.py compiles with ------------------ */
#if defined(MH_SCALAR)
#define MH_ISA_SCALAR 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MH_ISA_X86 1 /* AVX2 + FMA + F16C; AVX-512 builds use the same kernels plus what is noted below */
#include <immintrin.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MH_BF16_DOT 1 /* bfloat16 weights: vdpbf16ps over 32 elements */
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define MH_ISA_NEON 1
#include <arm_neon.h>
#else
#define MH_ISA_SCALAR 1
#endif

/* ---- weight formats (GGUF's block layouts, as llama.cpp's ggml-common.h defines them) --------------------- */
enum { MH_BF16 = 1, MH_Q8_0 = 2, MH_Q4_0 = 3, MH_Q4_1 = 4, MH_Q4_K = 5, MH_Q6_K = 6, MH_Q5_0 = 7, MH_Q5_1 = 8,
       MH_Q5_K = 16 };
/* The same blocks with each 8 rows interleaved (quant.py's `interleave`, read by mh_dot_x86_x8.h): rows 8r .. 8r + 7
 * take 8 row_bytes together; block b of the 8 rows is 8 blocks' bytes: each half-precision field of the 8 (d, and
 * m for Q4_1 / Q5_1) as 8 values side by side, for Q5_0 / Q5_1 then 4 bytes per row of fifth bits (row i at 4 i;
 * bit c of its byte k: the fifth bit of element 4 c + k, so that one mask per piece finds them), then the quants
 * (qs) in 4-byte pieces, piece c of row i at 32 c + 4 i. Q4_K's, per 256-element super-block of the 8 rows (1152
 * bytes, 144 a row): d x 8, dmin x 8, each of the 12 scale bytes x 8 (byte k of row i at 32 + 8 k + i), then qs in
 * 4-byte pieces (piece p of row i at 128 + 32 p + 4 i; pieces 8 q .. 8 q + 7 hold sub-block 2 q in their low
 * nibbles, 2 q + 1 in their high ones); Q5_K's the same with its qh in 4-byte pieces between the scales and qs
 * (piece c of row i at 128 + 32 c + 4 i; qs from 384). Q6_K's (1680 bytes, 210 a row): ql in 4-byte pieces (piece
 * p of row i at 32 p + 4 i), qh in 4-byte pieces (at 1024 + 32 p + 4 i), each of the 16 scales x 8 (1536 + 8 k + i), d x 8. */
enum { MH_Q8_0X8 = 9, MH_Q4_0X8 = 10, MH_Q4_1X8 = 11, MH_Q5_0X8 = 12, MH_Q5_1X8 = 13, MH_Q4_KX8 = 14,
       MH_Q6_KX8 = 15, MH_Q5_KX8 = 17 };

typedef struct {            /* a weight matrix [rows, cols], each row `row_bytes` of packed blocks */
    const uint8_t *data;
    int32_t format, rows, cols;
    int64_t row_bytes;
} mh_matrix;

typedef struct {
    const float *ln1, *ln2;            /* [h] */
    mh_matrix q, k, v;                 /* [H d, h], [KV d, h], [KV d, h] */
    const float *bqkv;                 /* [(H + 2KV) d] or NULL */
    const float *q_norm, *k_norm;      /* [d] or NULL (qwen3) */
    mh_matrix o;                       /* [h, H d] */
    const float *bo;                   /* [h] or NULL */
    mh_matrix gate, up, down;          /* [I, h], [I, h], [h, I] */
} mh_layer;

typedef struct {
    int32_t num_layers, hidden, heads, kv_heads, head_dim, inter, vocab;
    float eps;
    int32_t tokens_per_page, sliding_window; /* sliding_window 0 = none */
    const mh_layer *layers;
    mh_matrix embed, lm_head;          /* [V, h] each (may be the same bytes) */
    const float *final_norm;           /* [h] */
    uint16_t *cache;                   /* the arena, as bfloat16 elements (int8 ones where kv_int8) */
    int64_t page_stride, kv_stride, layer_stride; /* elements: page to page, keys to values, layer to layer */
    int32_t int8_activations;          /* x86: products of the 32-element block formats against int8 activations
                                          (else float32); NEON always int8, the scalar build float32 */
    int32_t num_pages;                 /* the arena's pages (a block table's ids are below it) */
    int32_t kv_int8;                   /* 1: K/V as int8 with a float32 scale per 32 (mh_attention_int8.h);
                                          the strides then count bytes */
    int64_t kv_scales;                 /* kv_int8: the byte in each page where the scales start */
} mh_model;

typedef struct {
    int32_t T, S, max_pages, max_ctx, num_threads, num_logits;
    const int64_t *input_ids;          /* [T] */
    const int32_t *seq_of, *pos;       /* [T] sequence index and position of each token */
    const int32_t *block_tables;       /* [S, max_pages]: row s's first ceil(ctx_lens[s] / tokens_per_page) read */
    const float *cos, *sin;            /* [rope_rows, d] by position; sin signed: rope(x) = x cos + roll(x, d/2) sin */
    const int32_t *logits_idx;         /* [num_logits] token rows whose logits are wanted */
    float *logits;                     /* [num_logits, V] out */
    const int32_t *ctx_lens;           /* [S] each sequence's context after this step (its positions are below) */
    int32_t rope_rows;                 /* rows of cos and sin (positions below it) */
} mh_step;

/* Scratch of `bytes` aligned to a cache line, rounded up (free() releases it). */
static inline void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64); }

/* ---- conversions ------------------------------------------------------------------------------------------ */
static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40); /* NaN stays NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}

/* n floats -> bfloat16 out[n], each as f32_to_bf16 (the same bits); on x86 8 at a time. */
static inline void f32_to_bf16_row(const float *x, int n, uint16_t *out) {
    int i = 0;
#if defined(MH_ISA_X86)
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i half = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
    for (; i + 8 <= n; i += 8) {
        const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + i)), hi = _mm256_srli_epi32(u, 16);
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, magnitude), inf); /* positive: signed compare */
        const __m256i up = _mm256_add_epi32(half, _mm256_and_si256(hi, one)); /* to nearest, ties to even */
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, up), 16);
        const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, quiet), nan); /* [8] values < 2^16 */
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
#endif
    for (; i < n; i++) out[i] = f32_to_bf16(x[i]);
}

static inline float f16_to_f32(uint16_t h) { /* IEEE half, exact (every half is a float) */
#if defined(MH_ISA_X86)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    union { uint32_t u; float f; } c;
    if (exp == 0) { /* zero or subnormal: man * 2^-24 */
        c.f = (float)man * 5.9604644775390625e-08f;
        c.u |= sign;
        return c.f;
    }
    c.u = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
    return c.f;
#endif
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

#endif
