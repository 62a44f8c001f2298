/* Test driver for a kernel build on another architecture (run under qemu-user): the build's matrix product and
 * row dequantization on inputs from stdin. stdin: int32 mode (0 product, 1 dequantize), format, rows, cols, T;
 * int64 row_bytes; the matrix's bytes; for a product, T x cols float32. stdout: T x rows (product) or
 * rows x cols (dequantize) float32. */
#include <stdio.h>
#include "cpu_decode.c"

static void read_all(void *p, size_t n) {
    if (fread(p, 1, n, stdin) != n) { fprintf(stderr, "short input\n"); exit(2); }
}

int main(void) {
    int32_t head[5];
    int64_t row_bytes;
    read_all(head, sizeof head);
    read_all(&row_bytes, sizeof row_bytes);
    const int mode = head[0], rows = head[2], cols = head[3], T = head[4];
    uint8_t *data = malloc((size_t)rows * row_bytes);
    read_all(data, (size_t)rows * row_bytes);
    mh_matrix W = {data, head[1], rows, cols, row_bytes};
    fprintf(stderr, "isa %s\n", mh_isa());
    if (mode == 0) {
        float *x = malloc(sizeof(float) * T * cols), *out = malloc(sizeof(float) * T * rows);
        read_all(x, sizeof(float) * T * cols);
        if (mh_matmul_test(&W, x, T, out, 1, 1) != 0) return 3;
        fwrite(out, sizeof(float), (size_t)T * rows, stdout);
    } else {
        float *out = malloc(sizeof(float) * cols);
        for (int r = 0; r < rows; r++) {
            mh_dequant_row(&W, r, out);
            fwrite(out, sizeof(float), cols, stdout);
        }
    }
    return 0;
}
