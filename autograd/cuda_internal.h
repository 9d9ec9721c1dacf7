// autograd/cuda_internal.h: what the .cu files of autograd/ share and the
// public header does not show: the context's layout, its scratch slots, the
// launch helpers and the checks. Included by .cu files only.
#ifndef QLORA_AUTOGRAD_CUDA_INTERNAL_H
#define QLORA_AUTOGRAD_CUDA_INTERNAL_H

#include <cublas_v2.h>
#include <stdint.h>

#include "autograd/autograd.h"
#include "core/core_cuda.h"

#define Q_CUBLAS_CHECK(call, err)                                                                  \
    do {                                                                                           \
        cublasStatus_t s_ = (call);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                           \
            return q_err_set((err), "%s failed: %s (%s:%d)", #call, cublasGetStatusString(s_),     \
                             __FILE__, __LINE__);                                                  \
    } while (0)

// Scratch slots of a context: each grows to the largest request and is
// reused by the next op on the same stream (ops run in order, so a slot is
// free again once the op that filled it has been enqueued past).
enum ag_scratch_slot {
    AG_SCRATCH_WEIGHT,   // the dequantized base weight [O,I] (fp32 or 16-bit)
    AG_SCRATCH_WIDEN,    // 16-bit dequantization before widening to fp32 (FP32/TF32 modes, 16-bit w_dtype)
    AG_SCRATCH_GEMM_A,   // 16-bit copy of a GEMM operand
    AG_SCRATCH_GEMM_B,
    AG_SCRATCH_LINEAR,   // the linear backward's t = dy B [N,r]
    AG_SCRATCH_LOSS,     // the loss head's logits and row statistics
    AG_SCRATCH_LOSS_ROWS,// per-row losses (double) [N]
    AG_SCRATCH_COUNT
};

struct ag_cuda_ctx {
    cudaStream_t stream;
    cublasHandle_t blas;
    ag_precision precision;
    void *scratch[AG_SCRATCH_COUNT];
    int64_t scratch_bytes[AG_SCRATCH_COUNT];
};

// A slot of at least `bytes` (contents undefined), or NULL with err set.
void *ag_cuda_scratch(ag_cuda_ctx *ctx, int slot, int64_t bytes, q_err *err);

// GEMM on typed device operands (CUDA_R_32F, CUDA_R_16BF, CUDA_R_16F); C is
// fp32. 16-bit operands use fp32 accumulation; fp32 operands use prec
// (FP32: plain fp32 math, TF32: tensor cores). ag_cuda_gemm is this after
// rounding fp32 operands to 16 bits when prec asks for it.
int ag_cuda_gemm_typed(ag_cuda_ctx *ctx, ag_precision prec, bool trans_a, bool trans_b, int64_t M, int64_t N,
                       int64_t K, float alpha, const void *A, cudaDataType_t a_type, int64_t lda, const void *B,
                       cudaDataType_t b_type, int64_t ldb, float beta, float *C, int64_t ldc, q_err *err);

// Rounds n fp32 values to bf16 (to_bf16) or fp16 into dst.
int ag_cuda_round16(void *dst, const float *src, int64_t n, bool to_bf16, cudaStream_t s, q_err *err);

// Launch helpers for grid-stride loops.
enum { AG_CUDA_THREADS = 256 };
static inline unsigned ag_cuda_blocks(int64_t n) {
    const int64_t b = (n + AG_CUDA_THREADS - 1) / AG_CUDA_THREADS;
    return (unsigned)(b < (1 << 20) ? b : (1 << 20));
}
#define AG_GRID_STRIDE(i, n)                                                               \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);               \
         i += (int64_t)gridDim.x * blockDim.x)

#endif  // QLORA_AUTOGRAD_CUDA_INTERNAL_H
