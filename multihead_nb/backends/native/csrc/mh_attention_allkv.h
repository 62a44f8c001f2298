/* Attention of a lone token's chunk of keys for every KV head in one task (x86 builds): attend_part_allkv reads each
 * key's whole row, its KV heads side by side, where attend_part_avx2 reads one head's; the per-(head, key) operations
 * are attend_part_avx2's, so the bits are the same. Included by mh_attention_avx2.h (its helpers:
 * mh_attention_x86_ops.h); the task plan that chooses it is mh_attention_plan.h's. */
#ifndef MH_ATTENTION_ALLKV_H
#define MH_ATTENTION_ALLKV_H
/* Whether a lone token's chunk takes all its KV heads in one task (attend_part_allkv): where a key's row for every KV
 * head (2 d KV bytes, side by side in the page) is at most 8 cache lines. */
#define MH_ALLKV_MAX 32 /* KV heads: 2 d KV <= 512 with d % 8 == 0 */
static inline int att_allkv_fits(const mh_model *m) {
    return 2 * m->head_dim * m->kv_heads <= 512;
}

/* How many keys ahead attend_part_allkv fetches its key rows, and of the thread's next task: about 24 cache lines
 * (at most MH_KEYS_AHEAD keys). 32 keys of 6 lines (SmolLM2-135M) asked for 192 lines at once, and the fetch
 * instructions waited for the L1's miss buffers, the arithmetic behind them. On a Zen 2 (Q4_0, builds alternated in
 * one process, 10 rounds of 24 steps), 4 keys against 32: a step at batch 3 after 1024-token contexts 13.36 -> 12.91
 * ms (faster in all 10 rounds; another run 12.72 -> 12.06), at batch 1 8.12 -> 7.83; after 160 tokens the same
 * (bench/README.md). */
#ifndef MH_ALLKV_LINES_AHEAD
#define MH_ALLKV_LINES_AHEAD 24
#endif
/* How many keys ahead attend_part_allkv also asks for its key and value rows into the L2 (prefetcht1): the near
 * fetches above fill the L1's miss buffers, the L2 has more. In AVX-512 builds, and in AVX2 builds where the CPU's
 * prefetcht1 stops at the L2 (MH_PREFETCH_L2: cpu_isa.py's prefetch_t1_l2, Intel and AMD from Zen 4; on the AMD
 * CPUs before Zen 4 prefetcht1 fills the L1 too, per public measurements, and 32 keys of rows asked for into the L1
 * was slower). Near the end of a chunk the stream goes on into the thread's next task's first keys (`next`), so a
 * task's first 32 keys do not wait on the memory one fetch at a time. Zen 4, the real Q4_0 file, in one process
 * against the stream stopping at the chunk's end (bench/README.md): a step at batch 3 after 1024-token contexts 8.93
 * -> 8.16 ms, batch 1 5.33 -> 5.13; after 128 tokens batch 3 5.24 -> 5.01; the AVX2 build, which had no far stream,
 * 12.48 -> 10.77 and 5.46 -> 4.95. Zen 4, when the far stream came in (then stopping at the chunk's end), against
 * none: a step at batch 3 after 1024-token contexts 9.13 -> 8.41 ms. */
#ifndef MH_ALLKV_FAR_KEYS
#if defined(MH_ATT_ZMM) || MH_PREFETCH_L2
#define MH_ALLKV_FAR_KEYS 32
#else
#define MH_ALLKV_FAR_KEYS 0
#endif
#endif
_Static_assert(MH_ALLKV_FAR_KEYS <= MH_KEYS_AHEAD, "the next task's rows are at most MH_KEYS_AHEAD");

static inline int att_allkv_ahead(const mh_model *m) {
    const int lines = (2 * m->head_dim * m->kv_heads + 63) / 64, keys = (MH_ALLKV_LINES_AHEAD + lines - 1) / lines;
    return keys < MH_KEYS_AHEAD ? keys : MH_KEYS_AHEAD;
}

/* How many of the thread's next task's first key rows attend_part_allkv is handed (`next`): those it fetches into
 * the L1 (att_allkv_ahead) or, where the far stream runs, into the L2. */
static inline int att_allkv_next(const mh_model *m) {
    const int near = att_allkv_ahead(m);
    return near > MH_ALLKV_FAR_KEYS ? near : MH_ALLKV_FAR_KEYS;
}

/* One chunk [j0, j1] of token t for every KV head at once (att_allkv_fits): for each 4 keys, each KV head's scores as
 * attend_part_avx2 forms them (4 keys x 3 query heads, the same operations: scores_x3, values_x3), so each key's
 * whole row, its KV heads side by side, is read together, a page's keys one after the other. attend_part_avx2 reads
 * one head's 2 d bytes of every 2 d KV, which the L2's prefetcher cannot follow; on a Zen 2 (Q4_0 SmolLM2-135M, one
 * process, builds alternated) a step at batch 1 after 1024-token contexts took 8.33 -> 7.66 ms, at batch 3 16.08 ->
 * 14.00; after 160 tokens 6.05 -> 5.86 and 8.85 -> 8.23. In AVX-512 builds (their bfloat16 and 16-lane scores,
 * by queries_x3 / scores_x3) on a Zen 4, Q4_0, a task per KV head against this: batch 3 after 1024-token contexts
 * 13.58 -> 10.47 ms, batch 1 7.21 -> 6.58; after 160 tokens 6.74 -> 6.18; attention alone (cold, 1024 keys) 145 -> 92
 * ns per key (bench/README.md). q: the token's H d queries; sc: scratch [H, ldsc >= n]; qf: scratch [KV,
 * queries_kvh_floats(G, d)] (each KV head's queries as queries_kvh prepares them); per KV head h: o[h] [G, d],
 * mx[h], sm[h] [G] (attend_part_avx2's outputs); next [nnext <= att_allkv_next]: key rows (KV head 0) of the
 * thread's next task's first keys: the far stream's (MH_ALLKV_FAR_KEYS) into the L2 during the last keys' scores, the
 * first att_allkv_ahead whole into the L1 while the values are summed. With the int8 K/V cache (m->kv_int8;
 * AVX-512 BF16 builds: the others run attend_part_int8_x86) the chunk's rows are turned into bfloat16 ones in kv8
 * (kv8_scratch_halves(n, KV, d)), 4 keys at a time before their scores (kv8_turn_keys), which the rest reads. */
static void attend_part_allkv(const mh_model *m, const mh_step *s, int layer, int t, const float *q, int j0, int j1,
                              float *sc, int ldsc, float *qf, float *const *o, float *const *mx, float *const *sm,
                              const uint16_t *const *next, int nnext, uint16_t *kv8) {
    const int d = m->head_dim, KV = m->kv_heads, G = m->heads / KV, n = j1 - j0 + 1, qkv = queries_kvh_floats(G, d);
    for (int kvh = 0; kvh < KV; kvh++) queries_kvh(q + (size_t)kvh * G * d, G, d, qf + (size_t)kvh * qkv);
    const uint16_t *kp_all[n];
    const int8_t *rows8[m->kv_int8 ? n : 1]; /* the int8 cache's rows and scales, turned 4 keys at a time */
    const float *scs8[m->kv_int8 ? n : 1];
    const mh_model *m8 = m; /* the cache's model; m, where the rows read are (KV head 0's; head h's h d further) */
    mh_model mb;
    m = task_rows(m8, s, layer, s->seq_of[t], 0, KV, j0, n, kv8, rows8, scs8, kp_all, &mb);
    const int row_bytes = 2 * d * KV, ahead = att_allkv_ahead(m);
    for (int j = 0; j < n && j < ahead && !m8->kv_int8; j++) prefetch_row(kp_all[j], row_bytes);
    for (int k0 = 0; k0 < n; k0 += 4) {
        const int nk = n - k0 < 4 ? n - k0 : 4;
#if defined(MH_ATT_BF16)
        if (m8->kv_int8) kv8_turn_keys(m8, rows8, scs8, KV * d, n, kv8, k0, k0 + nk);
#endif
        for (int kvh = 0; kvh < KV; kvh++) {
            /* this KV head's lines of the key rows `ahead` keys on and of the 4 keys' value rows: a few at a time
             * between the products, not the rows' every line at once (48 fetches in a burst filled the L1's miss
             * buffers). Zen 2, Q4_0, builds alternated in one process: a step at batch 3 after 1024-token contexts
             * 11.40 -> 10.41 ms, at batch 1 6.49 -> 6.14; after 160 tokens 5.72 -> 5.42 (bench/README.md). And in
             * AVX-512 builds the rows MH_ALLKV_FAR_KEYS on, into the L2. */
            for (int i = 0; i < nk && !m8->kv_int8; i++) /* (the int8 rows: kv8_turn_keys) */
                for (int c = kvh * 2 * d; c < (kvh + 1) * 2 * d; c += 64) {
                    if (k0 + ahead + i < n) _mm_prefetch((const char *)kp_all[k0 + ahead + i] + c, _MM_HINT_T0);
                    _mm_prefetch((const char *)(kp_all[k0 + i] + m->kv_stride) + c, _MM_HINT_T0);
                    const int jf = k0 + MH_ALLKV_FAR_KEYS + i; /* past the chunk: the next task's key jf - n */
                    if (MH_ALLKV_FAR_KEYS && jf < n + nnext) {
                        const uint16_t *far = jf < n ? kp_all[jf] : next[jf - n];
                        _mm_prefetch((const char *)far + c, _MM_HINT_T1);
                        _mm_prefetch((const char *)(far + m->kv_stride) + c, _MM_HINT_T1);
                    }
                }
            const uint16_t *kp[4];
            for (int i = 0; i < 4; i++) kp[i] = kp_all[k0 + (i < nk ? i : nk - 1)] + kvh * d;
            for (int g0 = 0; g0 < G; g0 += 3) {
                const int ng = G - g0 < 3 ? G - g0 : 3;
                __m128 r4s[3];
                scores_x3(qf + (size_t)kvh * qkv + (size_t)g0 * d, kp, d, ng, r4s);
                for (int g = 0; g < ng; g++)
                    store_scores4(sc + (size_t)(kvh * G + g0 + g) * ldsc, k0, ldsc, nk, r4s[g]);
            }
        }
    }
    for (int kvh = 0; kvh < KV; kvh++) softmax_rows(sc + (size_t)kvh * G * ldsc, ldsc, G, n, mx[kvh], sm[kvh]);
    weights_for_values(sc, ldsc, KV * G, n, d);
    for (int j = 0; j < nnext && j < ahead; j++) prefetch_row(next[j], row_bytes);
    for (int kvh = 0; kvh < KV; kvh++)
        for (int g0 = 0; g0 < G; g0 += 3) {
            const int ng = G - g0 < 3 ? G - g0 : 3;
            const float *pr[3];
            rows3(sc, ldsc, kvh * G + g0, ng, pr);
            values_x3(kp_all, m->kv_stride + kvh * d, n, pr, ng, d, o[kvh] + (size_t)g0 * d);
        }
}

#endif
