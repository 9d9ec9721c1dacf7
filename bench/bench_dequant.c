// bench/bench_dequant.c: CPU dequantization throughput of one bnb-4bit weight.
// Reads a weight stored under the name "w" in bnb-4bit layout (written by
// bench/bench_dequant.py from bitsandbytes' own quantization), checks that
// qlora's output equals bitsandbytes' ("ref", when present) bit for bit, then
// times nf4_dequantize and prints one JSON line per output dtype.
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "train/train.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: bench_dequant FILE.safetensors [iters]\n");
        return 2;
    }
    const int iters = argc > 2 ? atoi(argv[2]) : 20;
    q_err err;
    q_st_model m;
    nf4_tensor t;
    if (q_st_model_open(&m, argv[1], &err) || bnb4_load(&m, "w", &t, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    const q_st_tensor *ref = q_st_model_find(&m, "ref");
    nf4_view v = nf4_tensor_view(&t);
    const q_dtype outs[2] = {t.dtype, Q_DTYPE_F32};
    for (int o = 0; o < (t.dtype == Q_DTYPE_F32 ? 1 : 2); o++) {
        const size_t bytes = (size_t)t.numel * q_dtype_size(outs[o]);
        void *out = malloc(bytes);
        if (nf4_dequantize(&v, out, outs[o], &err)) {  // warm-up, and the correctness check
            fprintf(stderr, "error: %s\n", err.msg);
            return 1;
        }
        int exact = -1;  // unknown
        if (ref && ref->dtype == outs[o]) exact = ref->nbytes == bytes && memcmp(ref->data, out, bytes) == 0;
        double *ts = malloc(iters * sizeof *ts);
        for (int i = 0; i < iters; i++) {
            double t0 = now_s();
            nf4_dequantize(&v, out, outs[o], &err);
            ts[i] = now_s() - t0;
        }
        qsort(ts, iters, sizeof *ts, cmp_double);
        printf("{\"impl\": \"qlora\", \"out_dtype\": \"%s\", \"numel\": %lld, \"median_s\": %.6f, "
               "\"gbps\": %.3f, \"bit_exact_vs_bnb\": %s}\n",
               q_dtype_torch_name(outs[o]), (long long)t.numel, ts[iters / 2], bytes / ts[iters / 2] / 1e9,
               exact < 0 ? "null" : exact ? "true" : "false");
        free(ts);
        free(out);
    }
    nf4_tensor_free(&t);
    q_st_model_close(&m);
    return 0;
}
