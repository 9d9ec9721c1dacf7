// autograd/ops_nocuda.c: the CUDA kernels of the autograd room in a build
// without CUDA: every entry point says so.
#include "autograd/autograd.h"

#define NO_CUDA(err) q_err_set((err), "qlora was built without CUDA (configure with -DQLORA_CUDA=ON)")

bool ag_cuda_available(void) { return false; }

int ag_cuda_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N, int64_t D,
                              void *stream, q_err *err) {
    (void)out, (void)ids, (void)table, (void)N, (void)D, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N, int64_t D,
                               void *stream, q_err *err) {
    (void)dtable, (void)dout, (void)ids, (void)N, (void)D, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int64_t N, int64_t D,
                            float eps, void *stream, q_err *err) {
    (void)out, (void)rstd, (void)x, (void)w, (void)N, (void)D, (void)eps, (void)stream;
    return NO_CUDA(err);
}

int64_t ag_cuda_rmsnorm_backward_scratch_floats(int64_t N, int64_t D) {
    (void)N, (void)D;
    return 0;
}

int ag_cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                             const float *rstd, int64_t N, int64_t D, float *scratch, void *stream, q_err *err) {
    (void)dx, (void)dw, (void)dout, (void)x, (void)w, (void)rstd, (void)N, (void)D, (void)scratch, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_dropout_forward(float *out, const float *x, int64_t n, float p, uint64_t seed, void *stream,
                            q_err *err) {
    (void)out, (void)x, (void)n, (void)p, (void)seed, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_dropout_backward(float *dx, const float *dout, int64_t n, float p, uint64_t seed, void *stream,
                             q_err *err) {
    (void)dx, (void)dout, (void)n, (void)p, (void)seed, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_rope_forward(float *out, const float *x, const int32_t *pos, const float *inv_freq, int64_t N,
                         int64_t H, int64_t hd, void *stream, q_err *err) {
    (void)out, (void)x, (void)pos, (void)inv_freq, (void)N, (void)H, (void)hd, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_rope_backward(float *dx, const float *dout, const int32_t *pos, const float *inv_freq, int64_t N,
                          int64_t H, int64_t hd, void *stream, q_err *err) {
    (void)dx, (void)dout, (void)pos, (void)inv_freq, (void)N, (void)H, (void)hd, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_swiglu_forward(float *out, const float *gate, const float *up, int64_t n, void *stream, q_err *err) {
    (void)out, (void)gate, (void)up, (void)n, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                            int64_t n, void *stream, q_err *err) {
    (void)dgate, (void)dup, (void)dout, (void)gate, (void)up, (void)n, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_add_forward(float *out, const float *a, const float *b, int64_t n, void *stream, q_err *err) {
    (void)out, (void)a, (void)b, (void)n, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_add_backward(float *da, float *db, const float *dout, int64_t n, void *stream, q_err *err) {
    (void)da, (void)db, (void)dout, (void)n, (void)stream;
    return NO_CUDA(err);
}
