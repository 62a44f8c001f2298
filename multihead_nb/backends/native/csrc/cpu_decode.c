/* One forward of a Llama-family model over a flattened batch of any length, on the CPU, in one OpenMP region.
 *
 * Owns: the math of every layer for T tokens (decode steps of a few sequences, prefill chunks of any length),
 * reading and writing K/V directly in the arena's pages through the block tables: embedding lookup, RMSNorm,
 * q/k/v (+bias), qwen3's per-head q/k norm, RoPE, the K/V write (bfloat16, or int8 and a scale per 32 values),
 * causal (optionally sliding-window) attention over pages, o_proj + residual, RMSNorm, gate/up, SiLU-times-up,
 * down + residual, the final norm and the lm_head for the rows whose logits are wanted (the last layer's o_proj and
 * MLP run for those rows only).
 * Knows nothing of requests or which pages are whose (the block tables say), nor of Python.
 *
 * Weights are bfloat16 or GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K), each matrix in its own format,
 * read in place (no dequantized copy), or on x86 with int8 activations with rows interleaved 8 at a time (a copy
 * made at load); products are mh_matmul.h's, per instruction set mh_dot_*.h; a layer's attention is
 * mh_attend_layer.h's, the per-token steps between products mh_token_ops.h's. The residual stream
 * and every product's input are float32 (bfloat16 for bfloat16 weights with AVX-512 BF16; int8 per 32 elements
 * for quantized weights by default on NEON and x86, as llama.cpp does).
 * Built at run time by cpu_kernel.py once per instruction set (-O3 plus that set's flags, -fopenmp), loaded with
 * ctypes; the OpenMP runtime is the one torch already loaded (same soname), so torch's threads and these are one
 * pool. Scratch memory is allocated per call.
 */
#include "mh_matmul.h"
#include "mh_attend_layer.h"
#include "mh_token_ops.h"

static int forms_of(const mh_model *m, const mh_matrix *a, const mh_matrix *b, const mh_matrix *c) {
    const int i8 = m->int8_activations;
    return act_form(a->format, i8) | (b ? act_form(b->format, i8) : 0) | (c ? act_form(c->format, i8) : 0);
}

typedef struct { /* the o product's input, prepared by attention's merges (mh_att_epilogue) */
    const mh_act *act;
    int K, forms;
} mh_o_prep;

static void prep_o_cols(void *ctx, int t, const float *row, int c0, int n) {
    const mh_o_prep *p = ctx;
    prep_token_cols(p->act, t, row + c0, p->K, c0, n, p->forms);
}

typedef struct { /* scratch of one call */
    float *x, *xn, *qkv, *gu, *attn, *sel;
    mh_att_work att;
    mh_act act;
} mh_work;

/* Free everything and return rc. */
static int release(mh_work *w, int rc) {
    void *ps[] = {w->x, w->xn, w->qkv, w->gu, w->attn, w->sel, w->act.f, w->act.h, w->act.q, w->act.d, w->act.s16,
                  w->act.s32, w->act.qz, w->act.dz, w->act.iz};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) free(ps[i]);
    att_work_free(&w->att);
    return rc;
}

/* Whether the step reads only what exists (the forward indexes the embedding, the block tables and the arena
 * without checks): 0, or MH_BAD_* naming the first problem found (mirrored in cpu_kernel.py). */
enum { MH_BAD_SHAPE = -1, MH_BAD_ID = -3, MH_BAD_POS = -4, MH_BAD_PAGE = -5, MH_BAD_LOGITS = -6 };
static int check_step(const mh_model *m, const mh_step *s) {
    const int d = m->head_dim, tpp = m->tokens_per_page;
    if (d > 512 || (d & 1) || s->T < 1 || s->S < 1 || m->kv_heads < 1 || m->heads % m->kv_heads ||
        s->num_logits < 0 || s->num_logits > s->T || tpp < 1 ||
        (m->kv_int8 && (d % 32 || d > MH_GROUP_DIM || m->heads / m->kv_heads > MH_GROUP_MAX)))
        return MH_BAD_SHAPE;
    for (int i = 0; i < s->S; i++) {
        const int ctx = s->ctx_lens[i];
        if (ctx < 1 || ctx > s->max_ctx || (ctx + tpp - 1) / tpp > s->max_pages) return MH_BAD_SHAPE;
        for (int p = 0; p < (ctx + tpp - 1) / tpp; p++) {
            const int32_t page = s->block_tables[(size_t)i * s->max_pages + p];
            if (page < 0 || page >= m->num_pages) return MH_BAD_PAGE;
        }
    }
    for (int t = 0; t < s->T; t++) {
        if (s->input_ids[t] < 0 || s->input_ids[t] >= m->vocab) return MH_BAD_ID;
        const int seq = s->seq_of[t];
        if (seq < 0 || seq >= s->S) return MH_BAD_SHAPE;
        if (s->pos[t] < 0 || s->pos[t] >= s->ctx_lens[seq] || s->pos[t] >= s->rope_rows) return MH_BAD_POS;
    }
    for (int i = 0; i < s->num_logits; i++)
        if (s->logits_idx[i] < 0 || s->logits_idx[i] >= s->T) return MH_BAD_LOGITS;
    return 0;
}

/* The forward of step s: 0, -2 (out of memory) or check_step's code (nothing read or written). */
int mh_forward(const mh_model *m, mh_step *s) {
    const int T = s->T, h = m->hidden, H = m->heads, KV = m->kv_heads, d = m->head_dim, I = m->inter;
    const int HD = H * d, KVd = KV * d, QKV = (H + 2 * KV) * d, L = s->num_logits, V = m->vocab;
    const int bad = check_step(m, s);
    if (bad) return bad;
    const int nt = s->num_threads > 0 ? s->num_threads : 1;
    const int Kmax = h > HD ? (h > I ? h : I) : (HD > I ? HD : I);
    mh_work w = {0};
    w.x = alloc64(sizeof(float) * T * h);
    w.xn = alloc64(sizeof(float) * T * Kmax);
    w.qkv = alloc64(sizeof(float) * T * QKV);
    w.gu = alloc64(sizeof(float) * T * 2 * I);
    w.attn = alloc64(sizeof(float) * T * HD);
    if (att_work_alloc(m, s, nt, &w.att)) return release(&w, -2);
    w.sel = alloc64(sizeof(float) * (L + 1) * (h + HD));
    w.act.f = alloc64(sizeof(float) * T * Kmax);
    w.act.h = alloc64(sizeof(uint16_t) * T * Kmax);
    w.act.q = alloc64((size_t)T * Kmax);
    w.act.d = alloc64(sizeof(float) * T * (Kmax / 32 + 1));
    w.act.s16 = alloc64(sizeof(float) * T * (Kmax / 16 + 1));
    w.act.s32 = alloc64(sizeof(float) * T * (Kmax / 32 + 1));
    w.act.qz = alloc64((size_t)T * zpairs(Kmax) * 64);
    w.act.dz = alloc64(sizeof(float) * T * zpairs(Kmax) * MH_ZF);
    w.act.iz = alloc64(sizeof(int32_t) * T * zpairs(Kmax) * 2);
    if (!w.x || !w.xn || !w.qkv || !w.gu || !w.attn || !w.sel || !w.act.f || !w.act.h || !w.act.q ||
        !w.act.d || !w.act.s16 || !w.act.s32 || !w.act.qz || !w.act.dz ||
        !w.act.iz)
        return release(&w, -2);

#pragma omp parallel num_threads(nt)
    {
        mh_act A = w.act, *act = &A; /* this thread's view (T and K change per product; the buffers are shared) */
        int rows = T, compacted = 0; /* token rows still computed: all, then (after the last attention) the logits' */
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) dequant_row(&m->embed, (int)s->input_ids[t], w.x + (size_t)t * h);

        for (int l = 0; l < m->num_layers; l++) {
            const mh_layer *Ly = &m->layers[l];
            const int last = l == m->num_layers - 1;
            norm_into_act(act, m, w.x, Ly->ln1, T, NULL, w.xn, forms_of(m, &Ly->q, &Ly->k, &Ly->v));
            {
                const float *b = Ly->bqkv;
                mh_part qkv[3] = {{&Ly->q, b, w.qkv, QKV, 0}, {&Ly->k, b ? b + HD : NULL, w.qkv + HD, QKV, 0},
                                  {&Ly->v, b ? b + HD + KVd : NULL, w.qkv + HD + KVd, QKV, 0}};
                matmul(qkv, 3, act);
            }
#pragma omp barrier

            /* q/k norm and RoPE per head; keys and values into their page slots */
#pragma omp for schedule(static)
            for (int i = 0; i < T * (H + KV); i++) {
                const int t = i / (H + KV), hh = i % (H + KV);
                float *v = w.qkv + (size_t)t * QKV + (size_t)hh * d;
                const float *nw = hh < H ? Ly->q_norm : Ly->k_norm;
                if (nw) rms_norm_row(v, nw, d, m->eps, v);
                rope(v, s->cos + (size_t)s->pos[t] * d, s->sin + (size_t)s->pos[t] * d, d);
                if (hh >= H) {
                    const int kvh = hh - H;
                    const int64_t off = (int64_t)l * m->layer_stride + slot_offset(m, s, s->seq_of[t], s->pos[t])
                                        + (int64_t)kvh * d;
                    const float *val = w.qkv + (size_t)t * QKV + (size_t)(H + KV + kvh) * d;
                    if (m->kv_int8) {
                        int8_t *row;
                        float *sc;
                        kv8_slot(m, s, s->seq_of[t], s->pos[t], l, kvh, &row, &sc);
                        kv8_quantize_row(v, d, row, sc);
                        kv8_quantize_row(val, d, row + m->kv_stride, sc + m->kv_stride / 32);
                        continue;
                    }
                    f32_to_bf16_row(v, d, m->cache + off);
                    f32_to_bf16_row(val, d, m->cache + off + m->kv_stride);
                }
            }

            /* the o product's input prepared by the merges where they can (decode; not before the compaction) */
            const int o_forms = act_form(Ly->o.format, m->int8_activations);
            mh_o_prep op = {act, HD, o_forms};
            const mh_att_epilogue ep = {prep_o_cols, &op};
            const int prepped = attend_layer(m, s, l, w.qkv, QKV, w.attn, &w.att, last && L < T ? NULL : &ep);

            if (last && L < T) { /* only the rows whose logits are wanted go on */
#pragma omp single
                {
                    for (int i = 0; i < L; i++) {
                        memcpy(w.sel + (size_t)i * (h + HD), w.x + (size_t)s->logits_idx[i] * h, sizeof(float) * h);
                        memcpy(w.sel + (size_t)i * (h + HD) + h, w.attn + (size_t)s->logits_idx[i] * HD,
                               sizeof(float) * HD);
                    }
                    for (int i = 0; i < L; i++) {
                        memcpy(w.x + (size_t)i * h, w.sel + (size_t)i * (h + HD), sizeof(float) * h);
                        memcpy(w.attn + (size_t)i * HD, w.sel + (size_t)i * (h + HD) + h, sizeof(float) * HD);
                    }
                }
                rows = L;
                compacted = 1;
            }
            act->T = rows;
            act->K = HD;
            if (prepped)
                act_view(act, w.attn, HD, o_forms);
            else
                prep_act(act, w.attn, HD, o_forms);
            {
                mh_part o = {&Ly->o, Ly->bo, w.x, h, 1};
                matmul(&o, 1, act);
            }
#pragma omp barrier

            norm_into_act(act, m, w.x, Ly->ln2, rows, NULL, w.xn, forms_of(m, &Ly->gate, &Ly->up, NULL));
            {
                mh_part gu[2] = {{&Ly->gate, NULL, w.gu, 2 * I, 0}, {&Ly->up, NULL, w.gu + I, 2 * I, 0}};
                matmul(gu, 2, act);
            }
#pragma omp barrier
            silu_into_act(act, w.gu, rows, I, w.xn, act_form(Ly->down.format, m->int8_activations));
            {
                mh_part down = {&Ly->down, NULL, w.x, h, 1};
                matmul(&down, 1, act);
            }
#pragma omp barrier
        }

        /* final norm and lm_head for the logits' rows */
        norm_into_act(act, m, w.x, m->final_norm, L, compacted ? NULL : s->logits_idx, w.xn,
                      act_form(m->lm_head.format, m->int8_activations));
        {
            mh_part head = {&m->lm_head, NULL, s->logits, V, 0};
            matmul(&head, 1, act);
        }
    }
    return release(&w, 0);
}

/* ---- entry points for tests and for Python's reports ----------------------------------------------------- */

/* out[T, W.rows] = X[T, W.cols] . W^T through this build's kernels (activations prepared as the forward does for a
 * model with int8_activations = int8). */
int mh_matmul_test(const mh_matrix *W, const float *X, int T, float *out, int num_threads, int int8) {
    const int K = W->cols;
    mh_act a = {T, K, 0, NULL, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    a.f = alloc64(sizeof(float) * T * K);
    a.h = alloc64(sizeof(uint16_t) * T * K);
    a.q = alloc64((size_t)T * K);
    a.d = alloc64(sizeof(float) * T * (K / 32 + 1));
    a.s16 = alloc64(sizeof(float) * T * (K / 16 + 1));
    a.s32 = alloc64(sizeof(float) * T * (K / 32 + 1));
    a.qz = alloc64((size_t)T * zpairs(K) * 64);
    a.dz = alloc64(sizeof(float) * T * zpairs(K) * MH_ZF);
    a.iz = alloc64(sizeof(int32_t) * T * zpairs(K) * 2);
    int rc = a.f && a.h && a.q && a.d && a.s16 && a.s32 && a.qz && a.dz && a.iz ? 0 : -2;
    if (rc == 0) {
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1)
        {
            prep_act(&a, X, K, act_form(W->format, int8));
            mh_part p = {W, NULL, out, W->rows, 0};
            matmul(&p, 1, &a);
        }
    }
    free(a.f), free(a.h), free(a.q), free(a.d), free(a.s16), free(a.s32), free(a.qz), free(a.dz), free(a.iz);
    return rc;
}

/* x [n] -> bfloat16 out [n] as the forward rounds keys, values and vdpbf16ps inputs. */
void mh_to_bf16(const float *x, int n, uint16_t *out) { f32_to_bf16_row(x, n, out); }

/* Row r of W as float32. */
void mh_dequant_row(const mh_matrix *W, int r, float *out) { dequant_row(W, r, out); }

/* Whether this build multiplies the interleaved layouts (MH_Q8_0X8, ...): x86 with int8 activations. */
int mh_reads_interleaved(int int8) {
#if defined(MH_ISA_X86)
    return int8 != 0;
#else
    (void)int8;
    return 0;
#endif
}

/* 1 where this library was built with OpenMP (the forward's threads), 0 where the compiler had none (one thread). */
int mh_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The instruction set this build uses, as %mh status reports it. */
const char *mh_isa(void) {
#if defined(MH_ISA_X86)
#if defined(MH_VNNI_EMULATE)
#define MH_VNNI_NAME "+vnni-emulated"
#elif defined(MH_VNNI)
#define MH_VNNI_NAME "+vnni"
#else
#define MH_VNNI_NAME ""
#endif
#if defined(__AVX512F__)
#ifdef MH_BF16_DOT
    return "avx512+bf16" MH_VNNI_NAME;
#else
    return "avx512" MH_VNNI_NAME;
#endif
#else
    return "avx2+fma" MH_VNNI_NAME;
#endif
#elif defined(MH_ISA_NEON)
#ifdef __ARM_FEATURE_DOTPROD
    return "neon+dotprod";
#else
    return "neon";
#endif
#else
    return "scalar";
#endif
}
