/* The per-token-row operations of a layer between its products: RMSNorm, RoPE, SiLU times up, and a norm written
 * straight into a product's prepared input (norm_into_act). Each row's result depends on that row only (the
 * batch-invariance the products keep, mh_matmul.h). Knows nothing of weights' formats, pages or threads' split
 * beyond the OpenMP loop in norm_into_act. */
#ifndef MH_TOKEN_OPS_H
#define MH_TOKEN_OPS_H
#include "mh_matmul.h"
#include "mh_attention.h"

static void rms_norm_row(const float *x, const float *w, int h, float eps, float *out) {
    float ss = 0.0f;
    for (int k = 0; k < h; k++) ss += x[k] * x[k];
    const float r = 1.0f / sqrtf(ss / h + eps);
    for (int k = 0; k < h; k++) out[k] = x[k] * r * w[k];
}

static void rope(float *v, const float *cos, const float *sin, int d) {
    float tmp[512];
    const int half = d / 2;
    for (int k = 0; k < d; k++) tmp[k] = v[k] * cos[k] + v[(k + half) % d] * sin[k];
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
    const int h = m->hidden;
#pragma omp for schedule(static)
    for (int i = 0; i < rows; i++) {
        rms_norm_row(x + (size_t)(src ? src[i] : i) * h, ln, h, m->eps, xn + (size_t)i * h);
        prep_token(act, i, xn + (size_t)i * h, h, forms);
    }
    act->T = rows;
    act->K = h;
    act->x = xn;
    act->ldx = h;
    act->forms = forms;
}

#endif
