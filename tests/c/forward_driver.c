/* Test driver for a whole forward of a kernel build on another architecture (run under qemu-user): a model from
 * stdin, then forwards of one sequence on pages 0, 1, ... of an arena of its own; each forward's last-token logits
 * to stdout.
 * stdin, little-endian:
 *   int32 num_layers, hidden, heads, kv_heads, head_dim, inter, vocab, tokens_per_page, sliding_window, pages,
 *   kv_int8 (1: the int8 K/V cache, mh_attention_int8.h's page layout);
 *   float32 eps;
 *   matrices (int32 format, rows, cols; int64 row_bytes; rows x row_bytes bytes): embed, lm_head;
 *   vectors (int32 n; n float32; n = 0 for none): final_norm;
 *   per layer: ln1, ln2 (vectors), q, k, v (matrices), bqkv, q_norm, k_norm (vectors), o (matrix), bo (vector),
 *   gate, up, down (matrices);
 *   int32 forwards; per forward: int32 T; T int64 token ids; T int32 positions; T x head_dim float32 cos, then sin.
 * Each forward on 2 threads. stdout: per forward, vocab float32 (the logits of its last token).
 * stderr: "isa <build>". */
#include <stdio.h>
#include "cpu_decode.c"

static void read_all(void *p, size_t n) {
    if (n && fread(p, 1, n, stdin) != n) { fprintf(stderr, "short input\n"); exit(2); }
}

static void *read_new(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(3); }
    read_all(p, n);
    return p;
}

static mh_matrix read_matrix(void) {
    int32_t head[3];
    int64_t row_bytes;
    read_all(head, sizeof head);
    read_all(&row_bytes, sizeof row_bytes);
    mh_matrix W = {read_new((size_t)head[1] * row_bytes), head[0], head[1], head[2], row_bytes};
    return W;
}

static const float *read_vector(void) {
    int32_t n;
    read_all(&n, sizeof n);
    return n ? read_new(sizeof(float) * n) : NULL;
}

int main(void) {
    int32_t c[11];
    float eps;
    read_all(c, sizeof c);
    read_all(&eps, sizeof eps);
    const int kv_int8 = c[10];
    const int NL = c[0], KV = c[3], d = c[4], V = c[6], tpp = c[7], pages = c[9];
    mh_model m = {NL, c[1], c[2], KV, d, c[5], V, eps, tpp, c[8], NULL, {0}, {0}, NULL, NULL, 0, 0, 0, 1, pages};
    m.embed = read_matrix();
    m.lm_head = read_matrix();
    m.final_norm = read_vector();
    mh_layer *layers = calloc(NL, sizeof(mh_layer));
    for (int l = 0; l < NL; l++) {
        mh_layer *L = &layers[l];
        L->ln1 = read_vector(), L->ln2 = read_vector();
        L->q = read_matrix(), L->k = read_matrix(), L->v = read_matrix();
        L->bqkv = read_vector(), L->q_norm = read_vector(), L->k_norm = read_vector();
        L->o = read_matrix();
        L->bo = read_vector();
        L->gate = read_matrix(), L->up = read_matrix(), L->down = read_matrix();
    }
    m.layers = layers;
    /* a page: each layer's keys of tpp tokens, then each layer's values (as the arena's layout) */
    m.layer_stride = (int64_t)tpp * KV * d;
    m.kv_stride = NL * m.layer_stride;
    m.page_stride = 2 * m.kv_stride;
    if (kv_int8) { /* strides in bytes; a float32 scale per 32 values after them, in the same order */
        m.kv_int8 = 1, m.kv_scales = m.page_stride;
        m.page_stride += m.page_stride / 32 * 4;
    }
    const size_t elements = kv_int8 ? ((size_t)pages * m.page_stride + 1) / 2 : (size_t)pages * m.page_stride;
    m.cache = calloc(elements, sizeof(uint16_t)); /* page_stride counts bytes with the int8 cache */
    int32_t *table = malloc(sizeof(int32_t) * pages);
    for (int p = 0; p < pages; p++) table[p] = p;
    fprintf(stderr, "isa %s\n", mh_isa());

    int32_t forwards;
    read_all(&forwards, sizeof forwards);
    float *logits = malloc(sizeof(float) * V);
    for (int f = 0; f < forwards; f++) {
        int32_t T;
        read_all(&T, sizeof T);
        int64_t *ids = read_new(sizeof(int64_t) * T);
        int32_t *pos = read_new(sizeof(int32_t) * T), *seq_of = calloc(T, sizeof(int32_t));
        float *cs = read_new(sizeof(float) * T * d), *sn = read_new(sizeof(float) * T * d);
        int max_ctx = 0;
        for (int t = 0; t < T; t++) max_ctx = pos[t] + 1 > max_ctx ? pos[t] + 1 : max_ctx;
        const int max_pages = (max_ctx + tpp - 1) / tpp;
        if (max_pages > pages) { fprintf(stderr, "context past the arena's pages\n"); return 4; }
        int32_t last = T - 1;
        float *cos = calloc((size_t)max_ctx * d, sizeof(float)), *sin = calloc((size_t)max_ctx * d, sizeof(float));
        for (int t = 0; t < T; t++) { /* the rotary tables by position */
            memcpy(cos + (size_t)pos[t] * d, cs + (size_t)t * d, sizeof(float) * d);
            memcpy(sin + (size_t)pos[t] * d, sn + (size_t)t * d, sizeof(float) * d);
        }
        mh_step s = {T, 1, max_pages, max_ctx, 2, 1, ids, seq_of, pos, table, cos, sin, &last, logits, &max_ctx,
                     max_ctx};
        const int rc = mh_forward(&m, &s);
        if (rc != 0) { fprintf(stderr, "mh_forward: %d\n", rc); return 5; }
        fwrite(logits, sizeof(float), V, stdout);
        free(ids), free(pos), free(seq_of), free(cs), free(sn), free(cos), free(sin);
    }
    return 0;
}
