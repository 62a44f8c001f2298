/* A layer's attention for every token of a forward, shared between the threads: the OpenMP loops that hand the
 * (token, head), (token, KV head) or split tasks of the plan (mh_attention_plan.h) to the threads, each task run
 * (att_task), then one merge per (token, KV head). All give a token the same bits.
 * Without blocks (decode) the tasks go round-robin, so a thread fetches its next task's first keys early.
 * With the int8 K/V cache (m->kv_int8) the AVX-512 BF16 builds' tasks are the same, each turning its chunk's rows into
 * bfloat16 ones in the thread's scratch (kv8_turn_keys, mh_attention_int8_bf16.h); the other x86 builds' lone-token
 * tasks run attend_part_int8_x86 (mh_attention_int8_x86.h), and their prompt blocks the same tasks as the bfloat16
 * cache's on the rows turned into float32 (AVX2) or, where MH_KV8_OWN_BLOCKS (AVX-512 without BF16),
 * attend_block_int8 (a task per chunk, each token its own chunk slots, merged as a lone token's); the other builds run
 * attend_int8 per (token, KV head).
 * Knows nothing of weights or of the rest of the layer; reads the K/V the forward already wrote for this step. */
#ifndef MH_ATTEND_LAYER_H
#define MH_ATTEND_LAYER_H
#include "mh_attention_plan.h"

/* What the forward does with a lone token's merged output while it is in the merging core's cache: fn(ctx, t, row,
 * c0, n) once the columns [c0, c0 + n) of attn row t (row: its start) are final (attend_layer says when it calls
 * it). */
typedef struct {
    void (*fn)(void *ctx, int t, const float *row, int c0, int n);
    void *ctx;
} mh_att_epilogue;

#if defined(MH_ISA_X86)
#if MH_KV8_OWN_BLOCKS
/* The int8 K/V cache's prompt block k (nb >= 2 consecutive tokens of one sequence from k.t0, their chunk k.c of 64
 * keys, every KV head): the chunk's rows turned to float32 once (kv8_rows_f32), then each token's share of them
 * (its first min(64, pos - 64 c + 1) keys) by kv8_token_chunk, into its own chunk slots as a lone token's task
 * would write them: the same operations on the same values, so the same bits; att_work_alloc plans such blocks
 * only where they fit (att_allkv_fits, chunks of 64 from key 0, 32-aligned: every token of the block has chunk c). */
static void attend_block_int8(const mh_model *m, const mh_step *s, int l, const mh_att_work *a, mh_att_task k,
                              const float *qkv, int ldq, const mh_thread_att *w) {
    const int KV = m->kv_heads, d = m->head_dim, row = KV * d, j0 = 64 * k.c;
    const int last = s->pos[k.t0 + k.nb - 1] - j0 + 1, nmax = last < 64 ? last : 64;
    const int8_t *rows[nmax];
    const float *scs[nmax];
    kv8_rows(m, s, l, s->seq_of[k.t0], 0, j0, nmax, rows, scs);
    float *kf = w->kv8, *vf = kf + (size_t)64 * row;
    kv8_rows_f32(m, rows, scs, nmax, row, kf, vf);
    for (int t = k.t0; t < k.t0 + k.nb; t++) {
        const int n = s->pos[t] - j0 + 1 < 64 ? s->pos[t] - j0 + 1 : 64;
        float *o[MH_ALLKV_MAX], *mx[MH_ALLKV_MAX], *sm[MH_ALLKV_MAX];
        chunk_slots(m, a, t, k.c, o, mx, sm);
        kv8_token_chunk(m, KV, qkv + (size_t)t * ldq, n, rows, scs, kf, vf, w->sc, 64, o, mx, sm);
    }
}
#endif

/* Task k (nb >= 2 tokens from t0, their whole context) for KV head kvh: chunk by chunk (block_chunk), merged
 * (block_merge) straight into attn [T, H d]. */
static void attend_block(const mh_model *m, const mh_step *s, int l, mh_att_task k, int kvh, const float *qkv,
                         int ldq, float *attn, const mh_thread_att *w) {
    const int G = m->heads / m->kv_heads, d = m->head_dim, R = k.nb * G, ldr = (R + 23) / 24 * 24;
    const int last = s->pos[k.t0 + k.nb - 1], nch = last / 64 + 1;
    block_queries(qkv + (size_t)k.t0 * ldq + (size_t)kvh * G * d, ldq, G, d, R, ldr, 1.0f / sqrtf((float)d),
                  w->blk.qt);
#if defined(MH_ATT_BF16)
    if (att_bf16(d)) block_queries_bf16(w->blk.qt, d, ldr);
#endif
    int nrow[ldr]; /* keys of each row in the chunk (padding rows: the last token's) */
    for (int c = 0; c < nch; c++) {
        const int j0 = 64 * c, n = last - j0 + 1 < 64 ? last - j0 + 1 : 64;
        for (int r = 0; r < ldr; r++) {
            const int p = r < R ? s->pos[k.t0 + r / G] : last;
            nrow[r] = p - j0 + 1 < 64 ? p - j0 + 1 : 64;
        }
        const uint16_t *kp[n];
        const mh_model *mc = m; /* where the rows read are (the int8 cache, AVX-512 BF16: rows turned into bfloat16) */
        const int8_t *rows8[m->kv_int8 ? n : 1]; /* the int8 cache's rows and scales */
        const float *scs8[m->kv_int8 ? n : 1];
        const mh_kv8_chunk c8 = {rows8, scs8}, *r8 = NULL; /* AVX2: turned into float32 by block_chunk */
        (void)c8;
#if defined(MH_ATT_BF16)
        mh_model mb;
        if (m->kv_int8) {
            mc = kv8_chunk_rows(m, s, l, s->seq_of[k.t0], kvh, 1, j0, n, (uint16_t *)w->kv8, rows8, scs8, kp, &mb);
            kv8_turn_keys(m, rows8, scs8, d, n, (uint16_t *)w->kv8, 0, n);
        } else
#else
        if (m->kv_int8) {
            kv8_rows(m, s, l, s->seq_of[k.t0], kvh, j0, n, rows8, scs8);
            r8 = &c8;
        } else
#endif
            key_rows(m, s, l, s->seq_of[k.t0], kvh, j0, n, kp);
        block_chunk(mc, kp, r8, w->f, n, nrow, ldr, &w->blk, w->ot + (size_t)c * d * ldr, w->mx + (size_t)c * ldr,
                    w->sm + (size_t)c * ldr);
    }
    block_merge(G, d, R, ldr, nch, w->ot, w->mx, w->sm, w->blk.tmp,
                attn + (size_t)k.t0 * m->heads * d + (size_t)kvh * G * d, m->heads * d);
}

/* The first key rows (KV head kvh, at most `most`) of lone-token task k, into rows: their count. What a thread fetches
 * of its next task while it finishes the current one. */
static int task_first_rows(const mh_model *m, const mh_step *s, int l, mh_att_task k, int kvh, int most,
                           const uint16_t **rows) {
    int j0, n;
    att_task_keys(m, s, k, &j0, &n);
    n = n < most ? n : most;
    key_rows(m, s, l, s->seq_of[k.t0], kvh, j0, n, rows);
    return n;
}

/* Task i of the ATT_SPLIT loop (the last tasks, the longest contexts, first; KV heads innermost). `next` (or -1):
 * the task this thread runs after it, a lone token's, whose first keys are fetched while this one sums its values
 * (each task otherwise starts by waiting on its first keys; on a Zen 5 a step's attention at batch 1 0.48 -> 0.44
 * M cycles, at batch 3 1.21-1.34 -> 1.10-1.21, in two same-process A/B runs). */
static void att_task(const mh_model *m, const mh_step *s, int l, const mh_att_work *a, int i, int next,
                     const float *qkv, int ldq, float *attn, const mh_thread_att *w) {
    const int KV = m->kv_heads, G = m->heads / KV, d = m->head_dim;
    if (a->allkv) { /* task i: one chunk of a lone token, every KV head */
        const mh_att_task k = a->task[a->tasks - 1 - i];
#if MH_KV8_OWN_BLOCKS
        if (k.nb > 1) { /* the int8 K/V cache's prompt block (the bfloat16 ones are planned without allkv) */
            attend_block_int8(m, s, l, a, k, qkv, ldq, w);
            return;
        }
#endif
        const int t = k.t0;
        int j0, n;
        const int ch = att_task_keys(m, s, k, &j0, &n);
        float *o[MH_ALLKV_MAX], *mx[MH_ALLKV_MAX], *sm[MH_ALLKV_MAX];
        chunk_slots(m, a, t, k.c, o, mx, sm);
#if !defined(MH_ATT_BF16)
        if (m->kv_int8) {
            attend_part_int8_x86(m, s, l, t, 0, KV, qkv + (size_t)t * ldq, j0, j0 + n - 1, w->sc, ch, o, mx, sm);
            return;
        }
#endif
        const uint16_t *ahead[MH_KEYS_AHEAD]; /* (not with the int8 cache: its rows are read as they are turned) */
        const int na = next >= 0 && !m->kv_int8
                           ? task_first_rows(m, s, l, a->task[a->tasks - 1 - next], 0, att_allkv_next(m), ahead)
                           : 0;
        attend_part_allkv(m, s, l, t, qkv + (size_t)t * ldq, j0, j0 + n - 1, w->sc, ch, w->sc + (size_t)m->heads * ch,
                          o, mx, sm, ahead, na, (uint16_t *)w->kv8);
        return;
    }
    const mh_att_task k = a->task[a->tasks - 1 - i / KV];
    const int kvh = i % KV;
    if (k.nb > 1) {
        attend_block(m, s, l, k, kvh, qkv, ldq, attn, w);
        return;
    }
    const uint16_t *ahead[MH_KEYS_AHEAD];
    const mh_att_task k2 = a->task[a->tasks - 1 - (next >= 0 ? next : i) / KV];
    const int na = next >= 0 && k2.nb == 1 && !m->kv_int8
                       ? task_first_rows(m, s, l, k2, next % KV, MH_KEYS_AHEAD, ahead)
                       : 0;
    const int t = k.t0, nch = a->tstart[t + 1] - a->tstart[t];
    int j0, n;
    const int ch = att_task_keys(m, s, k, &j0, &n);
    const size_t slot = (size_t)(a->tstart[t] * KV + kvh * nch + k.c);
#if !defined(MH_ATT_BF16)
    if (m->kv_int8) {
        float *o = a->po + slot * G * d, *mx = a->pmx + slot * G, *sm = a->psm + slot * G;
        attend_part_int8_x86(m, s, l, t, kvh, 1, qkv + (size_t)t * ldq + (size_t)kvh * G * d, j0, j0 + n - 1, w->sc,
                             ch, &o, &mx, &sm);
        return;
    }
#endif
    attend_part_avx2(m, s, l, t, kvh, qkv + (size_t)t * ldq + (size_t)kvh * G * d, j0, j0 + n - 1, w->sc, ch,
                     a->po + slot * G * d, a->pmx + slot * G, a->psm + slot * G, ahead, na, (uint16_t *)w->kv8);
}
#endif

/* Layer l's attention of s->T tokens: queries from qkv [T, ldq] (the token's H query heads first), outputs into
 * attn [T, H d]. Call from every thread of the forward's region; returns after the loops' barriers. Returns 1 when
 * `ep` (may be NULL) ran for every output: the split attention of lone tokens only (decode steps) with each KV
 * head's G d columns whole pairs of 32-blocks (G d % 64 == 0), where each (token, KV head) merge calls it on the
 * columns it wrote; otherwise 0 (and ep was not called). */
static int attend_layer(const mh_model *m, const mh_step *s, int l, const float *qkv, int ldq, float *attn,
                        const mh_att_work *a, const mh_att_epilogue *ep) {
    const int T = s->T, H = m->heads, KV = m->kv_heads, G = H / KV, d = m->head_dim, HD = H * d;
#if defined(MH_ISA_X86)
    if (a->mode == ATT_SPLIT) {
        const int epilogue = ep && a->block_chunks == 0 && G * d % 64 == 0;
        const mh_thread_att w = thread_att(m, a, omp_get_thread_num());
        const int n = a->allkv ? a->tasks : a->tasks * KV, nt = omp_get_num_threads();
        if (a->block_chunks == 0) { /* lone tokens only (decode): each thread's next task known, its keys fetched */
#pragma omp for schedule(static, 1)
            for (int i = 0; i < n; i++) att_task(m, s, l, a, i, i + nt < n ? i + nt : -1, qkv, ldq, attn, &w);
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int i = 0; i < n; i++) att_task(m, s, l, a, i, -1, qkv, ldq, attn, &w);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < T * KV; i++) { /* tokens alone (a block's tokens have no chunk slots) */
            const int t = i / KV, kvh = i % KV, nch = a->tstart[t + 1] - a->tstart[t];
            if (!nch) continue;
            const size_t slot = (size_t)(a->tstart[t] * KV + kvh * nch);
            attn_merge(G, d, nch, a->po + slot * G * d, a->pmx + slot * G, a->psm + slot * G,
                       attn + (size_t)t * HD + (size_t)kvh * G * d);
            if (epilogue) ep->fn(ep->ctx, t, attn + (size_t)t * HD, kvh * G * d, G * d);
        }
        return epilogue;
    }
#else
    (void)ep;
#endif
    float *sc = a->scores + (size_t)omp_get_thread_num() * (a->mode == ATT_HEADS ? 1 : G) * a->ldsc;
    if (m->kv_int8) { /* check_step keeps G <= 8 and d <= 256: ATT_HEADS only where G == 1 (sc: G ldsc floats) */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < T * KV; i++) {
            const int t = i / KV, kvh = i % KV;
            attend_int8(m, s, l, t, kvh, qkv + (size_t)t * ldq + (size_t)kvh * G * d, sc,
                        attn + (size_t)t * HD + (size_t)kvh * G * d);
        }
    } else if (a->mode == ATT_GROUPED) {
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < T * KV; i++) {
            const int t = i / KV, kvh = i % KV;
            const float *q = qkv + (size_t)t * ldq + (size_t)kvh * G * d;
            float *o = attn + (size_t)t * HD + (size_t)kvh * G * d;
            attend_group_c(m, s, l, t, kvh, q, sc, o);
        }
    } else {
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < T * H; i++) {
            const int t = i / H, hq = i % H;
            attend(m, s, l, t, hq, qkv + (size_t)t * ldq + (size_t)hq * d, sc, attn + (size_t)t * HD + (size_t)hq * d);
        }
    }
    return 0;
}

#endif
