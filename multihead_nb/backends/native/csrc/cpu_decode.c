/* One forward of a Llama-family model over a small flattened batch, bfloat16, on the CPU, in one OpenMP region.
 *
 * Owns: the math of every layer for T tokens (T small: decode steps of a few sequences, short prefill chunks),
 * reading and writing K/V directly in the arena's pages through the block tables: RMSNorm, q/k/v (+bias),
 * qwen3's per-head q/k norm, RoPE, the K/V write, causal (optionally sliding-window) attention over pages,
 * o_proj + residual, RMSNorm, gate/up + SiLU-times-up, down + residual, and the final norm. The lm_head stays in
 * PyTorch. Knows nothing of requests or which pages are whose (the block tables say), nor of Python.
 *
 * Why: a decode step reads every weight once, so it is bound by memory bandwidth; in PyTorch each layer is ~25
 * calls whose fixed costs add up to more than the bytes take. Here a layer is one pass with ~7 barriers.
 * Weights are plain row-major [out, in] bfloat16; the residual stream is kept in float32.
 * Built at run time by cpu_kernel.py (cc -O3 -march=native -fopenmp), loaded with ctypes; the OpenMP runtime is
 * the one torch already loaded (same soname), so torch's threads and these are one pool. With AVX-512 BF16 the
 * dot products use it (and the attention groups a KV head's query heads); otherwise, or with -DMH_PORTABLE,
 * plain C that the compiler vectorizes.
 */
#include "mh_kernel.h"

/* ---- matrix-vector products: out[m, n] (+)= X[m, :] . W[n, :] (+ bias[n]) for n in [n0, n1) ---------------- */

static void gemv(const uint16_t *W, const uint16_t *bias, const uint16_t *X, int M, int K, int n0, int n1,
                 float *out, int ldo, int accumulate) {
    for (int n = n0; n < n1; n++) {
        const uint16_t *w = W + (size_t)n * K;
        const float b = bias ? bf16_to_f32(bias[n]) : 0.0f;
        float res[8];
        for (int m0 = 0; m0 < M; m0 += 8) {
            const int mt = M - m0 < 8 ? M - m0 : 8;
            const uint16_t *x = X + (size_t)m0 * K;
#ifdef MH_BF16_DOT
            row_dots(w, K, x, K, res, mt);
#else
            for (int m = 0; m < mt; m++) {
                const uint16_t *xr = x + (size_t)m * K;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int k = 0; k < K; k++) acc += bf16_to_f32(w[k]) * bf16_to_f32(xr[k]);
                res[m] = acc;
            }
#endif
            for (int m = 0; m < mt; m++) {
                float *o = out + (size_t)(m0 + m) * ldo + n;
                *o = accumulate ? *o + res[m] + b : res[m] + b;
            }
        }
    }
}

/* This thread's share [*n0, *n1) of N rows, in blocks of 4 rows, contiguous per thread. */
static void share(int N, int *n0, int *n1) {
    int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int blocks = (N + 3) / 4, per = (blocks + nt - 1) / nt;
    int a = tid * per * 4, b = (tid + 1) * per * 4;
    *n0 = a < N ? a : N;
    *n1 = b < N ? b : N;
}

/* ---- small per-row pieces -------------------------------------------------------------------------------- */

static void rms_norm_row(const float *x, const uint16_t *w, int h, float eps, uint16_t *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int k = 0; k < h; k++) ss += x[k] * x[k];
    float r = 1.0f / sqrtf(ss / h + eps);
    for (int k = 0; k < h; k++) out[k] = f32_to_bf16(x[k] * r * bf16_to_f32(w[k]));
}

static void head_norm(float *v, const uint16_t *w, int d, float eps) { /* qwen3: RMSNorm over one head */
    float ss = 0.0f;
    for (int k = 0; k < d; k++) ss += v[k] * v[k];
    float r = 1.0f / sqrtf(ss / d + eps);
    for (int k = 0; k < d; k++) v[k] = v[k] * r * bf16_to_f32(w[k]);
}

static void rope(float *v, const float *cos, const float *sin, int d) {
    float tmp[512];
    int half = d / 2;
    for (int k = 0; k < d; k++) tmp[k] = v[k] * cos[k] + v[(k + half) % d] * sin[k];
    memcpy(v, tmp, sizeof(float) * d);
}

/* Element offset of (page slot of position p of sequence s) in a layer's keys. */
#include "mh_attention.h"


static float silu(float g) { return g / (1.0f + expf(-g)); }

/* ---- the forward ----------------------------------------------------------------------------------------- */

int mh_forward(const mh_model *m, mh_step *s) {
    const int T = s->T, h = m->hidden, H = m->heads, KV = m->kv_heads, d = m->head_dim, I = m->inter;
    const int HD = H * d, QKV = (H + 2 * KV) * d;
    if (d > 512 || (d & 1) || T < 1 || m->kv_heads < 1 || H % KV) return -1;
    const int G = H / KV;
#ifdef MH_BF16_DOT
    const int grouped = d % 16 == 0 && d <= 256 && G <= 8;
#else
    const int grouped = 0;
#endif

#pragma omp parallel num_threads(s->num_threads)
    {
        int n0, n1;
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            for (int k = 0; k < h; k++)
                s->x[(size_t)t * h + k] = bf16_to_f32(m->embed[(size_t)s->input_ids[t] * h + k]);

        for (int l = 0; l < m->num_layers; l++) {
            const mh_layer *L = &m->layers[l];
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) rms_norm_row(s->x + (size_t)t * h, L->ln1, h, m->eps, s->xn + (size_t)t * h);

            share(QKV, &n0, &n1);
            gemv(L->wqkv, L->bqkv, s->xn, T, h, n0, n1, s->qkv, QKV, 0);
#pragma omp barrier

            /* q/k norm and RoPE per head; keys and values into their page slots */
#pragma omp for schedule(static)
            for (int i = 0; i < T * (H + KV); i++) {
                int t = i / (H + KV), hh = i % (H + KV);
                float *v = s->qkv + (size_t)t * QKV + (size_t)hh * d;
                const uint16_t *nw = hh < H ? L->q_norm : L->k_norm;
                if (nw) head_norm(v, nw, d, m->eps);
                rope(v, s->cos + (size_t)t * d, s->sin + (size_t)t * d, d);
                if (hh >= H) {
                    int kvh = hh - H;
                    int64_t off = (int64_t)l * m->layer_stride + slot_offset(m, s, s->seq_of[t], s->pos[t])
                                  + (int64_t)kvh * d;
                    const float *val = s->qkv + (size_t)t * QKV + (size_t)(H + KV + kvh) * d;
                    for (int c = 0; c < d; c++) {
                        m->cache[off + c] = f32_to_bf16(v[c]);
                        m->cache[off + m->kv_stride + c] = f32_to_bf16(val[c]);
                    }
                }
            }

            if (grouped) {
#pragma omp for schedule(dynamic, 1)
                for (int i = 0; i < T * KV; i++)
                    attend_group(m, s, l, i / KV, i % KV, s->scores + (size_t)i * G * s->max_ctx,
                                 s->attn + (size_t)(i / KV) * HD + (size_t)(i % KV) * G * d);
            } else {
#pragma omp for schedule(dynamic, 1)
                for (int i = 0; i < T * H; i++)
                    attend(m, s, l, i / H, i % H, s->scores + (size_t)i * s->max_ctx,
                           s->attn + (size_t)(i / H) * HD + (size_t)(i % H) * d);
            }

            share(h, &n0, &n1);
            gemv(L->wo, L->bo, s->attn, T, HD, n0, n1, s->x, h, 1);
#pragma omp barrier

#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) rms_norm_row(s->x + (size_t)t * h, L->ln2, h, m->eps, s->xn + (size_t)t * h);

            share(I, &n0, &n1); /* gate rows i and up rows I + i of the same i on the same thread */
            gemv(L->wgu, NULL, s->xn, T, h, n0, n1, s->gu, 2 * I, 0);
            gemv(L->wgu, NULL, s->xn, T, h, I + n0, I + n1, s->gu, 2 * I, 0);
            for (int t = 0; t < T; t++)
                for (int i = n0; i < n1; i++) {
                    const float *g = s->gu + (size_t)t * 2 * I;
                    s->act[(size_t)t * I + i] = f32_to_bf16(silu(g[i]) * g[I + i]);
                }
#pragma omp barrier

            share(h, &n0, &n1);
            gemv(L->wdown, NULL, s->act, T, I, n0, n1, s->x, h, 1);
#pragma omp barrier
        }

#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            rms_norm_row(s->x + (size_t)t * h, m->final_norm, h, m->eps, s->out + (size_t)t * h);
    }
    return 0;
}

/* Which matrix-vector path this build uses: 1 = AVX-512 BF16 dot products, 0 = portable C. */
int mh_simd_path(void) {
#ifdef MH_BF16_DOT
    return 1;
#else
    return 0;
#endif
}
