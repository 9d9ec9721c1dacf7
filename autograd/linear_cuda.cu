// autograd/linear_cuda.cu: the NF4 + LoRA linear on the device. The frozen
// base is dequantized into the context's workspace (one weight at a time,
// again in the backward: the model's weights stay 4-bit), then one cuBLAS
// GEMM in the context's precision; the LoRA branch runs in the cheap order
// (xd A^T first, [N,r]) in fp32. Semantics and shapes: ag_lora_linear_forward
// and ag_lora_linear_backward in ops.c, the CPU reference.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "autograd/cuda_internal.h"

static bool is16(ag_precision p) { return p == AG_PRECISION_BF16 || p == AG_PRECISION_FP16; }

// LoRA GEMMs are small and carry the trained signal: fp32, or tf32 when the
// user asked for tf32 everywhere.
static ag_precision lora_precision(const ag_cuda_ctx *c) {
    return c->precision == AG_PRECISION_TF32 ? AG_PRECISION_TF32 : AG_PRECISION_FP32;
}

__global__ void widen_kernel(float *__restrict__ out, const void *__restrict__ in, bool bf, int64_t n) {
    AG_GRID_STRIDE(i, n) {
        out[i] = bf ? __bfloat162float(((const __nv_bfloat16 *)in)[i]) : __half2float(((const __half *)in)[i]);
    }
}

__global__ void bias_add_kernel(float *__restrict__ y, const float *__restrict__ bias, int64_t N, int64_t O) {
    AG_GRID_STRIDE(i, N * O) y[i] = __fadd_rn(y[i], bias[i % O]);
}

// The base weight [O,I] as the GEMM wants it: *W and its type. FP32/TF32:
// fp32 values rounded through w_dtype, bit for bit the CPU's (dequantizing
// straight to bf16/fp16 rounds the same product once, as q_f32_to_bf16 does);
// 16-bit modes: dequantized straight to the operand type.
static int base_weight(ag_cuda_ctx *c, const ag_linear *lin, const void **W, cudaDataType_t *type, q_err *err) {
    const int64_t n = lin->in * lin->out;
    const bool bf = c->precision == AG_PRECISION_BF16;
    if (is16(c->precision)) {
        void *ws = ag_cuda_scratch(c, AG_SCRATCH_WEIGHT, n * 2, err);
        if (!ws) return -1;
        if (lin->dense ? ag_cuda_round16(ws, lin->dense, n, bf, c->stream, err)
                       : nf4_cuda_dequantize(&lin->w, ws, bf ? Q_DTYPE_BF16 : Q_DTYPE_F16, c->stream, err))
            return -1;
        *W = ws;
        *type = bf ? CUDA_R_16BF : CUDA_R_16F;
        return 0;
    }
    *type = CUDA_R_32F;
    if (lin->dense) {
        *W = lin->dense;
        return 0;
    }
    float *ws = (float *)ag_cuda_scratch(c, AG_SCRATCH_WEIGHT, n * 4, err);
    if (!ws) return -1;
    if (lin->w_dtype == Q_DTYPE_BF16 || lin->w_dtype == Q_DTYPE_F16) {
        void *w16 = ag_cuda_scratch(c, AG_SCRATCH_WIDEN, n * 2, err);
        if (!w16 || nf4_cuda_dequantize(&lin->w, w16, lin->w_dtype, c->stream, err)) return -1;
        widen_kernel<<<ag_cuda_blocks(n), AG_CUDA_THREADS, 0, c->stream>>>(ws, w16, lin->w_dtype == Q_DTYPE_BF16, n);
        Q_CUDA_CHECK_LAUNCH("widen_kernel", err);
    } else if (nf4_cuda_dequantize(&lin->w, ws, Q_DTYPE_F32, c->stream, err)) {
        return -1;
    }
    *W = ws;
    return 0;
}

// An activation operand [n] in the GEMM's type: itself (fp32) or rounded into
// the GEMM_A slot (16-bit).
static const void *activation(ag_cuda_ctx *c, const float *x, int64_t n, q_err *err) {
    if (!is16(c->precision)) return x;
    void *x16 = ag_cuda_scratch(c, AG_SCRATCH_GEMM_A, n * 2, err);
    if (!x16 || ag_cuda_round16(x16, x, n, c->precision == AG_PRECISION_BF16, c->stream, err)) return NULL;
    return x16;
}

static int check_linear(const char *fn, const ag_linear *lin, int64_t N, q_err *err) {
    if (N < 0 || lin->in <= 0 || lin->out <= 0 || lin->r < 0)
        return q_err_set(err, "autograd/linear_cuda.cu: %s: bad shape N = %lld, in = %lld, out = %lld, r = %lld", fn,
                         (long long)N, (long long)lin->in, (long long)lin->out, (long long)lin->r);
    if (lin->r > 0 && (!lin->A || !lin->B))
        return q_err_set(err, "autograd/linear_cuda.cu: %s: rank %lld without A and B", fn, (long long)lin->r);
    if (!lin->dense && lin->w.numel != lin->in * lin->out)
        return q_err_set(err, "autograd/linear_cuda.cu: %s: the quantized weight holds %lld values, not %lld x %lld",
                         fn, (long long)lin->w.numel, (long long)lin->out, (long long)lin->in);
    return 0;
}

extern "C" int ag_cuda_linear_forward(ag_cuda_ctx *c, float *y, float *xa, const float *x, const float *xd,
                                      const ag_linear *lin, int64_t N, q_err *err) {
    if (check_linear("linear_forward", lin, N, err)) return -1;
    if (N == 0) return 0;
    const int64_t I = lin->in, O = lin->out, r = lin->r;
    const void *W, *xg;
    cudaDataType_t wt;
    if (base_weight(c, lin, &W, &wt, err) || !(xg = activation(c, x, N * I, err))) return -1;
    // y[N,O] = x[N,I] W[O,I]^T (+ bias)
    if (ag_cuda_gemm_typed(c, c->precision, false, true, N, O, I, 1.0f, xg, wt, I, W, wt, I, 0.0f, y, O, err))
        return -1;
    if (lin->bias) {
        bias_add_kernel<<<ag_cuda_blocks(N * O), AG_CUDA_THREADS, 0, c->stream>>>(y, lin->bias, N, O);
        Q_CUDA_CHECK_LAUNCH("bias_add_kernel", err);
    }
    if (r == 0) return 0;
    // xa[N,r] = xd[N,I] A[r,I]^T;  y += scale xa[N,r] B[O,r]^T
    const ag_precision lp = lora_precision(c);
    if (ag_cuda_gemm(c, lp, false, true, N, r, I, 1.0f, xd, I, lin->A, I, 0.0f, xa, r, err)) return -1;
    return ag_cuda_gemm(c, lp, false, true, N, O, r, lin->scale, xa, r, lin->B, r, 1.0f, y, O, err);
}

extern "C" int ag_cuda_linear_backward(ag_cuda_ctx *c, float *dx, float *dxd, const float *dy, const float *xd,
                                       const float *xa, const ag_linear *lin, int64_t N, q_err *err) {
    if (check_linear("linear_backward", lin, N, err)) return -1;
    if (N == 0) return 0;
    const int64_t I = lin->in, O = lin->out, r = lin->r;
    if (dx) {  // dx[N,I] += dy[N,O] W[O,I]: through the frozen base, never dW
        const void *W, *dyg;
        cudaDataType_t wt;
        if (base_weight(c, lin, &W, &wt, err) || !(dyg = activation(c, dy, N * O, err))) return -1;
        if (ag_cuda_gemm_typed(c, c->precision, false, false, N, I, O, 1.0f, dyg, wt, O, W, wt, I, 1.0f, dx, I, err))
            return -1;
    }
    if (r == 0) return 0;
    const ag_precision lp = lora_precision(c);
    // dB[O,r] += scale dy[N,O]^T xa[N,r]
    if (lin->dB && ag_cuda_gemm(c, lp, true, false, O, r, N, lin->scale, dy, O, xa, r, 1.0f, lin->dB, r, err))
        return -1;
    if (!lin->dA && !dxd) return 0;
    // t[N,r] = dy[N,O] B[O,r], the gradient at xa before the scale
    float *t = (float *)ag_cuda_scratch(c, AG_SCRATCH_LINEAR, N * r * 4, err);
    if (!t || ag_cuda_gemm(c, lp, false, false, N, r, O, 1.0f, dy, O, lin->B, r, 0.0f, t, r, err)) return -1;
    // dA[r,I] += scale t^T xd;  dxd[N,I] += scale t A (after dx's GEMM, so dxd may be dx)
    if (lin->dA && ag_cuda_gemm(c, lp, true, false, r, I, N, lin->scale, t, r, xd, I, 1.0f, lin->dA, I, err))
        return -1;
    if (dxd && ag_cuda_gemm(c, lp, false, false, N, I, r, lin->scale, t, r, lin->A, I, 1.0f, dxd, I, err)) return -1;
    return 0;
}
