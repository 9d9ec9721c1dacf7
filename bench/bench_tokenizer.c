// bench/bench_tokenizer.c: tok_encode throughput on one thread.
//
//   bench_tokenizer TOKENIZER.json|.gguf TEXTFILE [iters] [--ids PREFIX]
//
// Encodes the whole file as one string, then line by line (each line with
// its "\n", as Python's splitlines(keepends=True) cuts a file of \n lines),
// iters times each (allow_special = false: a benchmark text is user text),
// and prints one JSON object: bytes, tokens, load time, and per mode the
// median time, MB/s and tokens/s. With --ids, writes the ids of both modes
// as little-endian int32 to PREFIX.whole.i32 and PREFIX.lines.i32, for
// bench/bench_tokenizer.py to compare with HF.
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "data/data.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int write_ids(const char *prefix, const char *mode, const int32_t *ids, int64_t n) {
    char path[4096];
    snprintf(path, sizeof path, "%s.%s.i32", prefix, mode);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(ids, sizeof *ids, (size_t)n, f) != (size_t)n || fclose(f)) {
        fprintf(stderr, "error: cannot write %s\n", path);
        return -1;
    }
    return 0;
}

// One pass over the text, whole or line by line; the ids of all pieces go to *all.
static int encode_pass(const tok_tokenizer *t, const char *text, size_t size, bool lines, int32_t **all,
                       int64_t *n_all, q_err *err) {
    int64_t n = 0, cap = 0;
    int32_t *out = NULL;
    for (size_t pos = 0; pos < size || (!lines && pos == 0);) {
        size_t len = size - pos;
        if (lines) {
            const char *nl = memchr(text + pos, '\n', len);
            if (nl) len = (size_t)(nl - (text + pos)) + 1;
        }
        int32_t *ids;
        int64_t k;
        if (tok_encode(t, text + pos, len, false, &ids, &k, err)) {
            free(out);
            return -1;
        }
        if (n + k > cap) {
            cap = 2 * (n + k) + 1024;
            int32_t *p = realloc(out, (size_t)cap * sizeof *p);
            if (!p) {
                free(ids);
                free(out);
                return -1;
            }
            out = p;
        }
        memcpy(out + n, ids, (size_t)k * sizeof *ids);
        n += k;
        free(ids);
        pos += len;
        if (!len) break;
    }
    *all = out;
    *n_all = n;
    return 0;
}

int main(int argc, char **argv) {
    const char *ids_prefix = NULL, *pos[3] = {NULL, NULL, NULL};
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ids") && i + 1 < argc) ids_prefix = argv[++i];
        else if (npos < 3) pos[npos++] = argv[i];
    }
    if (npos < 2) {
        fprintf(stderr, "usage: bench_tokenizer TOKENIZER.json|.gguf TEXTFILE [iters] [--ids PREFIX]\n");
        return 2;
    }
    const int iters = pos[2] ? atoi(pos[2]) : 5;
    if (iters < 1) {
        fprintf(stderr, "error: iters must be at least 1\n");
        return 2;
    }
    q_err err;
    char *text;
    size_t size;
    if (q_file_read(pos[1], &text, &size, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    tok_tokenizer *t = NULL;
    double t0 = now_s();
    size_t plen = strlen(pos[0]);
    if (plen > 5 && !strcmp(pos[0] + plen - 5, ".gguf")) {
        q_gguf g;
        if (q_gguf_open(&g, pos[0], &err) == 0) {
            int rc = tok_load_gguf(&t, &g, &err);
            q_gguf_close(&g);
            if (rc) t = NULL;
        }
    } else if (tok_load_json(&t, pos[0], &err)) {
        t = NULL;
    }
    if (!t) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    const double load_s = now_s() - t0;

    printf("{\"tokenizer\": \"%s\", \"file\": \"%s\", \"bytes\": %zu, \"iters\": %d, \"threads\": 1, "
           "\"load_s\": %.4f",
           pos[0], pos[1], size, iters, load_s);
    double *ts = malloc((size_t)iters * sizeof *ts);
    for (int mode = 0; mode < 2; mode++) {
        int32_t *ids = NULL;
        int64_t n = 0;
        for (int i = 0; i < iters; i++) {
            free(ids);
            double s = now_s();
            if (encode_pass(t, text, size, mode == 1, &ids, &n, &err)) {
                fprintf(stderr, "\nerror: %s\n", err.msg);
                return 1;
            }
            ts[i] = now_s() - s;
        }
        qsort(ts, (size_t)iters, sizeof *ts, cmp_double);
        const double med = ts[iters / 2];
        printf(", \"%s\": {\"tokens\": %lld, \"median_s\": %.5f, \"MB_per_s\": %.2f, \"tokens_per_s\": %.0f}",
               mode ? "lines" : "whole", (long long)n, med, size / med / 1e6, n / med);
        if (ids_prefix && write_ids(ids_prefix, mode ? "lines" : "whole", ids, n)) return 1;
        free(ids);
    }
    printf("}\n");
    free(ts);
    free(text);
    tok_free(t);
    return 0;
}
