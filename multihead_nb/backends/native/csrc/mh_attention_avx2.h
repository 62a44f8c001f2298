/* AVX2 + FMA attention (every x86 build, AVX-512 ones too): a token's context cut in chunks of keys, one task per
 * (token, KV head, chunk), or for small KV rows per (token, chunk) with every KV head
 * (attend_part_allkv), so a lone decode token's attention spreads over the threads, merged by log-sum-exp
 * (attn_merge). The per-key operations (key rows, widening, scores, softmax, value sums) are
 * mh_attention_x86_ops.h's, which mh_attention_block.h, included here, shares for blocks of prompt tokens, whose
 * results must be the same bits. Included by mh_attention.h, whose scalar attention it replaces where it applies;
 * knows nothing of layers or of the threads' split. */
#ifndef MH_ATTENTION_AVX2_H
#define MH_ATTENTION_AVX2_H
#if defined(MH_ISA_X86)
#include "mh_attention_x86_ops.h"

/* How far ahead a lone token's attention fetches its key rows. 8 kept 16 lines in flight per thread: ~17-20 GB/s of
 * K/V on a Zen 5 whose stream reads 46 (the attention of a batch-3 step 1.61 M cycles at 128-190 keys); 32: 1.27 M,
 * and batch 1 0.57 -> 0.49 M (64, the whole chunk at once, no better). */
#define MH_KEYS_AHEAD 32

#include "mh_attention_int8_bf16.h"

/* The rows a lone token's task reads: keys [j0, j0 + n) of KV heads [h0, h0 + nh), KV head h0's rows into kp (head
 * h0 + h's h d further). Returns the model that says where their value rows are: m, or with the int8 K/V cache of
 * AVX-512 BF16 builds mb, for the bfloat16 rows kv8_chunk_rows places in kv8 (rows8, scs8 [n]: the int8 rows and
 * scales kv8_turn_keys turns into them). */
static const mh_model *task_rows(const mh_model *m, const mh_step *s, int layer, int seq, int h0, int nh, int j0, int n,
                                 uint16_t *kv8, const int8_t **rows8, const float **scs8, const uint16_t **kp,
                                 mh_model *mb) {
#if defined(MH_ATT_BF16)
    if (m->kv_int8) return kv8_chunk_rows(m, s, layer, seq, h0, nh, j0, n, kv8, rows8, scs8, kp, mb);
#endif
    (void)nh, (void)kv8, (void)rows8, (void)scs8, (void)mb;
    key_rows(m, s, layer, seq, h0, j0, n, kp);
    return m;
}

/* One chunk [j0, j1] of token t's keys, the G (<= 8) query heads of KV head kvh (d % 8 == 0, d <= 256), in AVX2 +
 * FMA: scores of 4 keys x 3 heads at a time (each key row widened once for 3 heads), a vectorized exp, values
 * summed 32 columns x 3 heads at a time (values_32x3). AVX-512 builds sum the values' same multiply-adds 64 columns
 * at a time (values_64x3: the same bits) and the scores over 16 lanes where d % 32 == 0 (scores16_4x3: this
 * build's own order; otherwise the 8-lane loops' multiply-adds, two keys per vector); AVX-512 BF16 builds, where
 * d % 64 == 0, both by vdpbf16ps (scores_bf16_4x3, values_bf16_64x3; the weights rounded in place in sc);
 * queries_x3, scores_x3, weights_for_values and values_x3 choose among them. Writes the
 * unnormalized output o [G, d], the scores' max mx [G] and the sum of exp(score - max) sm [G]; `attn_merge`
 * combines a token's chunks. sc: scratch [G, ldsc >= n]. next [nnext]: key rows to fetch for the thread's next
 * task. With the int8 K/V cache (m->kv_int8; AVX-512 BF16 builds: the others run attend_part_int8_x86) the chunk's
 * rows are turned into bfloat16 ones in kv8 (kv8_scratch_halves(n, 1, d)), 4 keys at a time before their scores
 * (kv8_turn_keys), which the rest reads. */
static void attend_part_avx2(const mh_model *m, const mh_step *s, int layer, int t, int kvh, const float *q, int j0,
                             int j1, float *sc, int ldsc, float *o, float *mx, float *sm, const uint16_t *const *next,
                             int nnext, uint16_t *kv8) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, n = j1 - j0 + 1, seq = s->seq_of[t];
    float qf[(MH_GROUP_MAX + 2) / 3 * 3 * MH_GROUP_DIM];
    queries_kvh(q, G, d, qf);
    const uint16_t *kp_all[n];
    const int8_t *rows8[m->kv_int8 ? n : 1]; /* the int8 cache's rows and scales, turned 4 keys at a time */
    const float *scs8[m->kv_int8 ? n : 1];
    const mh_model *m8 = m; /* the cache's model; m, where the rows read are */
    mh_model mb;
    m = task_rows(m8, s, layer, seq, kvh, 1, j0, n, kv8, rows8, scs8, kp_all, &mb);
    /* The pages are scattered in the arena and the weights streamed since this layer's keys were written have
     * pushed them out of cache: fetch each key row MH_KEYS_AHEAD keys ahead, and its value row while its key is
     * used (the hardware prefetchers do not follow a block table). */
    const int row_bytes = 2 * d;
    for (int j = 0; j < n && j < MH_KEYS_AHEAD; j++)
        prefetch_row(kp_all[j], row_bytes);
    for (int g0 = 0; g0 < G; g0 += 3) {
        const int ng = G - g0 < 3 ? G - g0 : 3;
        for (int k0 = 0; k0 < n; k0 += 4) {
            const int nk = n - k0 < 4 ? n - k0 : 4;
            const uint16_t *kp[4];
            for (int i = 0; i < 4; i++) kp[i] = kp_all[k0 + (i < nk ? i : nk - 1)];
#if defined(MH_ATT_BF16)
            if (g0 == 0 && m8->kv_int8) kv8_turn_keys(m8, rows8, scs8, d, n, kv8, k0, k0 + nk);
#endif
            if (g0 == 0 && !m8->kv_int8)
                for (int i = 0; i < nk; i++)
                    for (int c = 0; c < row_bytes; c += 64) {
                        if (k0 + MH_KEYS_AHEAD + i < n)
                            _mm_prefetch((const char *)kp_all[k0 + MH_KEYS_AHEAD + i] + c, _MM_HINT_T0);
                        _mm_prefetch((const char *)(kp_all[k0 + i] + m->kv_stride) + c, _MM_HINT_T0);
                    }
            __m128 r4s[3];
            scores_x3(qf + (size_t)g0 * d, kp, d, ng, r4s);
            for (int g = 0; g < ng; g++) store_scores4(sc + (size_t)(g0 + g) * ldsc, k0, ldsc, nk, r4s[g]);
        }
    }
    softmax_rows(sc, ldsc, G, n, mx, sm);
    weights_for_values(sc, ldsc, G, n, d);
    for (int j = 0; j < nnext; j++) /* the next task's first keys, while the values are summed */
        prefetch_row(next[j], row_bytes);
    for (int g0 = 0; g0 < G; g0 += 3) {
        const int ng = G - g0 < 3 ? G - g0 : 3;
        const float *pr[3]; /* the heads' weights (heads past G repeat the last) */
        rows3(sc, ldsc, g0, ng, pr);
        values_x3(kp_all, m->kv_stride, n, pr, ng, d, o + (size_t)g0 * d);
    }
}

#include "mh_attention_allkv.h"
#include "mh_attention_int8_x86.h"
#include "mh_attention_block.h"

/* A token's `nch` chunk results (o [nch, G, d], mx and sm [nch, G]) -> its attention output out [G, d]: each chunk
 * weighted by exp(its max - the overall max), summed in chunk order 8 columns at a time, over the weighted sums. */
static void attn_merge(int G, int d, int nch, const float *o, const float *mx, const float *sm, float *out) {
    for (int g = 0; g < G; g++) {
        float best = -INFINITY;
        for (int c = 0; c < nch; c++) best = mx[c * G + g] > best ? mx[c * G + g] : best;
        float tot = 0.0f, wgt[64];
        for (int c = 0; c < nch; c++) { /* exp256 and explicit FMAs: block_merge's operations, one lane of them */
            wgt[c] = nch == 1 ? 1.0f : _mm256_cvtss_f32(exp256(_mm256_set1_ps(mx[c * G + g] - best)));
            tot = fmaf(wgt[c], sm[c * G + g], tot);
        }
        const __m256 tv = _mm256_set1_ps(tot);
        for (int i = 0; i < d; i += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int c = 0; c < nch; c++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(wgt[c]), _mm256_loadu_ps(o + ((size_t)c * G + g) * d + i), acc);
            _mm256_storeu_ps(out + (size_t)g * d + i, _mm256_div_ps(acc, tv));
        }
    }
}
#endif
#endif
