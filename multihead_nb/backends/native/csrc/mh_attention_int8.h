/* The int8 K/V cache (a model loaded with kv_cache="int8"): how a key or value row is stored, written and read.
 * A page holds the rows' int8 values where a bfloat16 cache holds its elements ([2, layers, tokens_per_page,
 * kv_heads, head_dim], strides in bytes), then from byte m->kv_scales one float32 scale per 32 of them in the same
 * order: each 32 values x of a row (head_dim % 32 == 0) stored as q = round(x / s), s = max |x| / 127, as llama.cpp's
 * q8_0 cache (with float32 scales): 1.125 bytes a value instead of 2. (One scale a row, tried first, let attention
 * scale each score once, but put the logits of SmolLM2-135M 2.18e-2 from the float32 reference against 4e-3 with
 * bfloat16 K/V; bench/README.md.)
 * The portable attention here (builds without the x86 one, mh_attention_int8_x86.h): a token's keys in chunks of 64,
 * each row turned to float32 once, then the same multiply-adds for every query head of its KV head, in plain C the
 * compiler vectorizes; chunks merged by their running max. A token's result depends on its own context only (never
 * on its batch-mates). Knows nothing of layers, threads or weights. */
#ifndef MH_ATTENTION_INT8_H
#define MH_ATTENTION_INT8_H

static inline float kv8_max(float a, float b) { return a > b ? a : b; } /* inlined, where fmaxf is a call */

/* x [d] -> q [d] int8 and sc [d / 32] (the value of q[i] is q[i] sc[i / 32]). */
static inline void kv8_quantize_row(const float *x, int d, int8_t *q, float *sc) {
    for (int b = 0; b < d / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = kv8_max(amax, fabsf(xb[i]));
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        sc[b] = amax / 127.0f;
        for (int i = 0; i < 32; i++) q[32 * b + i] = (int8_t)(int)rintf(xb[i] * inv);
    }
}

/* The rows of keys [j0, j0 + n) of sequence seq, KV head kvh, layer `layer`: rows[i] and their scales sc[i], page by
 * page. A key's value row is m->kv_stride bytes further, its scales m->kv_stride / 32 floats further; KV head kvh + h's
 * row h d bytes further, its scales h d / 32 floats. */
static void kv8_rows(const mh_model *m, const mh_step *s, int layer, int seq, int kvh, int j0, int n,
                     const int8_t **rows, const float **sc) {
    const int tpp = m->tokens_per_page, KVd = m->kv_heads * m->head_dim;
    const int64_t in_page = (int64_t)layer * m->layer_stride + (int64_t)kvh * m->head_dim;
    const int8_t *arena = (const int8_t *)m->cache;
    const int32_t *table = s->block_tables + (size_t)seq * s->max_pages;
    for (int j = j0, i = 0; i < n;) {
        const int8_t *page = arena + (int64_t)table[j / tpp] * m->page_stride;
        const float *scales = (const float *)(page + m->kv_scales);
        for (int slot = j % tpp; slot < tpp && i < n; slot++, j++, i++) {
            const int64_t off = in_page + (int64_t)slot * KVd;
            rows[i] = page + off, sc[i] = scales + off / 32;
        }
    }
}

/* Where token position p of sequence seq keeps layer l's key row of KV head kvh (value: m->kv_stride further) and
 * its scales (value's: m->kv_stride / 32 further). */
static inline void kv8_slot(const mh_model *m, const mh_step *s, int seq, int p, int l, int kvh, int8_t **row,
                            float **sc) {
    const int tpp = m->tokens_per_page;
    int8_t *page = (int8_t *)m->cache + (int64_t)s->block_tables[(size_t)seq * s->max_pages + p / tpp] * m->page_stride;
    const int64_t off = (int64_t)l * m->layer_stride + (int64_t)(p % tpp) * m->kv_heads * m->head_dim +
                        (int64_t)kvh * m->head_dim;
    *row = page + off;
    *sc = (float *)(page + m->kv_scales) + off / 32;
}

/* exp(x) for softmax arguments (x <= 0): 2^n poly(r), |r| <= ln2 / 2, relative error ~1e-7 (exp256's steps, one
 * lane; plain C the compiler vectorizes over a row). */
static inline float kv8_exp(float x) {
    x = kv8_max(x, -87.0f);
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(-n, 0.693145751953125f, x);
    r = fmaf(-n, 1.428606765330187045e-06f, r);
    float p = 1.0f / 720;
    p = fmaf(p, r, 1.0f / 120), p = fmaf(p, r, 1.0f / 24), p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f), p = fmaf(p, r, 1.0f), p = fmaf(p, r, 1.0f);
    union { int32_t i; float f; } e;
    e.i = ((int32_t)n + 127) << 23;
    return p * e.f;
}

/* int8 row q [d] with scales sc [d / 32] -> f [d] float32: each int8 times its scale. */
static inline void kv8_row_f32(const int8_t *q, const float *sc, int d, float *f) {
    for (int b = 0; b < d / 32; b++) {
        const float s = sc[b];
        for (int i = 0; i < 32; i++) f[32 * b + i] = s * (float)q[32 * b + i];
    }
}

/* a [d] . b [d] over 16 lanes (lane i: elements i, i + 16, ... in order from zero), the lanes added in one tree. */
static inline float kv8_dot(const float *a, const float *b, int d) {
    float acc[16] = {0};
    for (int c = 0; c < d; c += 16)
        for (int i = 0; i < 16; i++) acc[i] = fmaf(a[c + i], b[c + i], acc[i]);
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) acc[i] += acc[i + w];
    return acc[0];
}

#define MH_KV8_AHEAD 8 /* keys ahead whose rows a chunk's loops fetch */

/* One chunk [j0, j1] of token t's keys, the G (<= MH_GROUP_MAX) query heads of KV head kvh (q [G, d] unscaled,
 * d <= MH_GROUP_DIM): the unnormalized output o [G, d], the scores' max mx [G] and the sum of exp(score - max)
 * sm [G] (attend_part_avx2's contract). sc: scratch [G, ldsc >= n]. */
static void attend_part_int8(const mh_model *m, const mh_step *s, int layer, int t, int kvh, const float *q, int j0,
                             int j1, float *sc, int ldsc, float *o, float *mx, float *sm) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, n = j1 - j0 + 1;
    const int64_t vrow = m->kv_stride, vsc = m->kv_stride / 32;
    float qs[MH_GROUP_MAX * MH_GROUP_DIM], f[MH_GROUP_DIM];
    const float scale = 1.0f / sqrtf((float)d);
    for (int i = 0; i < G * d; i++) qs[i] = q[i] * scale;
    const int8_t *rows[n];
    const float *scs[n];
    kv8_rows(m, s, layer, s->seq_of[t], kvh, j0, n, rows, scs);
    for (int j = 0; j < n && j < MH_KV8_AHEAD; j++) __builtin_prefetch(rows[j]), __builtin_prefetch(scs[j]);
    for (int j = 0; j < n; j++) {
        if (j + MH_KV8_AHEAD < n) __builtin_prefetch(rows[j + MH_KV8_AHEAD]), __builtin_prefetch(scs[j + MH_KV8_AHEAD]);
        __builtin_prefetch(rows[j] + vrow), __builtin_prefetch(scs[j] + vsc);
        kv8_row_f32(rows[j], scs[j], d, f);
        for (int g = 0; g < G; g++) sc[(size_t)g * ldsc + j] = kv8_dot(qs + (size_t)g * d, f, d);
    }
    for (int g = 0; g < G; g++) {
        float *row = sc + (size_t)g * ldsc, best = -INFINITY, tot = 0.0f;
        for (int j = 0; j < n; j++) best = kv8_max(best, row[j]);
        for (int j = 0; j < n; j++) row[j] = kv8_exp(row[j] - best);
        for (int j = 0; j < n; j++) tot += row[j];
        mx[g] = best, sm[g] = tot;
    }
    for (int i = 0; i < G * d; i++) o[i] = 0.0f;
    for (int j = 0; j < n; j++) {
        if (j + MH_KV8_AHEAD < n)
            __builtin_prefetch(rows[j + MH_KV8_AHEAD] + vrow), __builtin_prefetch(scs[j + MH_KV8_AHEAD] + vsc);
        kv8_row_f32(rows[j] + vrow, scs[j] + vsc, d, f);
        for (int g = 0; g < G; g++) {
            const float e = sc[(size_t)g * ldsc + j];
            float *og = o + (size_t)g * d;
            for (int c = 0; c < d; c++) og[c] = fmaf(e, f[c], og[c]);
        }
    }
}

/* Token t's whole context for the G query heads of KV head kvh (builds without the split plan): chunks of 64 keys
 * (attend_part_int8), merged as they come by the running max; out [G, d]. sc: scratch [G, >= 64]. */
static void attend_int8(const mh_model *m, const mh_step *s, int layer, int t, int kvh, const float *q, float *sc,
                        float *out) {
    const int d = m->head_dim, G = m->heads / m->kv_heads, p = s->pos[t], lo = window_lo(m, p);
    float o[MH_GROUP_MAX * MH_GROUP_DIM], mx[MH_GROUP_MAX], sm[MH_GROUP_MAX], best[MH_GROUP_MAX], tot[MH_GROUP_MAX];
    for (int j0 = lo; j0 <= p; j0 += 64) {
        const int j1 = j0 + 63 < p ? j0 + 63 : p;
        attend_part_int8(m, s, layer, t, kvh, q, j0, j1, sc, 64, o, mx, sm);
        for (int g = 0; g < G; g++) {
            float *og = out + (size_t)g * d;
            const float *oc = o + (size_t)g * d;
            if (j0 == lo) {
                best[g] = mx[g], tot[g] = sm[g];
                for (int c = 0; c < d; c++) og[c] = oc[c];
                continue;
            }
            const float nb = kv8_max(best[g], mx[g]), a = kv8_exp(best[g] - nb), b = kv8_exp(mx[g] - nb);
            best[g] = nb, tot[g] = a * tot[g] + b * sm[g];
            for (int c = 0; c < d; c++) og[c] = a * og[c] + b * oc[c];
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < d; c++) out[(size_t)g * d + c] /= tot[g];
}

#endif
