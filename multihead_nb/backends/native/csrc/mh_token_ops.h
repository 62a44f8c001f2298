/* The per-token-row operations of a layer between its products: RMSNorm, RoPE, SiLU times up, and the norm and the
 * SiLU written straight into the next product's prepared input (norm_into_act, silu_into_act), their rows cut in
 * column pieces so that both threads work at batch 1 and 3 (row_pieces). Each element's result depends on its row
 * only, whatever the pieces (the batch-invariance the products keep, mh_matmul.h). Knows nothing of weights'
 * formats or pages. */
#ifndef MH_TOKEN_OPS_H
#define MH_TOKEN_OPS_H
#include "mh_matmul.h"
#include "mh_attention.h"

/* 1 / sqrt(mean(x^2) + eps) of a row. The sum of squares: on x86 four 8-lane accumulators over each
 * 32 elements, added ((a0 + a1) + (a2 + a3)) then across the lanes as hsum8 does, the rest of h one by one (one
 * sequence of 576 dependent additions took ~1.2 k cycles per row and norm on a Zen 5: ~2% of a decode step, the
 * other thread waiting); elsewhere in order. Either way one order per build, whatever the batch. */
static float rms_inv(const float *x, int h, float eps) {
    float ss = 0.0f;
    int k = 0;
#if defined(MH_ISA_X86)
    if (h >= 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 32 <= h; k += 32) {
            const __m256 v0 = _mm256_loadu_ps(x + k), v1 = _mm256_loadu_ps(x + k + 8);
            const __m256 v2 = _mm256_loadu_ps(x + k + 16), v3 = _mm256_loadu_ps(x + k + 24);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, v0)), a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, v1));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(v2, v2)), a3 = _mm256_add_ps(a3, _mm256_mul_ps(v3, v3));
        }
        ss = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
#endif
    for (; k < h; k++) ss += x[k] * x[k];
    return 1.0f / sqrtf(ss / h + eps);
}

/* out = x / sqrt(mean(x^2) + eps) * w for one row. */
static void rms_norm_row(const float *x, const float *w, int h, float eps, float *out) {
    const float r = rms_inv(x, h, eps);
    for (int k = 0; k < h; k++) out[k] = x[k] * r * w[k];
}

/* Pieces per row of the per-token steps: with fewer than 4 rows per thread (decode), each row is cut in one piece
 * per thread (whole 64-column units, prep_token_cols' granule), so that no thread waits while another does two of
 * three rows (at batch 1 one thread did all); otherwise whole rows. The pieces never change an element's bits. */
static int row_pieces(int rows, int K) {
    const int nt = omp_get_num_threads();
    return nt > 1 && rows < 4 * nt && K % 64 == 0 && K / 64 >= nt ? nt : 1;
}

/* Item i of a loop over rows x P pieces of K columns: row *t, columns [*c0, *c0 + *n). */
static void row_piece(int i, int P, int K, int *t, int *c0, int *n) {
    const int p = i % P, a = P == 1 ? 0 : 64 * (K / 64 * p / P), b = P == 1 ? K : 64 * (K / 64 * (p + 1) / P);
    *t = i / P;
    *c0 = a;
    *n = b - a;
}

/* v = v cos + roll(v, d/2) sin (sin signed); two loops without the index's modulo, so they vectorize. */
static void rope(float *v, const float *cos, const float *sin, int d) {
    float tmp[512];
    const int half = d / 2;
    for (int k = 0; k < half; k++) tmp[k] = v[k] * cos[k] + v[k + half] * sin[k];
    for (int k = half; k < d; k++) tmp[k] = v[k] * cos[k] + v[k - half] * sin[k];
    memcpy(v, tmp, sizeof(float) * d);
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

/* a[i] = silu(g[i]) * u[i] for one token row; on x86 8 at a time with exp256 (arguments clamped to <= 88, where
 * exp still fits a float; below -87 it is 0 as expf's). Each element's value depends on its index only. */
static void silu_mul_row(const float *g, const float *u, int n, float *a) {
    int i = 0;
#if defined(MH_ISA_X86)
    const __m256 one = _mm256_set1_ps(1.0f), hi = _mm256_set1_ps(88.0f);
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), hi));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) a[i] = silu(g[i]) * u[i];
}

/* Token rows of x normed by ln into xn and prepared as the input of a product (`forms`): row i of xn is row src[i]
 * of x (src NULL: row i). Call from every thread; sets the thread's view of the product's input. */
static void norm_into_act(mh_act *act, const mh_model *m, const float *x, const float *ln, int rows,
                          const int32_t *src, float *xn, int forms) {
    const int h = m->hidden, P = row_pieces(rows, h);
#pragma omp for schedule(static)
    for (int i = 0; i < rows * P; i++) { /* each piece takes the whole row's sum of squares, in the row's order */
        int t, c0, n;
        row_piece(i, P, h, &t, &c0, &n);
        const float *xr = x + (size_t)(src ? src[t] : t) * h;
        const float r = rms_inv(xr, h, m->eps);
        float *out = xn + (size_t)t * h;
        for (int k = c0; k < c0 + n; k++) out[k] = xr[k] * r * ln[k];
        prep_token_cols(act, t, out + c0, h, c0, n, forms);
    }
    act->T = rows;
    act->K = h;
    act_view(act, xn, h, forms);
}

/* SiLU(gate) times up for token rows of gu [rows, 2 I] (gate, then up) into a [rows, I], prepared as the next
 * product's input (`forms`), in column pieces (row_pieces). Call from every thread; sets the thread's view. */
static void silu_into_act(mh_act *act, const float *gu, int rows, int I, float *a, int forms) {
    const int P = row_pieces(rows, I);
#pragma omp for schedule(static)
    for (int i = 0; i < rows * P; i++) {
        int t, c0, n;
        row_piece(i, P, I, &t, &c0, &n);
        const float *g = gu + (size_t)t * 2 * I;
        float *out = a + (size_t)t * I;
        silu_mul_row(g + c0, g + I + c0, n, out + c0);
        prep_token_cols(act, t, out + c0, I, c0, n, forms);
    }
    act->T = rows;
    act->K = I;
    act_view(act, a, I, forms);
}

#endif
