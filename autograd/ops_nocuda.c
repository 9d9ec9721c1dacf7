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

int ag_cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                              const int32_t *start, int64_t N, int64_t H, int64_t Hkv, int64_t hd, void *stream,
                              q_err *err) {
    (void)out, (void)lse, (void)q, (void)k, (void)v, (void)start, (void)N, (void)H, (void)Hkv, (void)hd;
    (void)stream;
    return NO_CUDA(err);
}

int64_t ag_cuda_attention_backward_scratch_floats(int64_t N, int64_t H) {
    (void)N, (void)H;
    return 0;
}

int ag_cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                               const float *v, const float *out, const float *lse, const int32_t *start, int64_t N,
                               int64_t H, int64_t Hkv, int64_t hd, float *scratch, void *stream, q_err *err) {
    (void)dq, (void)dk, (void)dv, (void)dout, (void)q, (void)k, (void)v, (void)out, (void)lse, (void)start;
    (void)N, (void)H, (void)Hkv, (void)hd, (void)scratch, (void)stream;
    return NO_CUDA(err);
}

// ----------------------------------------------------------------------------
// device memory, the context, GEMMs, the linear and the loss head

int ag_cuda_malloc(void **p, int64_t bytes, q_err *err) {
    (void)bytes;
    *p = NULL;
    return NO_CUDA(err);
}

void ag_cuda_free(void *p) { (void)p; }

int ag_cuda_copy(void *dst, const void *src, int64_t bytes, void *stream, q_err *err) {
    (void)dst, (void)src, (void)bytes, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_zero(void *p, int64_t bytes, void *stream, q_err *err) {
    (void)p, (void)bytes, (void)stream;
    return NO_CUDA(err);
}

int ag_cuda_device_info(char *name, size_t name_size, int64_t *free_bytes, int64_t *total_bytes, q_err *err) {
    (void)name, (void)name_size;
    *free_bytes = *total_bytes = 0;
    return NO_CUDA(err);
}

int ag_cuda_ctx_create(ag_cuda_ctx **ctx, ag_precision precision, q_err *err) {
    (void)precision;
    *ctx = NULL;
    return NO_CUDA(err);
}

void ag_cuda_ctx_free(ag_cuda_ctx *ctx) { (void)ctx; }
void *ag_cuda_ctx_stream(const ag_cuda_ctx *ctx) { return (void)ctx, NULL; }
ag_precision ag_cuda_ctx_precision(const ag_cuda_ctx *ctx) { return (void)ctx, AG_PRECISION_FP32; }
int64_t ag_cuda_ctx_scratch_bytes(const ag_cuda_ctx *ctx) { return (void)ctx, 0; }
int ag_cuda_ctx_sync(ag_cuda_ctx *ctx, q_err *err) { return (void)ctx, NO_CUDA(err); }
void *ag_cuda_ctx_alloc(ag_cuda_ctx *ctx, int64_t bytes, q_err *err) {
    (void)ctx, (void)bytes;
    NO_CUDA(err);
    return NULL;
}
void ag_cuda_ctx_release(ag_cuda_ctx *ctx, void *p) { (void)ctx, (void)p; }

int ag_cuda_gemm(ag_cuda_ctx *ctx, ag_precision prec, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 float alpha, const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc, q_err *err) {
    (void)ctx, (void)prec, (void)trans_a, (void)trans_b, (void)M, (void)N, (void)K, (void)alpha, (void)A;
    (void)lda, (void)B, (void)ldb, (void)beta, (void)C, (void)ldc;
    return NO_CUDA(err);
}

int ag_cuda_cross_entropy(ag_cuda_ctx *ctx, double *loss_sum, int64_t *n_valid, float *dh, const float *h,
                          const float *Wlm, const int32_t *targets, int64_t N, int64_t D, int64_t V,
                          float grad_scale, int64_t token_chunk, int64_t vocab_chunk, q_err *err) {
    (void)ctx, (void)loss_sum, (void)n_valid, (void)dh, (void)h, (void)Wlm, (void)targets, (void)N, (void)D;
    (void)V, (void)grad_scale, (void)token_chunk, (void)vocab_chunk;
    return NO_CUDA(err);
}

int ag_cuda_linear_forward(ag_cuda_ctx *ctx, float *y, float *xa, const float *x, const float *xd,
                           const ag_linear *lin, int64_t N, q_err *err) {
    (void)ctx, (void)y, (void)xa, (void)x, (void)xd, (void)lin, (void)N;
    return NO_CUDA(err);
}

int ag_cuda_linear_backward(ag_cuda_ctx *ctx, float *dx, float *dxd, const float *dy, const float *xd,
                            const float *xa, const ag_linear *lin, int64_t N, q_err *err) {
    (void)ctx, (void)dx, (void)dxd, (void)dy, (void)xd, (void)xa, (void)lin, (void)N;
    return NO_CUDA(err);
}
