// bench/bench_dequant_cuda.c: NF4+DQ dequantization on the GPU beside a
// device-to-device copy of the same output size (the memory-bound ceiling),
// in one run. Prints GB/s of output written and the ratio to the copy.
// Exits 0 with a notice when there is no GPU.
#define _POSIX_C_SOURCE 200809L
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include "nf4/nf4.h"

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s failed: %s (%s:%d)\n", #x, cudaGetErrorString(e_), __FILE__, __LINE__); return 1; } } while (0)

int main(void) {
    if (!nf4_cuda_available()) {
        printf("bench_dequant_cuda: no CUDA device, skipped\n");
        return 0;
    }
    const int64_t rows = 4096, cols = 11008, n = rows * cols, shape[2] = {rows, cols};
    uint16_t *w = malloc(n * 2);
    uint64_t s = 1;
    for (int64_t i = 0; i < n; i++) {  // uniform-ish weights; the values do not matter for speed
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        w[i] = q_f32_to_bf16(((float)(s >> 40) / 16777216.0f - 0.5f) * 0.04f);
    }
    nf4_tensor t;
    q_err err;
    if (nf4_tensor_quantize(&t, w, Q_DTYPE_BF16, 2, shape, NF4_QTYPE_NF4, 64, true, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    uint8_t *dp, *dq;
    float *dn, *dm;
    void *dout, *dsrc, *flush;
    const size_t flush_bytes = 256 << 20;  // larger than any L2: every timed run starts cold
    CHECK(cudaMalloc((void **)&dp, nf4_packed_bytes(n)));
    CHECK(cudaMalloc((void **)&dq, t.nblocks));
    CHECK(cudaMalloc((void **)&dn, nf4_nblocks(t.nblocks, 256) * 4));
    CHECK(cudaMalloc((void **)&dm, 1024));
    CHECK(cudaMalloc(&dout, n * 4));
    CHECK(cudaMalloc(&dsrc, n * 4));
    CHECK(cudaMalloc(&flush, flush_bytes));
    CHECK(cudaMemcpy(dp, t.packed, nf4_packed_bytes(n), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dq, t.qabsmax, t.nblocks, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dn, t.nested_absmax, nf4_nblocks(t.nblocks, 256) * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dm, t.nested_map, 1024, cudaMemcpyHostToDevice));
    nf4_view v = nf4_tensor_view(&t);
    v.packed = dp, v.qabsmax = dq, v.nested_absmax = dn, v.nested_map = dm;
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    const q_dtype outs[3] = {Q_DTYPE_BF16, Q_DTYPE_F16, Q_DTYPE_F32};
    printf("NF4+DQ dequantize %lldx%lld, block 64\n%-9s %12s %12s %7s\n", (long long)rows, (long long)cols,
           "output", "dequant GB/s", "copy GB/s", "ratio");
    for (int o = 0; o < 3; o++) {
        const size_t bytes = n * q_dtype_size(outs[o]);
        float best_dq = 1e30f, best_cp = 1e30f, ms;
        for (int it = 0; it < 20; it++) {
            CHECK(cudaMemset(flush, it, flush_bytes));
            CHECK(cudaEventRecord(a, 0));
            if (nf4_cuda_dequantize(&v, dout, outs[o], NULL, &err)) { fprintf(stderr, "error: %s\n", err.msg); return 1; }
            CHECK(cudaEventRecord(b, 0));
            CHECK(cudaEventSynchronize(b));
            CHECK(cudaEventElapsedTime(&ms, a, b));
            if (it > 0 && ms < best_dq) best_dq = ms;
            CHECK(cudaMemset(flush, it, flush_bytes));
            CHECK(cudaEventRecord(a, 0));
            CHECK(cudaMemcpyAsync(dout, dsrc, bytes, cudaMemcpyDeviceToDevice, 0));
            CHECK(cudaEventRecord(b, 0));
            CHECK(cudaEventSynchronize(b));
            CHECK(cudaEventElapsedTime(&ms, a, b));
            if (it > 0 && ms < best_cp) best_cp = ms;
        }
        // a copy reads and writes `bytes`; dequant reads ~bytes/4..bytes/8 and writes `bytes`
        printf("%-9s %12.1f %12.1f %6.2fx\n", q_dtype_torch_name(outs[o]), bytes / best_dq / 1e6,
               bytes / best_cp / 1e6, best_cp / best_dq);
    }
    nf4_tensor_free(&t);
    free(w);
    return 0;
}
