/* A layer's attention for every token of a forward, shared between the threads: which of mh_attention.h's kernels
 * this build uses (att_mode), their scratch memory (allocated per forward), and the OpenMP loops that hand the
 * (token, head) or (token, KV head, chunk) tasks to the threads.
 * Owns the split attention's plan: each token's context cut in att_chunk keys, one task per (token, KV head,
 * chunk), then one merge per (token, KV head). Knows nothing of weights or of the rest of the layer; reads the
 * K/V the forward already wrote for this step. */
#ifndef MH_ATTEND_LAYER_H
#define MH_ATTEND_LAYER_H
#include "mh_attention.h"

/* ATT_SPLIT: x86 without AVX-512 BF16, chunks of keys merged by log-sum-exp (attend_part_avx2 + attn_merge);
 * ATT_GROUPED: the query heads of one KV head per pass (attend_group with AVX-512 BF16, else attend_group_c);
 * ATT_HEADS: one query head per pass (attend), any shape. */
enum { ATT_HEADS, ATT_GROUPED, ATT_SPLIT };

static int att_mode(const mh_model *m) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, fits = d <= MH_GROUP_DIM && G <= MH_GROUP_MAX;
#ifdef MH_BF16_DOT
    return fits && d % 16 == 0 ? ATT_GROUPED : ATT_HEADS;
#else
#if defined(MH_ISA_X86)
    if (fits && d % 8 == 0) return ATT_SPLIT;
#endif
    return fits && G > 1 ? ATT_GROUPED : ATT_HEADS;
#endif
}

/* Tokens of one sequence that share an attention task (prefill): at most this many consecutive ones, whose chunk
 * plans agree (no sliding window in reach, contexts of at most 64 x 64 keys: chunks of 64 from key 0). */
#define MH_ATT_BLOCK 16

typedef struct { /* ATT_SPLIT: tokens t0 .. t0 + nb - 1 (one sequence), their chunk c */
    int32_t t0, nb, c;
} mh_att_task;

typedef struct {
    int mode, ldsc;
    float *scores; /* [threads, G (ATT_HEADS: 1), ldsc] each thread's scores; ATT_SPLIT: each thread's scratch */
    int chunks, tasks;     /* ATT_SPLIT: chunks over all tokens; tasks (one per KV head each) */
    int32_t *tstart;       /* [T + 1] first chunk of each token */
    mh_att_task *task;     /* [tasks] */
    float *po, *pmx, *psm; /* [chunks, KV, G, d], [chunks, KV, G], [chunks, KV, G]: the chunks' partial results */
} mh_att_work;

static void att_work_free(mh_att_work *a) { /* and every pointer NULL: freeing twice is harmless */
    free(a->scores), free(a->tstart), free(a->task), free(a->po), free(a->pmx), free(a->psm);
    a->scores = a->po = a->pmx = a->psm = NULL;
    a->tstart = NULL;
    a->task = NULL;
}

#if defined(MH_ISA_X86) && !defined(MH_BF16_DOT)
/* Whether token t can share tasks with its neighbours: its chunks are 64 keys from key 0. */
static int att_blockable(const mh_model *m, const mh_step *s, int t) {
    return window_lo(m, s->pos[t]) == 0 && att_chunk(s->pos[t] + 1) == 64;
}

/* Rows of a block's attention (MH_ATT_BLOCK tokens x G heads) padded to whole tiles of 3 vectors of 8. */
static int att_block_rows(const mh_model *m) { return (MH_ATT_BLOCK * (m->heads / m->kv_heads) + 23) / 24 * 24; }

/* Floats of one thread's attention scratch: a lone token's scores [G, ldsc]; a block's widened keys [64, d], queries
 * and outputs [d, rows] each, scores [64, rows] and one score tile's partials [8, 12, 8]. */
static size_t att_thread_floats(const mh_model *m, int ldsc) {
    const size_t G = m->heads / m->kv_heads, d = m->head_dim, rows = att_block_rows(m);
    return (G * ldsc + 64 * d + 2 * d * rows + 64 * rows + 768 + 15) / 16 * 16;
}

typedef struct { /* one thread's share of a->scores */
    float *sc, *f;
    mh_block_scratch blk;
} mh_thread_att;

static mh_thread_att thread_att(const mh_model *m, const mh_att_work *a, int thread) {
    const size_t G = m->heads / m->kv_heads, d = m->head_dim, rows = att_block_rows(m);
    float *p = a->scores + (size_t)thread * att_thread_floats(m, a->ldsc), *f = p + G * a->ldsc;
    float *qt = f + 64 * d, *ot = qt + d * rows, *sb = ot + d * rows, *part = sb + 64 * rows;
    return (mh_thread_att){p, f, {qt, sb, ot, part}};
}
#endif

/* The scratch of one forward of s->T tokens on nt threads: 0, or -2 (out of memory; what was allocated freed). */
static int att_work_alloc(const mh_model *m, const mh_step *s, int nt, mh_att_work *a) {
    const int G = m->heads / m->kv_heads;
    memset(a, 0, sizeof *a);
    a->mode = att_mode(m);
    a->ldsc = s->max_ctx > 128 ? s->max_ctx : 128;
    if (a->mode != ATT_SPLIT) {
        a->scores = alloc64(sizeof(float) * nt * (a->mode == ATT_HEADS ? 1 : G) * a->ldsc);
        return a->scores ? 0 : -2;
    }
#if defined(MH_ISA_X86) && !defined(MH_BF16_DOT)
    const int KV = m->kv_heads, d = m->head_dim, T = s->T;
    a->ldsc = att_chunk(s->max_ctx); /* the longest chunk */
    a->scores = alloc64(sizeof(float) * nt * att_thread_floats(m, a->ldsc));
    a->tstart = malloc(sizeof(int32_t) * (T + 1));
    if (!a->scores || !a->tstart) return att_work_free(a), -2;
    for (int t = 0; t < T; t++) {
        const int n = s->pos[t] - window_lo(m, s->pos[t]) + 1;
        a->tstart[t] = a->chunks;
        a->chunks += (n + att_chunk(n) - 1) / att_chunk(n);
    }
    a->tstart[T] = a->chunks;
    a->task = malloc(sizeof(mh_att_task) * a->chunks); /* at most one per chunk */
    if (!a->task) return att_work_free(a), -2;
    for (int t0 = 0, nb; t0 < T; t0 += nb) { /* blocks of tokens, each one task per chunk of its last token */
        nb = 1;
        if (att_blockable(m, s, t0))
            while (nb < MH_ATT_BLOCK && t0 + nb < T && s->seq_of[t0 + nb] == s->seq_of[t0] &&
                   s->pos[t0 + nb] == s->pos[t0] + nb && s->pos[t0 + nb] % MH_ATT_BLOCK && att_blockable(m, s, t0 + nb))
                nb++;
        const int last = t0 + nb - 1;
        for (int c = 0; c < a->tstart[last + 1] - a->tstart[last]; c++)
            a->task[a->tasks++] = (mh_att_task){t0, nb, c};
    }
    a->po = alloc64(sizeof(float) * (size_t)a->chunks * KV * G * d);
    a->pmx = alloc64(sizeof(float) * (size_t)a->chunks * KV * G);
    a->psm = alloc64(sizeof(float) * (size_t)a->chunks * KV * G);
    if (!a->po || !a->pmx || !a->psm) return att_work_free(a), -2;
#endif
    return 0;
}

/* Layer l's attention of s->T tokens: queries from qkv [T, ldq] (the token's H query heads first), outputs into
 * attn [T, H d]. Call from every thread of the forward's region; returns after the loops' barriers. */
static void attend_layer(const mh_model *m, const mh_step *s, int l, const float *qkv, int ldq, float *attn,
                         const mh_att_work *a) {
    const int T = s->T, H = m->heads, KV = m->kv_heads, G = H / KV, d = m->head_dim, HD = H * d;
#if defined(MH_ISA_X86) && !defined(MH_BF16_DOT)
    if (a->mode == ATT_SPLIT) {
        const mh_thread_att w = thread_att(m, a, omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < a->tasks * KV; i++) { /* task i: chunk c of tokens t0 .., KV head kvh */
            const mh_att_task k = a->task[i / KV];
            const int kvh = i % KV, last = s->pos[k.t0 + k.nb - 1], lo = window_lo(m, s->pos[k.t0]);
            const int ch = att_chunk(last - lo + 1), j0 = lo + k.c * ch, n = last - j0 + 1 < ch ? last - j0 + 1 : ch;
            const float *q = qkv + (size_t)k.t0 * ldq + (size_t)kvh * G * d;
            mh_part_out out[MH_ATT_BLOCK];
            int nk[MH_ATT_BLOCK];
            for (int b = 0; b < k.nb; b++) { /* token t's chunk c, if it has one (nk[b] keys of it) */
                const int t = k.t0 + b, first = a->tstart[t], nch = a->tstart[t + 1] - first;
                const size_t slot = (size_t)(first * KV + kvh * nch + (k.c < nch ? k.c : 0));
                out[b] = (mh_part_out){a->po + slot * G * d, a->pmx + slot * G, a->psm + slot * G};
                nk[b] = s->pos[t] < j0 ? 0 : s->pos[t] - j0 + 1 < ch ? s->pos[t] - j0 + 1 : ch;
            }
            if (k.nb == 1) {
                attend_part_avx2(m, s, l, k.t0, kvh, q, j0, j0 + n - 1, w.sc, ch, out[0].o, out[0].mx, out[0].sm);
                continue;
            }
            const uint16_t *kp[n];
            key_rows(m, s, l, s->seq_of[k.t0], kvh, j0, n, kp);
            widen_rows(kp, 0, n, d, m->kv_stride, w.f);
            attend_block_avx2(m, kp, w.f, q, ldq, k.nb, nk, &w.blk, out);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < T * KV; i++) {
            const int t = i / KV, kvh = i % KV, nch = a->tstart[t + 1] - a->tstart[t];
            const size_t slot = (size_t)(a->tstart[t] * KV + kvh * nch);
            attn_merge(G, d, nch, a->po + slot * G * d, a->pmx + slot * G, a->psm + slot * G,
                       attn + (size_t)t * HD + (size_t)kvh * G * d);
        }
        return;
    }
#endif
    float *sc = a->scores + (size_t)omp_get_thread_num() * (a->mode == ATT_HEADS ? 1 : G) * a->ldsc;
    if (a->mode == ATT_GROUPED) {
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < T * KV; i++) {
            const int t = i / KV, kvh = i % KV;
            const float *q = qkv + (size_t)t * ldq + (size_t)kvh * G * d;
            float *o = attn + (size_t)t * HD + (size_t)kvh * G * d;
#if defined(MH_BF16_DOT)
            attend_group(m, s, l, t, kvh, q, sc, o);
#else
            attend_group_c(m, s, l, t, kvh, q, sc, o);
#endif
        }
    } else {
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < T * H; i++) {
            const int t = i / H, hq = i % H;
            attend(m, s, l, t, hq, qkv + (size_t)t * ldq + (size_t)hq * d, sc, attn + (size_t)t * HD + (size_t)hq * d);
        }
    }
}

#endif
