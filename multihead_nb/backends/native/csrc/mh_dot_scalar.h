/* Scalar tile kernels (no intrinsics): the build for CPUs without AVX2 or NEON, and the plainest statement of what
 * the x86 kernels compute. Quantized blocks are dequantized through unpack32 (mh_formats.h) and multiplied with the
 * float32 activations; rows are summed in 8 interleaved partial sums (a fixed order, so a token's result never
 * depends on its batch-mates). */
#ifndef MH_DOT_SCALAR_H
#define MH_DOT_SCALAR_H

#define MH_F_CHUNK 1
#define MH_NR 1
#define MH_MT 4

static inline void tile_shape(int fmt, int T, int *nr, int *mt) {
    (void)fmt;
    (void)T;
    *nr = 1;
    *mt = 4;
}

static void tile(int fmt, const uint8_t *w, int64_t rb, int nr, const mh_act *a, int t0, int mt, float *res) {
    const int K = a->K, nb = K / 32;
    for (int r = 0; r < nr; r++) {
        const uint8_t *row = w + (size_t)r * rb;
        if (fmt == MH_BF16) {
            for (int t = 0; t < mt; t++) {
                const float *x = a->f + (size_t)(t0 + t) * K;
                float part[8] = {0};
                int k = 0;
                for (; k + 8 <= K; k += 8)
                    for (int i = 0; i < 8; i++) part[i] += bf16_to_f32(rd16(row + 2 * (size_t)(k + i))) * x[k + i];
                float s = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
                for (; k < K; k++) s += bf16_to_f32(rd16(row + 2 * (size_t)k)) * x[k];
                res[r * mt + t] = s;
            }
            continue;
        }
        float part[MH_MT][8] = {{0}};
        for (int b = 0; b < nb; b++) {
            uint8_t u[32];
            float dw, off[2], wv[32];
            int sc[2];
            unpack32(fmt, row, b, u, &dw, sc, off);
            for (int i = 0; i < 32; i++)
                wv[i] = dw * (float)sc[i / 16] * (float)(fmt == MH_Q8_0 ? (int8_t)u[i] : u[i]) + off[i / 16];
            for (int t = 0; t < mt; t++) {
                const float *x = a->x + (size_t)(t0 + t) * a->ldx + 32 * (size_t)b;
                for (int i = 0; i < 32; i++) part[t][i % 8] += wv[i] * x[i];
            }
        }
        for (int t = 0; t < mt; t++) res[r * mt + t] =
            ((part[t][0] + part[t][4]) + (part[t][1] + part[t][5])) + ((part[t][2] + part[t][6]) + (part[t][3] + part[t][7]));
    }
}

#endif
