/* Decode attention alone, on one thread or several side by side (bench/attention_alone.py builds and runs it): one
 * token's context of `ctx` keys in every layer, chunk by chunk as a decode step's tasks take it, by the kernel's own
 * task functions (attend_part_allkv where the build gives a lone token's chunk every KV head, else attend_part_avx2
 * per KV head), each task fetching the next one's first keys as att_task has it. Beside it, plain loads of the same
 * K/V bytes in the same order: what the pattern alone reads at. Pages lie in the arena in a shuffled order.
 *   cold: `seqs` sequences visited in turn, their K/V (seqs x layers x ctx x 2 KV d x 2 bytes) larger than the caches;
 *   hot: one layer's keys of a sequence attended `layers` times (in L2 or L3 by the second time).
 *   threads > 1: as many threads at once (OpenMP), each on its own sequences (cold: sequence r, r + threads, ...;
 *   hot: sequence r's), as a decode step's threads attend side by side; the time a key is the wall time over the
 *   keys each thread attends.
 * argv: layers heads kv_heads head_dim page_bytes ctx seqs reps int8 threads. stdout: "<case> <ns per key>" per
 * case, a key being one key's K and V rows for every KV head; the fastest of `reps`. int8 1: the int8 K/V cache
 * (mh_attention_int8.h; AVX-512 BF16 builds: each task's rows turned into bfloat16 ones, kv8_turn_keys; the others:
 * attend_part_int8_x86; the same split) instead of bfloat16. x86 builds only. */
#include <stdio.h>
#include <time.h>
#include "cpu_decode.c"

#if defined(MH_ISA_X86)
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define BENCH_MAX_KV 64
#define BENCH_MAX_THREADS 64
typedef struct {
    const mh_model *m;
    mh_step *s;
    const int32_t *tables; /* [seqs, pages per sequence] */
    int pps, ctx, seqs, hot, first, step; /* this thread's sequences: first, first + step, ... < seqs */
    uint16_t *kv8; /* AVX-512 BF16 builds: the int8 cache's task rows in bfloat16 (a chunk, every KV head) */
} bench_case;

typedef struct { /* one thread's step and scratch */
    mh_step s;
    int32_t seq_of, pos;
    float *q, *sc, *qf, *out;
    uint16_t *kv8;
} bench_thread;

/* The chunks (tasks per KV head) of a lone token's context of ctx keys. */
static int context_chunks(int ctx) { return (ctx + att_chunk(ctx) - 1) / att_chunk(ctx); }

/* One token's attention over its whole context in layer l, task by task as one thread runs them (every chunk; every
 * KV head, innermost), each fetching its next task's first keys (task_first_rows, as att_task); a sum of outputs. */
static float attend_context(const bench_case *b, int l, float *q, float *sc, float *qf, float *out) {
    const mh_model *m = b->m;
    const int KV = m->kv_heads, G = m->heads / KV, d = m->head_dim, nch = context_chunks(b->ctx);
    float *o[BENCH_MAX_KV], *mx[BENCH_MAX_KV], *sm[BENCH_MAX_KV];
    for (int h = 0; h < KV; h++) o[h] = out + (size_t)h * G * (d + 2), mx[h] = o[h] + G * d, sm[h] = mx[h] + G;
    float sum = 0.0f;
    for (int c = 0; c < nch; c++) {
        const mh_att_task k = {0, 1, c}, after = {0, 1, c + 1};
        int j0, n;
        const int ch = att_task_keys(m, b->s, k, &j0, &n);
#if !defined(MH_ATT_BF16)
        if (m->kv_int8) {
            if (att_allkv_fits(m))
                attend_part_int8_x86(m, b->s, l, 0, 0, KV, q, j0, j0 + n - 1, sc, ch, o, mx, sm);
            else
                for (int h = 0; h < KV; h++)
                    attend_part_int8_x86(m, b->s, l, 0, h, 1, q + (size_t)h * G * d, j0, j0 + n - 1, sc, ch, &o[h],
                                         &mx[h], &sm[h]);
            sum += o[0][0];
            continue;
        }
#endif
        const uint16_t *next[MH_KEYS_AHEAD]; /* (not with the int8 cache: its rows are read as they are turned) */
        if (att_allkv_fits(m)) {
            const int na =
                c + 1 < nch && !m->kv_int8 ? task_first_rows(m, b->s, l, after, 0, att_allkv_next(m), next) : 0;
            attend_part_allkv(m, b->s, l, 0, q, j0, j0 + n - 1, sc, ch, qf, o, mx, sm, next, na, b->kv8);
            sum += o[0][0];
            continue;
        }
        for (int h = 0; h < KV; h++) {
            const int na = m->kv_int8   ? 0
                           : h + 1 < KV  ? task_first_rows(m, b->s, l, k, h + 1, MH_KEYS_AHEAD, next)
                           : c + 1 < nch ? task_first_rows(m, b->s, l, after, 0, MH_KEYS_AHEAD, next)
                                         : 0;
            attend_part_avx2(m, b->s, l, 0, h, q + (size_t)h * G * d, j0, j0 + n - 1, sc, ch, o[h], mx[h], sm[h], next,
                             na, b->kv8);
            sum += o[h][0];
        }
    }
    return sum;
}

/* Plain loads of the K and V rows attend_context reads, in its order (a chunk's keys, then its values). */
static uint64_t read_context(const bench_case *b, int l) {
    const mh_model *m = b->m;
    const int nch = context_chunks(b->ctx), words = m->kv_heads * m->head_dim / (m->kv_int8 ? 8 : 4);
    uint64_t sum = 0;
    for (int c = 0; c < nch; c++) {
        int j0, n;
        att_task_keys(m, b->s, (mh_att_task){0, 1, c}, &j0, &n);
        if (m->kv_int8) { /* the int8 rows and their scales */
            const int8_t *rows[n];
            const float *scs[n];
            kv8_rows(m, b->s, l, 0, 0, j0, n, rows, scs);
            for (int part = 0; part < 2; part++)
                for (int j = 0; j < n; j++) {
                    const uint64_t *r = (const uint64_t *)(rows[j] + (part ? m->kv_stride : 0));
                    for (int w = 0; w < words; w++) sum += r[w];
                    const uint32_t *f = (const uint32_t *)(scs[j] + (part ? m->kv_stride / 32 : 0));
                    for (int w = 0; w < m->kv_heads * m->head_dim / 32; w++) sum += f[w];
                }
            continue;
        }
        const uint16_t *kp[n];
        key_rows(m, b->s, l, 0, 0, j0, n, kp);
        for (int part = 0; part < 2; part++)
            for (int j = 0; j < n; j++) {
                const uint64_t *r = (const uint64_t *)(kp[j] + (part ? m->kv_stride : 0));
                for (int w = 0; w < words; w++) sum += r[w];
            }
    }
    return sum;
}

/* One thread's pass over its sequences of the case (attention, or plain reads): keys attended. */
static double run_thread(const bench_case *b, const bench_thread *w, int reads, double *sink) {
    const int L = b->m->num_layers;
    double keys = 0.0;
    for (int sq = b->first; sq < b->seqs; sq += b->step) {
        b->s->block_tables = b->tables + (size_t)sq * b->pps;
        for (int i = 0; i < L; i++) {
            const int l = b->hot ? 0 : i;
            *sink += reads ? (double)(read_context(b, l) & 1) : attend_context(b, l, w->q, w->sc, w->qf, w->out);
        }
        keys += (double)L * b->ctx;
    }
    return keys;
}

/* Seconds per key of one pass of `nt` threads at once over the case (each its share of the sequences): the wall
 * time over the keys of the thread with the most. */
static double run_case(const bench_case *proto, int nt, bench_thread *th, int reads, double *sink) {
    double most = 0.0, sum = 0.0, t0 = 0.0;
#pragma omp parallel num_threads(nt) reduction(+ : sum) reduction(max : most)
    {
        const int r = omp_get_thread_num();
        bench_thread *w = &th[r];
        bench_case b = *proto;
        b.s = &w->s, b.kv8 = w->kv8, b.first = r, b.step = nt;
#pragma omp barrier
#pragma omp single
        t0 = now_s();
        const double keys = run_thread(&b, w, reads, &sum);
        most = keys > most ? keys : most;
    }
    *sink += sum;
    return (now_s() - t0) / most;
}
#endif

int main(int argc, char **argv) {
    if (argc != 11) {
        fprintf(stderr, "usage: attention_alone layers heads kv_heads head_dim page_bytes ctx seqs reps int8 "
                        "threads\n");
        return 2;
    }
#if !defined(MH_ISA_X86)
    (void)argv;
    fprintf(stderr, "attention_alone: the %s build has no x86 attention tasks to time\n", mh_isa());
    return 2;
#else
    const int L = atoi(argv[1]), H = atoi(argv[2]), KV = atoi(argv[3]), d = atoi(argv[4]), page_bytes = atoi(argv[5]);
    const int ctx = atoi(argv[6]), seqs = atoi(argv[7]), reps = atoi(argv[8]), int8 = atoi(argv[9]) != 0;
    const int nt = atoi(argv[10]);
    const int tpp = int8 ? page_bytes / (2 * L * KV * d / 32 * 36) : page_bytes / (4 * L * KV * d);
    if (L < 1 || H < 1 || KV < 1 || H % KV || H / KV > MH_GROUP_MAX || d < 8 || d % 8 || d > MH_GROUP_DIM ||
        KV > BENCH_MAX_KV || tpp < 1 || ctx < 1 || seqs < nt || reps < 1 || (int8 && d % 32) || nt < 1 ||
        nt > BENCH_MAX_THREADS) {
        fprintf(stderr, "attention_alone: a shape or count out of range\n");
        return 2;
    }
    const int pps = (ctx + tpp - 1) / tpp, P = pps * seqs;
    uint16_t *cache = alloc64((size_t)P * page_bytes);
    int32_t *tables = malloc(sizeof(int32_t) * P);
    bench_thread th[BENCH_MAX_THREADS];
    for (int r = 0; r < nt; r++) { /* each thread's queries, scratch and step (the sequence's pos: ctx - 1) */
        bench_thread *w = &th[r];
        w->q = alloc64(sizeof(float) * H * d), w->qf = alloc64(sizeof(float) * KV * queries_kvh_floats(H / KV, d));
        w->sc = alloc64(sizeof(float) * H * (size_t)att_chunk(ctx)), w->out = alloc64(sizeof(float) * H * (d + 2));
        w->kv8 = alloc64(sizeof(uint16_t) * 2 * (size_t)att_chunk(ctx) * KV * d); /* a chunk's K and V rows */
        if (!w->q || !w->qf || !w->sc || !w->out || !w->kv8) {
            fprintf(stderr, "attention_alone: out of memory\n");
            return 3;
        }
        for (int i = 0; i < H * d; i++) w->q[i] = (float)((i * 37) % 17 - 8) / 8.0f;
        w->seq_of = 0, w->pos = ctx - 1;
        memset(&w->s, 0, sizeof w->s);
        w->s.T = 1, w->s.S = 1, w->s.max_pages = pps, w->s.seq_of = &w->seq_of, w->s.pos = &w->pos;
    }
    if (!cache || !tables) {
        fprintf(stderr, "attention_alone: out of memory\n");
        return 3;
    }
    uint32_t x = 12345u; /* bfloat16 values of magnitude [0.5, 2), either sign: no subnormals, no infinities */
    for (size_t i = 0; i < (size_t)P * page_bytes / 2; i++) {
        x = x * 1664525u + 1013904223u;
        cache[i] = (uint16_t)(0x3f00u | (x >> 24) | ((x >> 8) & 0x8000u));
    }
    for (int i = 0; i < P; i++) tables[i] = i;
    for (int i = P - 1; i > 0; i--) { /* the pages shuffled: a sequence's pages scattered in the arena */
        x = x * 1664525u + 1013904223u;
        const int j = (int)((x >> 8) % (uint32_t)(i + 1)), t = tables[i];
        tables[i] = tables[j], tables[j] = t;
    }
    mh_model m = {0};
    m.num_layers = L, m.heads = H, m.kv_heads = KV, m.head_dim = d, m.tokens_per_page = tpp, m.cache = cache;
    m.page_stride = page_bytes / 2, m.kv_stride = (int64_t)L * tpp * KV * d, m.layer_stride = (int64_t)tpp * KV * d;
    m.num_pages = P;
    if (int8) { /* strides in bytes; the scales after the int8 values, of magnitude [0.5, 2) / 127 like the values */
        m.kv_int8 = 1, m.page_stride = page_bytes, m.kv_scales = (int64_t)tpp * 2 * L * KV * d;
        for (int p = 0; p < P; p++) {
            float *f = (float *)((int8_t *)cache + (size_t)p * page_bytes + m.kv_scales);
            for (int64_t i = 0; i < m.kv_scales / 32; i++) f[i] = (1.0f + (float)(i % 7) / 7.0f) / 127.0f;
        }
    }
    const char *names[4] = {"attention-cold", "reads-cold", "attention-hot", "reads-hot"};
    double sink = 0.0;
    for (int c = 0; c < 4; c++) {
        const int hot = c >= 2;
        const bench_case b = {&m, NULL, tables, pps, ctx, hot ? nt : seqs, hot, 0, 1, NULL};
        double best = 1e30;
        for (int r = 0; r < reps + hot; r++) { /* hot: one more, the first filling the caches */
            const double t = run_case(&b, nt, th, c % 2, &sink);
            if (r >= hot && t < best) best = t;
        }
        printf("%s %.2f\n", names[c], best * 1e9);
    }
    fprintf(stderr, "isa %s, %s K/V, %d tokens a page, %s, %d thread(s), checksum %g\n", mh_isa(),
            int8 ? "int8" : "bfloat16", tpp, att_allkv_fits(&m) ? "a chunk's every KV head in one task" :
            "a task per KV head", nt, sink);
    return 0;
#endif
}
