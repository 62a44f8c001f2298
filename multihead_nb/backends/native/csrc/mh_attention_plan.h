/* The split attention's plan for one forward (x86 builds) and every mode's scratch: which of mh_attention.h's
 * kernels this build uses (att_mode); blocks of up to MH_ATT_BLOCK consecutive prompt tokens of one sequence, one task
 * per (block, KV head) over their whole context (mh_attention_block.h); every other token's context cut in att_chunk
 * keys, one task per (token, KV head, chunk), or per (token, chunk) for all KV heads where att_allkv_fits and no block
 * is in the forward (allkv: each key's row read whole); where each chunk's partial results wait for their merge
 * (chunk_slots) and each thread's share of the scratch (thread_att), allocated per forward (att_work_alloc).
 * Knows nothing of how a task is computed or of the threads' loops (mh_attend_layer.h). */
#ifndef MH_ATTENTION_PLAN_H
#define MH_ATTENTION_PLAN_H
#include "mh_attention.h"

/* ATT_SPLIT: x86 (AVX2 and AVX-512 builds alike), chunks of keys merged by log-sum-exp (attend_part_avx2 +
 * attn_merge); ATT_GROUPED: the query heads of one KV head per pass (attend_group_c);
 * ATT_HEADS: one query head per pass (attend), any shape. */
enum { ATT_HEADS, ATT_GROUPED, ATT_SPLIT };

static int att_mode(const mh_model *m) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, fits = d <= MH_GROUP_DIM && G <= MH_GROUP_MAX;
#if defined(MH_ISA_X86)
    if (fits && d % 8 == 0) return ATT_SPLIT;
#endif
    return fits && G > 1 ? ATT_GROUPED : ATT_HEADS;
}

/* Tokens of one sequence that share an attention task (prefill): at most this many consecutive ones, whose chunk
 * plans agree (no sliding window in reach, contexts of at most 64 x 64 keys: chunks of 64 from key 0). */
#define MH_ATT_BLOCK 32

typedef struct { /* ATT_SPLIT: a token alone (nb = 1) and its chunk c, or nb tokens from t0 (c = -1; with the int8
                  * K/V cache where MH_KV8_OWN_BLOCKS their chunk c, each token's own slots: attend_block_int8) */
    int32_t t0, nb, c;
} mh_att_task;

typedef struct {
    int mode, ldsc;
    float *scores; /* [threads, G (ATT_HEADS: 1), ldsc] each thread's scores; ATT_SPLIT: each thread's scratch */
    int chunks, tasks;     /* ATT_SPLIT: chunks of the tokens alone; tasks (one per KV head each, unless allkv) */
    int allkv;             /* ATT_SPLIT, lone tokens only: one task per chunk for all KV heads (attend_part_allkv) */
    int block_chunks;      /* the most chunks of a block's task */
    int32_t *tstart;       /* [T + 1] first chunk slot of each token (a block's tokens: none) */
    mh_att_task *task;     /* [tasks] */
    float *po, *pmx, *psm; /* [chunks, KV, G, d], [chunks, KV, G], [chunks, KV, G]: the chunks' partial results */
} mh_att_work;

static void att_work_free(mh_att_work *a) { /* and every pointer NULL: freeing twice is harmless */
    free(a->scores), free(a->tstart), free(a->task), free(a->po), free(a->pmx), free(a->psm);
    a->scores = a->po = a->pmx = a->psm = NULL;
    a->tstart = NULL;
    a->task = NULL;
}

#if defined(MH_ISA_X86)
/* Whether token t can share tasks with its neighbours: its chunks are 64 keys from key 0. */
static int att_blockable(const mh_model *m, const mh_step *s, int t) {
    return window_lo(m, s->pos[t]) == 0 && att_chunk(s->pos[t] + 1) == 64 &&
           (!MH_KV8_OWN_BLOCKS || !m->kv_int8 || att_allkv_fits(m));
}

/* Rows of a block's attention (MH_ATT_BLOCK tokens x G heads) padded to whole tiles of 3 vectors of 8. */
static int att_block_rows(const mh_model *m) { return (MH_ATT_BLOCK * (m->heads / m->kv_heads) + 23) / 24 * 24; }

/* A thread's scores scratch: [G, ldsc], or for attend_part_allkv [H, ldsc] and the prepared queries
 * [KV, queries_kvh_floats(G, d)]. */
static size_t att_sc_floats(const mh_model *m, int ldsc) {
    const size_t KV = m->kv_heads, G = m->heads / KV, H = m->heads;
    return att_allkv_fits(m) ? H * ldsc + KV * (size_t)queries_kvh_floats(G, m->head_dim) : G * ldsc;
}

/* Floats of one thread's attention scratch: a lone token's scores (att_sc_floats) and widened keys [64, d] (a block's
 * too); a block's queries [d, rows], scores [64, rows], one score tile's partials [16, 12, 8], a merge's [d, 8], and
 * its chunks' results: outputs [bch, d, rows], max and sum [bch, rows] each; with the int8 K/V cache a task's rows in
 * bfloat16 (AVX-512 BF16: kv8_scratch_halves of a chunk of ldsc >= 64 keys, every KV head) or a block's chunk's rows
 * in float32 (MH_KV8_OWN_BLOCKS: attend_block_int8's [2, 64, KV d]). */
static size_t att_thread_floats(const mh_model *m, int ldsc, int bch) {
    const size_t d = m->head_dim, rows = att_block_rows(m);
    const size_t lone = att_sc_floats(m, ldsc) + 64 * d, block = d * rows + 64 * rows + 1536 + 8 * d;
#if defined(MH_ATT_BF16) /* (and 16 floats to start it on a cache line) */
    const size_t kv8 = m->kv_int8 ? (kv8_scratch_halves(ldsc, m->kv_heads, (int)d) + 1) / 2 + 16 : 0;
#else
    const size_t kv8 = m->kv_int8 && MH_KV8_OWN_BLOCKS ? 2 * 64 * (size_t)m->kv_heads * d : 0;
#endif
    return (lone + block + bch * (d + 2) * rows + kv8 + 15) / 16 * 16;
}

typedef struct { /* one thread's share of a->scores */
    float *sc, *f, *ot, *mx, *sm, *kv8;
    mh_block_scratch blk;
} mh_thread_att;

static mh_thread_att thread_att(const mh_model *m, const mh_att_work *a, int thread) {
    const size_t d = m->head_dim, rows = att_block_rows(m);
    float *p = a->scores + (size_t)thread * att_thread_floats(m, a->ldsc, a->block_chunks);
    float *f = p + att_sc_floats(m, a->ldsc);
    float *qt = f + 64 * d, *sb = qt + d * rows, *part = sb + 64 * rows, *tmp = part + 1536, *ot = tmp + 8 * d;
    float *mx = ot + (size_t)a->block_chunks * d * rows, *sm = mx + (size_t)a->block_chunks * rows;
    float *kv8 = sm + (size_t)a->block_chunks * rows;
#if defined(MH_ATT_BF16) /* on a cache line: its rows are written and read 64 bytes at a time */
    kv8 = (float *)(((uintptr_t)kv8 + 63) & ~(uintptr_t)63);
#endif
    return (mh_thread_att){p, f, ot, mx, sm, kv8, {qt, sb, part, tmp}};
}

/* Where token t's chunk c keeps its partial results, per KV head h: o[h] [G, d], mx[h] and sm[h] [G]. */
static void chunk_slots(const mh_model *m, const mh_att_work *a, int t, int c, float **o, float **mx, float **sm) {
    const int KV = m->kv_heads, G = m->heads / KV, nch = a->tstart[t + 1] - a->tstart[t];
    for (int h = 0; h < KV; h++) {
        const size_t slot = (size_t)(a->tstart[t] * KV + h * nch + c);
        o[h] = a->po + slot * G * m->head_dim, mx[h] = a->pmx + slot * G, sm[h] = a->psm + slot * G;
    }
}

/* A lone token's task k: its keys [*j0, *j0 + *n) (the last chunk of its context may be short); returns the
 * token's chunk size. */
static int att_task_keys(const mh_model *m, const mh_step *s, const mh_att_task k, int *j0, int *n) {
    const int t = k.t0, lo = window_lo(m, s->pos[t]), ch = att_chunk(s->pos[t] - lo + 1);
    *j0 = lo + k.c * ch;
    *n = (*j0 + ch - 1 < s->pos[t] ? *j0 + ch - 1 : s->pos[t]) - *j0 + 1;
    return ch;
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
#if defined(MH_ISA_X86)
    const int KV = m->kv_heads, d = m->head_dim, T = s->T;
    a->ldsc = att_chunk(s->max_ctx); /* the longest chunk */
    a->tstart = malloc(sizeof(int32_t) * (T + 1));
    a->task = malloc(sizeof(mh_att_task) * (T * 64 + 1)); /* at most one per chunk of each token */
    if (!a->tstart || !a->task) return att_work_free(a), -2;
    for (int t0 = 0, nb; t0 < T; t0 += nb) {
        /* a block of consecutive tokens of one sequence, aligned to MH_ATT_BLOCK positions (so in one chunk of 64):
         * one task for their whole context; a token alone: one task per chunk, merged after (attn_merge) */
        nb = 1;
        if (att_blockable(m, s, t0))
            while (nb < MH_ATT_BLOCK && t0 + nb < T && s->seq_of[t0 + nb] == s->seq_of[t0] &&
                   s->pos[t0 + nb] == s->pos[t0] + nb && s->pos[t0 + nb] % MH_ATT_BLOCK && att_blockable(m, s, t0 + nb))
                nb++;
        a->tstart[t0] = a->chunks;
#if MH_KV8_OWN_BLOCKS
        if (nb > 1 && m->kv_int8) { /* each token its own chunk slots (all have nch chunks); a task per chunk */
            const int nch = s->pos[t0] / 64 + 1;
            for (int b = 0; b < nb; b++) a->tstart[t0 + b] = a->chunks, a->chunks += nch;
            for (int c = 0; c < nch; c++) a->task[a->tasks++] = (mh_att_task){t0, nb, c};
            continue;
        }
#endif
        if (nb > 1) {
            for (int b = 1; b < nb; b++) a->tstart[t0 + b] = a->chunks;
            const int bch = s->pos[t0 + nb - 1] / 64 + 1;
            a->block_chunks = bch > a->block_chunks ? bch : a->block_chunks;
            a->task[a->tasks++] = (mh_att_task){t0, nb, -1};
            continue;
        }
        const int n = s->pos[t0] - window_lo(m, s->pos[t0]) + 1, nch = (n + att_chunk(n) - 1) / att_chunk(n);
        for (int c = 0; c < nch; c++) a->task[a->tasks++] = (mh_att_task){t0, 1, c};
        a->chunks += nch;
    }
    a->tstart[T] = a->chunks;
    a->allkv = a->block_chunks == 0 && att_allkv_fits(m);
    a->scores = alloc64(sizeof(float) * nt * att_thread_floats(m, a->ldsc, a->block_chunks));
    a->po = alloc64(sizeof(float) * ((size_t)a->chunks * KV * G * d + 1));
    a->pmx = alloc64(sizeof(float) * ((size_t)a->chunks * KV * G + 1));
    a->psm = alloc64(sizeof(float) * ((size_t)a->chunks * KV * G + 1));
    if (!a->scores || !a->po || !a->pmx || !a->psm) return att_work_free(a), -2;
#endif
    return 0;
}

#endif
