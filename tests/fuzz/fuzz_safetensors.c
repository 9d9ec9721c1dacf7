// tests/fuzz/fuzz_safetensors.c: libFuzzer target for the safetensors reader
// and the JSON parser. Whatever the bytes, q_st_open_memory must either fail
// with a message or hand back tensors whose every byte lies inside the input
// (ASan checks the reads below), and q_json_parse must never read past len.
//
//   CC=clang cmake -S . -B build-fuzz -DQLORA_CUDA=OFF -DQLORA_FUZZ=ON
//   cmake --build build-fuzz --target fuzz_safetensors
//   cp -r tests/fuzz/corpus /tmp/corpus &&
//     ./build-fuzz/fuzz_safetensors -dict=tests/fuzz/safetensors.dict -max_total_time=60 /tmp/corpus
#include <stdio.h>
#include <stdlib.h>

#include "core/core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    // a private copy of exactly size bytes, so ASan flags any read past the end
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);

    q_err err;
    q_st_file f;
    if (q_st_open_memory(&f, copy, size, "fuzz", &err) == 0) {
        unsigned sum = 0;
        for (size_t i = 0; i < f.n_tensors; i++) {
            const q_st_tensor *t = &f.tensors[i];
            const uint8_t *p = t->data;
            for (size_t j = 0; j < t->nbytes; j++) sum += p[j];
            if (q_st_find(&f, t->name) != t) abort();  // names are unique and sorted
        }
        for (size_t i = 0; i < f.n_meta; i++)
            if (!q_st_meta(&f, f.meta_keys[i])) abort();
        volatile unsigned sink = sum;
        (void)sink;
        q_st_close(&f);
    } else if (strncmp(err.msg, "fuzz: ", 6) != 0) {
        abort();  // every error names the file
    }

    q_json *v = NULL;
    if (q_json_parse((const char *)copy, size, &v, &err) == 0) q_json_free(v);
    else if (strncmp(err.msg, "line ", 5) != 0) abort();
    free(copy);
    return 0;
}
