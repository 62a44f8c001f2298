/* AVX2 + FMA attention of a block of consecutive prompt tokens (prefill) over their keys, chunk by chunk, with the
 * block's (token, query head) rows in the lanes of the vectors and each key element broadcast: every multiply-add does
 * useful work in all 8 lanes and a key row is widened once for the whole block (with AVX-512 BF16, MH_ATT_BF16: each
 * pair of key elements, or of two keys' value elements, broadcast to vdpbf16ps against the rows' pairs:
 * mh_attention_block_bf16.h); the chunks' results are merged in the task and written straight into the layer's
 * output. Each score, exp, sum, output and merge is formed in exactly the order attend_part_avx2 and attn_merge
 * (mh_attention_avx2.h) form them for a token alone, so a token's result is the same, bit for bit, whether it ran in
 * a block or by itself (prefill or decode). Included by mh_attention_avx2.h; knows nothing of layers or of the
 * threads' split. */
#ifndef MH_ATTENTION_BLOCK_H
#define MH_ATTENTION_BLOCK_H
#if defined(MH_ISA_X86)

/* Per-thread scratch of a block's attention, for blocks of at most rmax rows (a multiple of 24) and chunks of at
 * most 64 keys: qt [d, rmax] (the queries, scaled, rows in columns), s [64, rmax] (scores, then exps), part
 * [16, 12, 8] (one score tile's lane partials), tmp [d, 8] (merged outputs before their transpose). */
typedef struct {
    float *qt, *s, *part, *tmp;
} mh_block_scratch;

/* r[0..7] (8 rows of 8) -> their transpose, in place. */
static inline void transpose8(__m256 *r) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

#define MH_ACC12(x) __m256 x##00 = _mm256_setzero_ps(), x##01 = x##00, x##02 = x##00, x##03 = x##00, \
    x##10 = x##00, x##11 = x##00, x##12 = x##00, x##13 = x##00, x##20 = x##00, x##21 = x##00, x##22 = x##00, \
    x##23 = x##00

/* Whether this build's lone-token scores sum over 16 lanes for head size d (scores16_4x3, AVX-512 builds). */
static inline int att_lanes16(int d) {
#if defined(MH_ATT_ZMM)
    return d % 32 == 0;
#else
    (void)d;
    return 0;
#endif
}

static void block_sum_partials(const float *part, int lanes, float *s, int lds, int nk);

/* Scores of 3 row vectors (qt + 8 r, rows ldq apart, r < 3) x 4 keys (kr[i], d floats each) -> s + i lds + 8 r for
 * i < nk, in a lone token's order. 8 lanes: partial l sums q[c] k[c] over c = l, l + 8, ... by multiply-adds in
 * order, the 8 partials then added as hsum4x8 adds them, ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)).
 * 16 lanes (att_lanes16): partial p over each 32 dims u in order, c = u + f(p) then u + f(p) + 4 (f(p) = 8 (p / 4)
 * + p % 4), the 16 partials then added as hsum16x4 adds them. part: scratch [16, 12, 8]. */
static void block_scores_3x4(const float *qt, int ldq, const float *const *kr, int d, float *part, float *s, int lds,
                             int nk) {
    const int lanes = att_lanes16(d) ? 16 : 8;
    for (int l = 0; l < lanes; l++) {
        MH_ACC12(a);
        /* lane l's dims in order: per unit u of `span` dims, c = u + first (8 lanes), or u + first and u + first + 4 */
        const int span = lanes == 16 ? 32 : 8, last = lanes == 16 ? 4 : 0;
        const int first = lanes == 16 ? 8 * (l / 4) + l % 4 : l;
        for (int u = 0; u < d; u += span)
            for (int c = u + first; c <= u + first + last; c += 4) {
                const float *q = qt + (size_t)c * ldq;
                const __m256 q0 = _mm256_loadu_ps(q), q1 = _mm256_loadu_ps(q + 8), q2 = _mm256_loadu_ps(q + 16);
                __m256 k = _mm256_broadcast_ss(kr[0] + c);
                a00 = _mm256_fmadd_ps(q0, k, a00), a10 = _mm256_fmadd_ps(q1, k, a10), a20 = _mm256_fmadd_ps(q2, k, a20);
                k = _mm256_broadcast_ss(kr[1] + c);
                a01 = _mm256_fmadd_ps(q0, k, a01), a11 = _mm256_fmadd_ps(q1, k, a11), a21 = _mm256_fmadd_ps(q2, k, a21);
                k = _mm256_broadcast_ss(kr[2] + c);
                a02 = _mm256_fmadd_ps(q0, k, a02), a12 = _mm256_fmadd_ps(q1, k, a12), a22 = _mm256_fmadd_ps(q2, k, a22);
                k = _mm256_broadcast_ss(kr[3] + c);
                a03 = _mm256_fmadd_ps(q0, k, a03), a13 = _mm256_fmadd_ps(q1, k, a13), a23 = _mm256_fmadd_ps(q2, k, a23);
            }
        const __m256 res[12] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23};
        for (int x = 0; x < 12; x++) _mm256_storeu_ps(part + (size_t)(l * 12 + x) * 8, res[x]);
    }
    block_sum_partials(part, lanes, s, lds, nk);
}

/* A score tile's lane partials (part [lanes, 12, 8]: partial l of row vector r and key i at (l 12 + 4 r + i) 8) ->
 * s + i lds + 8 r for i < nk: 16 partials added as hsum16x4 adds them, 8 as hsum4x8 does. */
static void block_sum_partials(const float *part, int lanes, float *s, int lds, int nk) {
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < nk; i++) {
            const float *p = part + (size_t)(r * 4 + i) * 8; /* partial l at p + 96 l */
            if (lanes == 16) {
                __m256 x[8];
                for (int e = 0; e < 8; e++)
                    x[e] = _mm256_add_ps(_mm256_loadu_ps(p + 96 * e), _mm256_loadu_ps(p + 96 * (e + 8)));
                for (int e = 0; e < 4; e++) x[e] = _mm256_add_ps(x[e], x[e + 4]);
                for (int e = 0; e < 2; e++) x[e] = _mm256_add_ps(x[e], x[e + 2]);
                _mm256_storeu_ps(s + (size_t)i * lds + 8 * r, _mm256_add_ps(x[0], x[1]));
                continue;
            }
            const __m256 p01 = _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 96));
            const __m256 p23 = _mm256_add_ps(_mm256_loadu_ps(p + 192), _mm256_loadu_ps(p + 288));
            const __m256 p45 = _mm256_add_ps(_mm256_loadu_ps(p + 384), _mm256_loadu_ps(p + 480));
            const __m256 p67 = _mm256_add_ps(_mm256_loadu_ps(p + 576), _mm256_loadu_ps(p + 672));
            _mm256_storeu_ps(s + (size_t)i * lds + 8 * r,
                             _mm256_add_ps(_mm256_add_ps(p01, p23), _mm256_add_ps(p45, p67)));
        }
}

#include "mh_attention_block_bf16.h"

/* Outputs of 3 row vectors x 4 columns: ot[c0 + i][8 r ..] = sum over keys j < n of p[j][8 r ..] v[j][c0 + i], in key
 * order from zero as a lone token sums them; lanes whose row has fewer keys (j >= nr, only from key n0 on) keep
 * their sum. p: s + 8 r0 (rows lds apart), v: vf + c0 (rows d apart). */
static void block_values_3x4(const float *p, int lds, const float *v, int d, int n0, int n, const __m256i *nr,
                             float *ot, int ldo) {
    MH_ACC12(a);
    int j = 0;
    for (; j < n0; j++, p += lds, v += d) {
        const __m256 p0 = _mm256_loadu_ps(p), p1 = _mm256_loadu_ps(p + 8), p2 = _mm256_loadu_ps(p + 16);
        __m256 x = _mm256_broadcast_ss(v);
        a00 = _mm256_fmadd_ps(p0, x, a00), a10 = _mm256_fmadd_ps(p1, x, a10), a20 = _mm256_fmadd_ps(p2, x, a20);
        x = _mm256_broadcast_ss(v + 1);
        a01 = _mm256_fmadd_ps(p0, x, a01), a11 = _mm256_fmadd_ps(p1, x, a11), a21 = _mm256_fmadd_ps(p2, x, a21);
        x = _mm256_broadcast_ss(v + 2);
        a02 = _mm256_fmadd_ps(p0, x, a02), a12 = _mm256_fmadd_ps(p1, x, a12), a22 = _mm256_fmadd_ps(p2, x, a22);
        x = _mm256_broadcast_ss(v + 3);
        a03 = _mm256_fmadd_ps(p0, x, a03), a13 = _mm256_fmadd_ps(p1, x, a13), a23 = _mm256_fmadd_ps(p2, x, a23);
    }
    for (; j < n; j++, p += lds, v += d) { /* the diagonal: rows whose token has no key j keep their sums */
        const __m256i jv = _mm256_set1_epi32(j);
        const __m256 m0 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nr[0], jv));
        const __m256 m1 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nr[1], jv));
        const __m256 m2 = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nr[2], jv));
        const __m256 p0 = _mm256_loadu_ps(p), p1 = _mm256_loadu_ps(p + 8), p2 = _mm256_loadu_ps(p + 16);
#define MH_MCOL(i, c0, c1, c2)                                                                                     \
    {                                                                                                              \
        const __m256 x = _mm256_broadcast_ss(v + i);                                                               \
        c0 = _mm256_blendv_ps(c0, _mm256_fmadd_ps(p0, x, c0), m0);                                                 \
        c1 = _mm256_blendv_ps(c1, _mm256_fmadd_ps(p1, x, c1), m1);                                                 \
        c2 = _mm256_blendv_ps(c2, _mm256_fmadd_ps(p2, x, c2), m2);                                                 \
    }
        MH_MCOL(0, a00, a10, a20) MH_MCOL(1, a01, a11, a21) MH_MCOL(2, a02, a12, a22) MH_MCOL(3, a03, a13, a23)
#undef MH_MCOL
    }
    const __m256 res[4][3] = {{a00, a10, a20}, {a01, a11, a21}, {a02, a12, a22}, {a03, a13, a23}};
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < 3; r++) _mm256_storeu_ps(ot + (size_t)i * ldo + 8 * r, res[i][r]);
}

/* The block's R query rows (row r: query head r % G of token r / G, at q + (r / G) ldq + (r % G) d), scaled ->
 * qt [d, ldr] (row r at column r; columns past R zero), 8 x 8 at a time. */
static void block_queries(const float *q, int ldq, int G, int d, int R, int ldr, float scale, float *qt) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (int r0 = 0; r0 < ldr; r0 += 8)
        for (int c0 = 0; c0 < d; c0 += 8) {
            __m256 x[8];
            for (int i = 0; i < 8; i++) {
                const int r = r0 + i;
                x[i] = r < R ? _mm256_mul_ps(_mm256_loadu_ps(q + (size_t)(r / G) * ldq + (r % G) * d + c0), sv)
                             : _mm256_setzero_ps();
            }
            transpose8(x);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(qt + (size_t)(c0 + i) * ldr + r0, x[i]);
        }
}

/* One chunk of n (<= 64) keys (kp: their rows; r8: NULL, or, in AVX2 builds, the int8 cache's rows, turned into
 * float32 here where bfloat16 ones are widened; kf: scratch [n, d]) for a block's rows (queries w->qt [d, ldr], row r
 * using its first nrow[r] >= 1 keys): ot [d, ldr] the unnormalized outputs, mx [ldr] the scores' max and sm [ldr]
 * the sum of exp(score - max), each as attend_part_avx2 forms them for a token alone. */
static void block_chunk(const mh_model *m, const uint16_t *const *kp, const mh_kv8_chunk *r8, float *kf, int n,
                        const int *nrow, int ldr, const mh_block_scratch *w, float *ot, float *mx, float *sm) {
    const int d = m->head_dim;
    (void)r8; /* (AVX-512 BF16 builds turn the int8 rows into bfloat16 ones before) */
#if defined(MH_ATT_BF16)
    const int bf = att_bf16(d); /* w->qt holds the queries' bfloat16 pairs (block_queries_bf16) */
#else
    const int bf = 0;
#endif
    if (bf)
        for (int j = 0; j < n && j < 8; j++) /* the first rows; each tile fetches the rows 8 keys on */
            prefetch_row(kp[j], 2 * d);
#if !defined(MH_ATT_BF16)
    else if (r8)
        kv8_f32_rows(m, r8, n, 0, kf);
#endif
    else
        widen_rows(kp, 0, n, d, m->kv_stride, kf);
    for (int v0 = 0; v0 < ldr; v0 += 24) /* scores s [n, ldr], 3 row vectors x 4 keys a tile */
        for (int k0 = 0; k0 < n; k0 += 4) {
            const int nkt = n - k0 < 4 ? n - k0 : 4;
#if defined(MH_ATT_BF16)
            if (bf) {
                const uint16_t *kr[4];
                for (int i = 0; i < 4; i++) kr[i] = kp[k0 + (i < nkt ? i : nkt - 1)];
                if (v0 == 0)
                    for (int i = 0; i < nkt && k0 + 8 + i < n; i++)
                        prefetch_row(kp[k0 + 8 + i], 2 * d);
                block_scores_bf16_3x4((const uint32_t *)w->qt + v0, ldr, kr, d, w->part, w->s + (size_t)k0 * ldr + v0,
                                      ldr, nkt);
                continue;
            }
#endif
            const float *kr[4];
            for (int i = 0; i < 4; i++) kr[i] = kf + (size_t)(k0 + (i < nkt ? i : nkt - 1)) * d;
            block_scores_3x4(w->qt + v0, ldr, kr, d, w->part, w->s + (size_t)k0 * ldr + v0, ldr, nkt);
        }
    /* per row: the max over its keys, exp(score - max) (a lone token's exp256 over whole groups of 8 keys, expf
     * over the rest), the sum of the exps (8 lane sums over the groups, added as hsum8a does, then the rest) */
    for (int v0 = 0; v0 < ldr; v0 += 8) {
        const __m256i nr = _mm256_loadu_si256((const __m256i *)(nrow + v0));
        const __m256i n8 = _mm256_and_si256(nr, _mm256_set1_epi32(~7));
        __m256 best = _mm256_set1_ps(-INFINITY);
        for (int j = 0; j < n; j++) {
            const __m256 in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(nr, _mm256_set1_epi32(j)));
            best = _mm256_blendv_ps(best, _mm256_max_ps(best, _mm256_loadu_ps(w->s + (size_t)j * ldr + v0)), in);
        }
        __m256 ps[8];
        for (int l = 0; l < 8; l++) ps[l] = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            float *row = w->s + (size_t)j * ldr + v0;
            const __m256 x = _mm256_loadu_ps(row), e = exp256(_mm256_sub_ps(x, best));
            const __m256 in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(n8, _mm256_set1_epi32(j)));
            _mm256_storeu_ps(row, _mm256_blendv_ps(x, e, in)); /* the rest keep their scores for expf below */
            ps[j & 7] = _mm256_add_ps(ps[j & 7], _mm256_and_ps(e, in));
        }
        const __m256 tot = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(ps[0], ps[4]), _mm256_add_ps(ps[2], ps[6])),
                                         _mm256_add_ps(_mm256_add_ps(ps[1], ps[5]), _mm256_add_ps(ps[3], ps[7])));
        _mm256_storeu_ps(mx + v0, best);
        _mm256_storeu_ps(sm + v0, tot);
        for (int r = v0; r < v0 + 8; r++) /* the keys past the row's whole groups of 8 */
            for (int j = nrow[r] & ~7; j < nrow[r]; j++) {
                float *e = w->s + (size_t)j * ldr + r;
                *e = expf(*e - mx[r]);
                sm[r] += *e;
            }
    }
#if defined(MH_ATT_BF16)
    if (bf) { /* values: weights and value rows in bfloat16 pairs, outputs ot [d, ldr], 3 row vectors x 4 columns */
        block_weights_bf16(w->s, n, ldr, nrow);
        block_value_pairs(kp, m->kv_stride, n, d, (uint32_t *)kf);
        for (int v0 = 0; v0 < ldr; v0 += 24)
            for (int c0 = 0; c0 < d; c0 += 4)
                block_values_bf16_3x4((const uint32_t *)w->s + v0, ldr, (const uint32_t *)kf + c0, d, (n + 1) / 2,
                                      ot + (size_t)c0 * ldr + v0, ldr);
        return;
    }
#endif
    /* values: widened over the keys, outputs ot [d, ldr], 3 row vectors x 4 columns a tile */
#if !defined(MH_ATT_BF16)
    if (r8)
        kv8_f32_rows(m, r8, n, 1, kf);
    else
#endif
        widen_rows(kp, m->kv_stride, n, d, 0, kf);
    for (int v0 = 0; v0 < ldr; v0 += 24) {
        __m256i nr[3];
        int n0 = n;
        for (int r = 0; r < 3; r++) nr[r] = _mm256_loadu_si256((const __m256i *)(nrow + v0 + 8 * r));
        for (int r = v0; r < v0 + 24; r++) n0 = nrow[r] < n0 ? nrow[r] : n0;
        for (int c0 = 0; c0 < d; c0 += 4)
            block_values_3x4(w->s + v0, ldr, kf + c0, d, n0, n, nr, ot + (size_t)c0 * ldr + v0, ldr);
    }
}

/* A block's nch chunk results (ot [nch, d, ldr], mx and sm [nch, ldr]) -> its rows' attention outputs, row r at
 * out + (r / G) ldo + (r % G) d, merged as attn_merge merges a lone token's (the same operations per element, 8 rows
 * at a time). tmp: scratch [d, 8]. */
static void block_merge(int G, int d, int R, int ldr, int nch, const float *ot, const float *mx, const float *sm,
                        float *tmp, float *out, int ldo) {
    for (int v0 = 0; v0 < R; v0 += 8) {
        __m256 best = _mm256_set1_ps(-INFINITY), tot = _mm256_setzero_ps(), wgt[64];
        for (int c = 0; c < nch; c++) {
            const __m256 x = _mm256_loadu_ps(mx + (size_t)c * ldr + v0);
            best = _mm256_blendv_ps(best, x, _mm256_cmp_ps(x, best, _CMP_GT_OQ));
        }
        for (int c = 0; c < nch; c++) {
            wgt[c] = nch == 1 ? _mm256_set1_ps(1.0f)
                              : exp256(_mm256_sub_ps(_mm256_loadu_ps(mx + (size_t)c * ldr + v0), best));
            tot = _mm256_fmadd_ps(wgt[c], _mm256_loadu_ps(sm + (size_t)c * ldr + v0), tot);
        }
        for (int i = 0; i < d; i++) {
            __m256 acc = _mm256_setzero_ps();
            for (int c = 0; c < nch; c++)
                acc = _mm256_fmadd_ps(wgt[c], _mm256_loadu_ps(ot + ((size_t)c * d + i) * ldr + v0), acc);
            _mm256_storeu_ps(tmp + (size_t)i * 8, _mm256_div_ps(acc, tot));
        }
        for (int c0 = 0; c0 < d; c0 += 8) { /* tmp's columns -> the rows, 8 x 8 */
            __m256 x[8];
            for (int i = 0; i < 8; i++) x[i] = _mm256_loadu_ps(tmp + (size_t)(c0 + i) * 8);
            transpose8(x);
            for (int i = 0; i < 8 && v0 + i < R; i++) {
                const int r = v0 + i;
                _mm256_storeu_ps(out + (size_t)(r / G) * ldo + (r % G) * d + c0, x[i]);
            }
        }
    }
}
#undef MH_ACC12
#endif
#endif
