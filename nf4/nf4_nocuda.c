// nf4/nf4_nocuda.c: the CUDA entry points of nf4.h in a build without CUDA.
#include "nf4.h"

bool nf4_cuda_available(void) { return false; }

int nf4_cuda_dequantize(const nf4_view *q, void *out, q_dtype out_dtype, void *stream, q_err *err) {
    return q_err_set(err, "qlora was built without CUDA (configure with -DQLORA_CUDA=ON)");
}

int nf4_cuda_quantize_blocks(const void *x, q_dtype dtype, int64_t numel, nf4_qtype qt, int64_t blocksize,
                             uint8_t *packed, float *absmax, void *stream, q_err *err) {
    return q_err_set(err, "qlora was built without CUDA (configure with -DQLORA_CUDA=ON)");
}

int nf4_cuda_double_quantize(const float *absmax, int64_t nblocks, const float *map, float offset,
                             uint8_t *qabsmax, float *nested_absmax, void *stream, q_err *err) {
    return q_err_set(err, "qlora was built without CUDA (configure with -DQLORA_CUDA=ON)");
}
