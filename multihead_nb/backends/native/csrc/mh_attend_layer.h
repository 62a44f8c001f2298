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

typedef struct {
    int mode, ldsc;
    float *scores;            /* [threads, G (ATT_HEADS: 1), ldsc] each thread's scores */
    int chunks;               /* ATT_SPLIT: chunks over all tokens */
    int32_t *tstart, *task_t; /* [T + 1] first chunk of each token; [chunks] token of each chunk */
    float *po, *pmx, *psm;    /* [chunks, KV, G, d], [chunks, KV, G], [chunks, KV, G]: the chunks' partial results */
} mh_att_work;

static void att_work_free(mh_att_work *a) { /* and every pointer NULL: freeing twice is harmless */
    free(a->scores), free(a->tstart), free(a->task_t), free(a->po), free(a->pmx), free(a->psm);
    a->scores = a->po = a->pmx = a->psm = NULL;
    a->tstart = a->task_t = NULL;
}

/* The scratch of one forward of s->T tokens on nt threads: 0, or -2 (out of memory; what was allocated freed). */
static int att_work_alloc(const mh_model *m, const mh_step *s, int nt, mh_att_work *a) {
    const int G = m->heads / m->kv_heads;
    memset(a, 0, sizeof *a);
    a->mode = att_mode(m);
    a->ldsc = s->max_ctx > 128 ? s->max_ctx : 128; /* a split task's chunk is at most this long */
    a->scores = alloc64(sizeof(float) * nt * (a->mode == ATT_HEADS ? 1 : G) * a->ldsc);
    if (!a->scores) return -2;
    if (a->mode != ATT_SPLIT) return 0;
#if defined(MH_ISA_X86) && !defined(MH_BF16_DOT)
    const int KV = m->kv_heads, d = m->head_dim, T = s->T;
    a->tstart = malloc(sizeof(int32_t) * (T + 1));
    if (!a->tstart) return att_work_free(a), -2;
    for (int t = 0; t < T; t++) {
        const int n = s->pos[t] - window_lo(m, s->pos[t]) + 1;
        a->tstart[t] = a->chunks;
        a->chunks += (n + att_chunk(n) - 1) / att_chunk(n);
    }
    a->tstart[T] = a->chunks;
    a->task_t = malloc(sizeof(int32_t) * a->chunks);
    a->po = alloc64(sizeof(float) * (size_t)a->chunks * KV * G * d);
    a->pmx = alloc64(sizeof(float) * (size_t)a->chunks * KV * G);
    a->psm = alloc64(sizeof(float) * (size_t)a->chunks * KV * G);
    if (!a->task_t || !a->po || !a->pmx || !a->psm) return att_work_free(a), -2;
    for (int t = 0; t < T; t++)
        for (int c = a->tstart[t]; c < a->tstart[t + 1]; c++) a->task_t[c] = t;
#endif
    return 0;
}

/* Layer l's attention of s->T tokens: queries from qkv [T, ldq] (the token's H query heads first), outputs into
 * attn [T, H d]. Call from every thread of the forward's region; returns after the loops' barriers. */
static void attend_layer(const mh_model *m, const mh_step *s, int l, const float *qkv, int ldq, float *attn,
                         const mh_att_work *a) {
    const int T = s->T, H = m->heads, KV = m->kv_heads, G = H / KV, d = m->head_dim, HD = H * d;
    float *sc = a->scores + (size_t)omp_get_thread_num() * (a->mode == ATT_HEADS ? 1 : G) * a->ldsc;
#if defined(MH_ISA_X86) && !defined(MH_BF16_DOT)
    if (a->mode == ATT_SPLIT) {
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < a->chunks * KV; i++) { /* task i: chunk c of token t, KV head kvh */
            const int c = i / KV, kvh = i % KV, t = a->task_t[c], first = a->tstart[t];
            const int lo = window_lo(m, s->pos[t]), n = s->pos[t] - lo + 1, ch = att_chunk(n);
            const int j0 = lo + (c - first) * ch, j1 = j0 + ch - 1 < s->pos[t] ? j0 + ch - 1 : s->pos[t];
            const size_t slot = (size_t)(first * KV + kvh * (a->tstart[t + 1] - first) + (c - first));
            attend_part_avx2(m, s, l, t, kvh, qkv + (size_t)t * ldq + (size_t)kvh * G * d, j0, j1, sc, ch,
                             a->po + slot * G * d, a->pmx + slot * G, a->psm + slot * G);
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
