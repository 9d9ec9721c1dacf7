// tests/fuzz/fuzz_gguf.c: libFuzzer target for the GGUF reader. Whatever the
// bytes, q_gguf_open_memory must either fail with a message naming the file
// or hand back metadata and tensors that lie inside the input: every string
// of every string array is walked, and every readable tensor's bytes are
// dequantized (ASan checks the reads; the input is a private heap copy).
//
//   CC=clang cmake -S . -B build-fuzz -DQLORA_CUDA=OFF -DQLORA_FUZZ=ON
//   cmake --build build-fuzz --target fuzz_gguf
//   mkdir -p /tmp/gcorpus && cp tests/fixtures/gguf/types.gguf /tmp/gcorpus/ &&
//     ./build-fuzz/fuzz_gguf -max_total_time=60 /tmp/gcorpus
#include <stdio.h>
#include <stdlib.h>

#include "core/core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    q_err err;
    q_gguf g;
    if (q_gguf_open_memory(&g, copy, size, "fuzz", &err) == 0) {
        for (size_t i = 0; i < g.n_kv; i++) {
            const q_gguf_kv *kv = &g.kv[i];
            if (q_gguf_find_kv(&g, kv->key) == NULL) abort();
            if (kv->type == Q_GGUF_ARRAY && kv->elem_type == Q_GGUF_STRING) {
                q_gguf_string_iter it;
                const char *s;
                size_t len;
                unsigned sum = 0;
                q_gguf_string_iter_init(&it, kv);
                while (q_gguf_string_iter_next(&it, &s, &len))
                    for (size_t k = 0; k < len; k++) sum += (unsigned char)s[k];  // every byte inside the input
                volatile unsigned sink = sum;
                (void)sink;
            }
        }
        for (size_t i = 0; i < g.n_tensors; i++) {
            const q_gguf_tensor *t = &g.tensors[i];
            int64_t block, bytes;
            if (!q_gguf_type_info(t->type, &block, &bytes) || t->numel > (1 << 20)) continue;
            float *out = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *out);
            if (out && q_gguf_dequantize(t->type, t->data, t->numel, out, &err) != 0 && !err.msg[0]) abort();
            free(out);
        }
        q_gguf_close(&g);
    } else if (strncmp(err.msg, "fuzz: ", 6) != 0) {
        abort();  // every error names the file
    }
    free(copy);
    return 0;
}
