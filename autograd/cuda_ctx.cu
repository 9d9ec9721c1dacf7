// autograd/cuda_ctx.cu: the device side's plumbing: memory, the context (a
// stream, a cuBLAS handle, the GEMM precision, growable scratch) and the
// row-major GEMM every CUDA op goes through.
//
// Row-major on a column-major library: a row-major C[M,N] is a column-major
// C^T[N,M], and C^T = op(B)^T op(A)^T, so cuBLAS is called with the operands
// swapped and M, N exchanged; the transposes and leading dimensions carry over
// unchanged.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdio.h>

#include "autograd/cuda_internal.h"

// ----------------------------------------------------------------------------
// device memory

extern "C" int ag_cuda_malloc(void **p, int64_t bytes, q_err *err) {
    *p = NULL;
    if (bytes < 0) return q_err_set(err, "autograd/cuda_ctx.cu: malloc of %lld bytes", (long long)bytes);
    void *d = NULL;
    const cudaError_t e = cudaMalloc(&d, (size_t)(bytes ? bytes : 4));
    if (e != cudaSuccess) {
        (void)cudaGetLastError();  // clear it: an out-of-memory is reported here, not at the next launch
        return q_err_set(err, "out of device memory: cudaMalloc of %.1f MiB failed (%s)", (double)bytes / 1048576.0,
                         cudaGetErrorString(e));
    }
    Q_CUDA_CHECK(cudaMemset(d, 0, (size_t)(bytes ? bytes : 4)), err);
    // cudaMemset is queued on the legacy stream, which the contexts'
    // non-blocking streams never wait for: the zeros must land first
    Q_CUDA_CHECK(cudaStreamSynchronize(0), err);
    *p = d;
    return 0;
}

extern "C" void ag_cuda_free(void *p) {
    if (p) cudaFree(p);
}

static bool on_device(const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return a.type == cudaMemoryTypeDevice;
}

extern "C" int ag_cuda_copy(void *dst, const void *src, int64_t bytes, void *stream, q_err *err) {
    if (bytes <= 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    Q_CUDA_CHECK(cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDefault, s), err);
    if (!on_device(dst) || !on_device(src)) Q_CUDA_CHECK(cudaStreamSynchronize(s), err);
    return 0;
}

extern "C" int ag_cuda_zero(void *p, int64_t bytes, void *stream, q_err *err) {
    if (bytes <= 0) return 0;
    Q_CUDA_CHECK(cudaMemsetAsync(p, 0, (size_t)bytes, (cudaStream_t)stream), err);
    return 0;
}

extern "C" int ag_cuda_device_info(char *name, size_t name_size, int64_t *free_bytes, int64_t *total_bytes,
                                   q_err *err) {
    cudaDeviceProp prop;
    Q_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0), err);
    size_t fr = 0, tot = 0;
    Q_CUDA_CHECK(cudaMemGetInfo(&fr, &tot), err);
    if (name && name_size) snprintf(name, name_size, "%s (sm_%d%d)", prop.name, prop.major, prop.minor);
    *free_bytes = (int64_t)fr;
    *total_bytes = (int64_t)tot;
    return 0;
}

// ----------------------------------------------------------------------------
// the context

extern "C" int ag_cuda_ctx_create(ag_cuda_ctx **out, ag_precision precision, q_err *err) {
    *out = NULL;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        return q_err_set(err, "no CUDA device is present (train on the CPU, or check the driver with nvidia-smi)");
    }
    if (precision == AG_PRECISION_BF16) {
        cudaDeviceProp prop;
        Q_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0), err);
        if (prop.major < 8)
            return q_err_set(err, "bf16 GEMMs need compute capability 8.0 or newer; %s is %d.%d (use fp16 or fp32)",
                             prop.name, prop.major, prop.minor);
    }
    ag_cuda_ctx *c = (ag_cuda_ctx *)calloc(1, sizeof *c);
    if (!c) return q_err_set(err, "out of memory");
    c->precision = precision;
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        free(c);
        return q_err_set(err, "cudaStreamCreate failed: %s", cudaGetErrorString(e));
    }
    cublasStatus_t s = cublasCreate(&c->blas);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetStream(c->blas, c->stream);
    if (s != CUBLAS_STATUS_SUCCESS) {
        if (c->blas) cublasDestroy(c->blas);
        cudaStreamDestroy(c->stream);
        free(c);
        return q_err_set(err, "cuBLAS could not start: %s", cublasGetStatusString(s));
    }
    *out = c;
    return 0;
}

extern "C" void ag_cuda_ctx_free(ag_cuda_ctx *c) {
    if (!c) return;
    cudaStreamSynchronize(c->stream);
    for (int i = 0; i < AG_SCRATCH_COUNT; i++) ag_cuda_free(c->scratch[i]);
    cublasDestroy(c->blas);
    cudaStreamDestroy(c->stream);
    free(c);
}

extern "C" void *ag_cuda_ctx_stream(const ag_cuda_ctx *c) { return c->stream; }
extern "C" ag_precision ag_cuda_ctx_precision(const ag_cuda_ctx *c) { return c->precision; }

extern "C" int64_t ag_cuda_ctx_scratch_bytes(const ag_cuda_ctx *c) {
    int64_t n = 0;
    for (int i = 0; i < AG_SCRATCH_COUNT; i++) n += c->scratch_bytes[i];
    return n;
}

extern "C" int ag_cuda_ctx_sync(ag_cuda_ctx *c, q_err *err) {
    Q_CUDA_CHECK(cudaStreamSynchronize(c->stream), err);
    Q_CUDA_CHECK(cudaGetLastError(), err);
    return 0;
}

extern "C" void *ag_cuda_ctx_alloc(ag_cuda_ctx *c, int64_t bytes, q_err *err) {
    void *p = NULL;
    const size_t size = (size_t)(bytes > 0 ? bytes : 4);
    const cudaError_t e = cudaMallocAsync(&p, size, c->stream);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        q_err_set(err, "out of device memory: %.1f MiB more for activations (%s); try a shorter seq_len, a smaller "
                       "micro batch or train.recompute",
                  (double)bytes / 1048576.0, cudaGetErrorString(e));
        return NULL;
    }
    if (cudaMemsetAsync(p, 0, size, c->stream) != cudaSuccess) {
        cudaFreeAsync(p, c->stream);
        q_err_set(err, "cudaMemsetAsync failed: %s", cudaGetErrorString(cudaGetLastError()));
        return NULL;
    }
    return p;
}

extern "C" void ag_cuda_ctx_release(ag_cuda_ctx *c, void *p) {
    if (p) cudaFreeAsync(p, c->stream);
}

// Growing a slot frees the old buffer only after the stream has drained:
// work already enqueued may still read it.
void *ag_cuda_scratch(ag_cuda_ctx *c, int slot, int64_t bytes, q_err *err) {
    if (bytes <= c->scratch_bytes[slot]) return c->scratch[slot];
    if (cudaStreamSynchronize(c->stream) != cudaSuccess) {
        q_err_set(err, "autograd/cuda_ctx.cu: a kernel failed before scratch could grow: %s",
                  cudaGetErrorString(cudaGetLastError()));
        return NULL;
    }
    ag_cuda_free(c->scratch[slot]);
    c->scratch[slot] = NULL;
    c->scratch_bytes[slot] = 0;
    const int64_t grown = bytes + bytes / 8;  // a little headroom: the next batch may be longer
    if (ag_cuda_malloc(&c->scratch[slot], grown, err)) return NULL;
    c->scratch_bytes[slot] = grown;
    return c->scratch[slot];
}

// ----------------------------------------------------------------------------
// GEMM

__global__ void round16_kernel(__nv_bfloat16 *__restrict__ bf, __half *__restrict__ hf, const float *__restrict__ x,
                               int64_t n) {
    AG_GRID_STRIDE(i, n) {
        if (bf) bf[i] = __float2bfloat16_rn(x[i]);
        else hf[i] = __float2half_rn(x[i]);
    }
}

int ag_cuda_round16(void *dst, const float *src, int64_t n, bool to_bf16, cudaStream_t s, q_err *err) {
    if (n <= 0) return 0;
    round16_kernel<<<ag_cuda_blocks(n), AG_CUDA_THREADS, 0, s>>>(to_bf16 ? (__nv_bfloat16 *)dst : NULL,
                                                                  to_bf16 ? NULL : (__half *)dst, src, n);
    Q_CUDA_CHECK_LAUNCH("round16_kernel", err);
    return 0;
}

// C[M,N] (row stride ldc) *= beta; beta 0 writes zeros (NaN in C does not survive, as with BLAS).
__global__ void scale_kernel(float *C, float beta, int64_t M, int64_t N, int64_t ldc) {
    AG_GRID_STRIDE(i, M * N) {
        float *x = C + (i / N) * ldc + i % N;
        *x = beta == 0.0f ? 0.0f : *x * beta;
    }
}

int ag_cuda_gemm_typed(ag_cuda_ctx *c, ag_precision prec, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                       float alpha, const void *A, cudaDataType_t at, int64_t lda, const void *B,
                       cudaDataType_t bt, int64_t ldb, float beta, float *C, int64_t ldc, q_err *err) {
    if (M < 0 || N < 0 || K < 0)
        return q_err_set(err, "autograd/cuda_ctx.cu: gemm: negative size [%lld, %lld, %lld]", (long long)M,
                         (long long)N, (long long)K);
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || lda > INT32_MAX || ldb > INT32_MAX || ldc > INT32_MAX)
        return q_err_set(err, "autograd/cuda_ctx.cu: gemm: a size or stride passes 2^31 (cuBLAS's int API)");
    if (M == 0 || N == 0) return 0;
    if (K == 0) {  // C = beta C, as ag_gemm leaves it (cuBLAS does not cover every type combination here)
        scale_kernel<<<ag_cuda_blocks(M * N), AG_CUDA_THREADS, 0, c->stream>>>(C, beta, M, N, ldc);
        Q_CUDA_CHECK_LAUNCH("scale_kernel", err);
        return 0;
    }
    if (at != bt)
        return q_err_set(err, "autograd/cuda_ctx.cu: gemm: operand types differ (%d, %d)", (int)at, (int)bt);
    cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    if (at == CUDA_R_32F && prec == AG_PRECISION_TF32) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
    if (at == CUDA_R_32F && prec == AG_PRECISION_FP32) compute = CUBLAS_COMPUTE_32F_PEDANTIC;
    // column-major C^T[N,M] = op(B)^T[N,K] op(A)^T[K,M]
    Q_CUBLAS_CHECK(cublasGemmEx(c->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N,
                                (int)M, (int)K, &alpha, B, bt, (int)ldb, A, at, (int)lda, &beta, C, CUDA_R_32F,
                                (int)ldc, compute, CUBLAS_GEMM_DEFAULT),
                   err);
    return 0;
}

// Elements an operand of op-shape [rows, cols] (as stored: stride ld) spans.
static int64_t operand_span(bool trans, int64_t rows, int64_t cols, int64_t ld) {
    const int64_t stored_rows = trans ? cols : rows;
    return stored_rows ? (stored_rows - 1) * ld + (trans ? rows : cols) : 0;
}

extern "C" int ag_cuda_gemm(ag_cuda_ctx *c, ag_precision prec, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                            float alpha, const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                            float *C, int64_t ldc, q_err *err) {
    if (prec != AG_PRECISION_BF16 && prec != AG_PRECISION_FP16)
        return ag_cuda_gemm_typed(c, prec, ta, tb, M, N, K, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F, ldb, beta, C,
                                  ldc, err);
    if (M <= 0 || N <= 0 || K <= 0)  // nothing to round; the typed call handles the edge cases
        return ag_cuda_gemm_typed(c, AG_PRECISION_FP32, ta, tb, M, N, K, alpha, A, CUDA_R_32F, lda, B, CUDA_R_32F,
                                  ldb, beta, C, ldc, err);
    const bool bf = prec == AG_PRECISION_BF16;
    const cudaDataType_t t16 = bf ? CUDA_R_16BF : CUDA_R_16F;
    // the operands as stored, strides included, rounded element by element
    const int64_t na = operand_span(ta, M, K, lda), nb = operand_span(tb, K, N, ldb);
    void *a16 = ag_cuda_scratch(c, AG_SCRATCH_GEMM_A, na * 2, err);
    void *b16 = a16 ? ag_cuda_scratch(c, AG_SCRATCH_GEMM_B, nb * 2, err) : NULL;
    if (!a16 || !b16) return -1;
    if (ag_cuda_round16(a16, A, na, bf, c->stream, err) || ag_cuda_round16(b16, B, nb, bf, c->stream, err)) return -1;
    return ag_cuda_gemm_typed(c, prec, ta, tb, M, N, K, alpha, a16, t16, lda, b16, t16, ldb, beta, C, ldc, err);
}
