/* Attention over an int8 K/V cache (mh_attention_int8.h's rows, a scale per 32 values) in the AVX-512 BF16 builds
 * (MH_ATT_BF16; the other x86 builds: mh_attention_int8_x86.h): a task's chunk of key and value rows is turned into
 * bfloat16 rows (each int8 times its scale, rounded to nearest even by vcvtne2ps2bf16) in the thread's scratch, a lone
 * token's keys 4 at a time just before their scores (kv8_turn_keys), a prompt block's chunk at once, laid out as a
 * page lays them out (a key's KV heads side by side, its value row a fixed stride further). The bfloat16 cache's own
 * attention then runs on them unchanged: lone tokens (attend_part_avx2, attend_part_allkv) and prompt blocks
 * (block_chunk, its vdpbf16ps tiles) alike, so a token's attention is the same bits alone, in a batch, in chunks and
 * in a prompt block, and a prompt's attention is as fast as with the bfloat16 cache (the earlier form, float32 rows
 * and each prompt token's multiply-adds its own, took 18-30% longer prefills here). The values carry one more
 * rounding than the other builds' float32 rows, to bfloat16: what the bfloat16 cache stores.
 * Included by mh_attention_avx2.h; knows nothing of the threads' split. */
#ifndef MH_ATTENTION_INT8_BF16_H
#define MH_ATTENTION_INT8_BF16_H

#if defined(MH_ATT_BF16)
/* 32 int8 values q times the scale s -> bfloat16 out [32], rounded to nearest even. */
static inline void kv8_block_bf16(const int8_t *q, float s, uint16_t *out) {
    const __m512 sv = _mm512_set1_ps(s);
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), sv);
    const __m512 hi =
        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), sv);
    _mm512_storeu_si512((void *)out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

/* Bfloat16 scratch (uint16) a task of n keys over nh KV heads needs with kv8_chunk_rows: its key and value rows. */
static inline size_t kv8_scratch_halves(int n, int nh, int d) { return 2 * (size_t)n * nh * d; }

#ifndef MH_KV8_AHEAD_X86
#define MH_KV8_AHEAD_X86 4 /* keys whose int8 rows kv8_turn_keys asks for ahead of the ones it turns */
#endif

/* A key's int8 rows (r: its key row of `row` values, the value row m->kv_stride bytes on) and their scales (sc) asked
 * for into L1 (the hardware prefetchers do not follow a block table). */
static inline void kv8_fetch_key(const mh_model *m, const int8_t *r, const float *sc, int row) {
    for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(r + c), _MM_HINT_T0);
    for (int c = 0; c < row; c += 64) _mm_prefetch((const char *)(r + m->kv_stride + c), _MM_HINT_T0);
    _mm_prefetch((const char *)sc, _MM_HINT_T0);
    _mm_prefetch((const char *)(sc + m->kv_stride / 32), _MM_HINT_T0);
}

/* Keys [j0, j0 + n) of sequence seq, layer `layer`, KV heads [h0, h0 + nh), of the int8 cache: their rows and scales
 * (rows, scs: kv8_rows) and where kv8_turn_keys puts them in bfloat16 in buf (kv8_scratch_halves(n, nh, d)): key j's
 * row (its nh heads side by side) at kp[j] = buf + j nh d, its value row n nh d further. Returns mb, a copy of m
 * whose kv_stride (elements, key row to value row) is that distance, for the bfloat16 attention to read those rows
 * as it reads a page's. The first keys' rows are asked for. */
static const mh_model *kv8_chunk_rows(const mh_model *m, const mh_step *s, int layer, int seq, int h0, int nh, int j0,
                                      int n, uint16_t *buf, const int8_t **rows, const float **scs, const uint16_t **kp,
                                      mh_model *mb) {
    const int row = nh * m->head_dim;
    kv8_rows(m, s, layer, seq, h0, j0, n, rows, scs); /* head h0's; head h0 + hh's hh d (scales hh d / 32) on */
    for (int j = 0; j < n; j++) kp[j] = buf + (size_t)j * row;
    *mb = *m;
    mb->kv_stride = (int64_t)n * row, mb->kv_int8 = 0;
    for (int j = 0; j < n && j < MH_KV8_AHEAD_X86; j++) kv8_fetch_key(m, rows[j], scs[j], row);
    return mb;
}

/* Keys [a, b) of a kv8_chunk_rows chunk (n keys, `row` values each; m the cache's model) turned into bfloat16: their
 * key rows at buf + j row, value rows n row further; the rows MH_KV8_AHEAD_X86 keys on asked for. */
static inline void kv8_turn_keys(const mh_model *m, const int8_t *const *rows, const float *const *scs, int row, int n,
                                 uint16_t *buf, int a, int b) {
    const int64_t vrow = m->kv_stride, vsc = m->kv_stride / 32, vbuf = (int64_t)n * row;
    for (int j = a; j < b; j++) {
        if (j + MH_KV8_AHEAD_X86 < n)
            kv8_fetch_key(m, rows[j + MH_KV8_AHEAD_X86], scs[j + MH_KV8_AHEAD_X86], row);
        uint16_t *k = buf + (size_t)j * row;
        for (int c = 0; c < row / 32; c++) {
            kv8_block_bf16(rows[j] + 32 * c, scs[j][c], k + 32 * c);
            kv8_block_bf16(rows[j] + vrow + 32 * c, scs[j][vsc + c], k + vbuf + 32 * c);
        }
    }
}

#endif
#endif
