// autograd/ops_cuda.cu: the elementwise and row-wise kernels of the training
// step on the GPU (embedding, RMSNorm, dropout, RoPE, SwiGLU, residual add),
// with the semantics of their CPU references in ops.c and tested against them
// (tests/test_ops_cuda.c).
//
// Rounding: the CPU build compiles with -ffp-contract=off, and nvcc would
// contract a*b+c into one FMA, so the elementwise arithmetic is spelled with
// the round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...) and matches the
// CPU operation for operation. What still differs: reductions (a block tree
// instead of the CPU's 16 lanes) and device expf / sincosf (within 2 ulp,
// glibc's are correctly rounded); results agree to fp32 rounding. Dropout
// masks are integer arithmetic and bit-identical.
//
// Determinism: no float atomics anywhere. Reductions over rows (RMSNorm dw,
// embedding dtable) give each column to one thread that adds in a fixed order.
//
// bf16 plan (not built yet): the same kernels templated on the storage type
// of activations (float / __nv_bfloat16), loading with __bfloat162float and
// storing with __float2bfloat16_rn, all arithmetic and every reduction in
// fp32; rstd, inv_freq, dropout scales and the dw scratch stay fp32; gradients
// accumulated into bf16 only where the tape keeps them bf16 (LoRA A/B grads
// stay fp32). Pairs of bf16 loaded as __nv_bfloat162 where the row is even.
#include <stdint.h>

#include "autograd/autograd.h"
#include "core/core_cuda.h"

// ----------------------------------------------------------------------------
// launch helpers

enum { THREADS = 256 };
static const int64_t MAX_BLOCKS = 1 << 20;

// Blocks for a grid-stride loop over n elements.
static unsigned blocks_for(int64_t n) {
    const int64_t b = (n + THREADS - 1) / THREADS;
    return (unsigned)(b < MAX_BLOCKS ? b : MAX_BLOCKS);
}

#define GRID_STRIDE(i, n)                                                                 \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);              \
         i += (int64_t)gridDim.x * blockDim.x)

static int check_count(const char *fn, const char *name, int64_t v, q_err *err) {
    if (v < 0) return q_err_set(err, "autograd/ops_cuda.cu: %s: %s = %lld is negative", fn, name, (long long)v);
    return 0;
}

// One block per row: the row count is the grid's x dimension.
static int check_rows(const char *fn, int64_t N, q_err *err) {
    if (N > INT32_MAX) return q_err_set(err, "autograd/ops_cuda.cu: %s: N = %lld rows is too many", fn, (long long)N);
    return 0;
}

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32.
__device__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, nwarps = blockDim.x / 32;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? warp_sums[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// ----------------------------------------------------------------------------
// embedding

__global__ void embedding_forward_kernel(float *__restrict__ out, const int32_t *__restrict__ ids,
                                         const float *__restrict__ table, int64_t N, int64_t D) {
    GRID_STRIDE(i, N * D) {
        const int64_t n = i / D, d = i - n * D;
        out[i] = table[(int64_t)ids[n] * D + d];
    }
}

extern "C" int ag_cuda_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N, int64_t D,
                                         void *stream, q_err *err) {
    if (check_count("embedding_forward", "N", N, err) || check_count("embedding_forward", "D", D, err)) return -1;
    if (N == 0 || D == 0) return 0;
    embedding_forward_kernel<<<blocks_for(N * D), THREADS, 0, (cudaStream_t)stream>>>(out, ids, table, N, D);
    Q_CUDA_CHECK_LAUNCH("embedding_forward_kernel", err);
    return 0;
}

// A thread per column walks the tokens in order, as the CPU does: repeated
// ids never race and the sums are the CPU's, bit for bit.
__global__ void embedding_backward_kernel(float *__restrict__ dtable, const float *__restrict__ dout,
                                          const int32_t *__restrict__ ids, int64_t N, int64_t D) {
    GRID_STRIDE(d, D) {
        for (int64_t n = 0; n < N; n++) {
            float *dst = dtable + (int64_t)ids[n] * D + d;
            *dst = __fadd_rn(*dst, dout[n * D + d]);
        }
    }
}

extern "C" int ag_cuda_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N,
                                          int64_t D, void *stream, q_err *err) {
    if (check_count("embedding_backward", "N", N, err) || check_count("embedding_backward", "D", D, err)) return -1;
    if (N == 0 || D == 0) return 0;
    embedding_backward_kernel<<<blocks_for(D), THREADS, 0, (cudaStream_t)stream>>>(dtable, dout, ids, N, D);
    Q_CUDA_CHECK_LAUNCH("embedding_backward_kernel", err);
    return 0;
}

// ----------------------------------------------------------------------------
// RMSNorm: one block per row

__global__ void rmsnorm_forward_kernel(float *__restrict__ out, float *__restrict__ rstd,
                                       const float *__restrict__ x, const float *__restrict__ w, int64_t D,
                                       float eps) {
    const int64_t n = blockIdx.x;
    const float *xr = x + n * D;
    float *o = out + n * D;
    float ss = 0.0f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss = fmaf(xr[d], xr[d], ss);
    ss = block_sum(ss);
    // HF: rsqrt(mean(x^2) + eps), spelled as the CPU does: 1 / sqrt(.)
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)D), eps)));
    if (rstd && threadIdx.x == 0) rstd[n] = r;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) o[d] = __fmul_rn(w[d], __fmul_rn(xr[d], r));
}

extern "C" int ag_cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int64_t N,
                                       int64_t D, float eps, void *stream, q_err *err) {
    if (check_count("rmsnorm_forward", "N", N, err) || check_count("rmsnorm_forward", "D", D, err) ||
        check_rows("rmsnorm_forward", N, err))
        return -1;
    if (D == 0) return q_err_set(err, "autograd/ops_cuda.cu: rmsnorm_forward: D = 0 (the mean of no elements)");
    if (N == 0) return 0;
    rmsnorm_forward_kernel<<<(unsigned)N, THREADS, 0, (cudaStream_t)stream>>>(out, rstd, x, w, D, eps);
    Q_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel", err);
    return 0;
}

// dx_i += r w_i g_i - x_i r^3/D sum_d(w_d g_d x_d)
__global__ void rmsnorm_backward_dx_kernel(float *__restrict__ dx, const float *__restrict__ dout,
                                           const float *__restrict__ x, const float *__restrict__ w,
                                           const float *__restrict__ rstd, int64_t D) {
    const int64_t n = blockIdx.x;
    const float *g = dout + n * D, *xr = x + n * D;
    float *d_x = dx + n * D;
    const float r = rstd[n];
    float s = 0.0f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) s = fmaf(__fmul_rn(w[d], g[d]), xr[d], s);
    s = block_sum(s);
    const float c = __fdiv_rn(__fmul_rn(s, __fmul_rn(__fmul_rn(r, r), r)), (float)D);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
        d_x[d] = __fadd_rn(d_x[d], __fsub_rn(__fmul_rn(r, __fmul_rn(w[d], g[d])), __fmul_rn(c, xr[d])));
}

// dw_d += sum_n g_nd x_nd r_n in two passes, no atomics: pass 1 gives each
// (row chunk, column) to one thread, which sums its chunk's rows in order
// into scratch[chunk, d]; pass 2 sums the chunks of a column in order.
enum { RMS_CHUNK_ROWS = 64, MAX_GRID_Y = 65535 };

static int64_t rms_chunk_rows(int64_t N) {
    int64_t rows = RMS_CHUNK_ROWS;
    while ((N + rows - 1) / rows > MAX_GRID_Y) rows *= 2;
    return rows;
}

extern "C" int64_t ag_cuda_rmsnorm_backward_scratch_floats(int64_t N, int64_t D) {
    if (N <= 0 || D <= 0) return 0;
    return (N + rms_chunk_rows(N) - 1) / rms_chunk_rows(N) * D;
}

__global__ void rmsnorm_backward_dw_partial_kernel(float *__restrict__ partial, const float *__restrict__ dout,
                                                   const float *__restrict__ x, const float *__restrict__ rstd,
                                                   int64_t N, int64_t D, int64_t chunk_rows) {
    const int64_t d = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= D) return;
    const int64_t n0 = (int64_t)blockIdx.y * chunk_rows;
    const int64_t n1 = n0 + chunk_rows < N ? n0 + chunk_rows : N;
    float acc = 0.0f;
    for (int64_t n = n0; n < n1; n++)
        acc = __fadd_rn(acc, __fmul_rn(dout[n * D + d], __fmul_rn(x[n * D + d], rstd[n])));
    partial[(int64_t)blockIdx.y * D + d] = acc;
}

__global__ void rmsnorm_backward_dw_final_kernel(float *__restrict__ dw, const float *__restrict__ partial,
                                                 int64_t nchunks, int64_t D) {
    GRID_STRIDE(d, D) {
        float acc = 0.0f;
        for (int64_t k = 0; k < nchunks; k++) acc = __fadd_rn(acc, partial[k * D + d]);
        dw[d] = __fadd_rn(dw[d], acc);
    }
}

extern "C" int ag_cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                                        const float *rstd, int64_t N, int64_t D, float *scratch, void *stream,
                                        q_err *err) {
    if (check_count("rmsnorm_backward", "N", N, err) || check_count("rmsnorm_backward", "D", D, err) ||
        check_rows("rmsnorm_backward", N, err))
        return -1;
    if (dw && !scratch && N > 0 && D > 0)
        return q_err_set(err, "autograd/ops_cuda.cu: rmsnorm_backward: dw wanted but no scratch "
                              "(ag_cuda_rmsnorm_backward_scratch_floats)");
    if (N == 0 || D == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (dx) {
        rmsnorm_backward_dx_kernel<<<(unsigned)N, THREADS, 0, s>>>(dx, dout, x, w, rstd, D);
        Q_CUDA_CHECK_LAUNCH("rmsnorm_backward_dx_kernel", err);
    }
    if (dw) {
        const int64_t rows = rms_chunk_rows(N), nchunks = (N + rows - 1) / rows;
        const dim3 grid((unsigned)((D + THREADS - 1) / THREADS), (unsigned)nchunks);
        rmsnorm_backward_dw_partial_kernel<<<grid, THREADS, 0, s>>>(scratch, dout, x, rstd, N, D, rows);
        Q_CUDA_CHECK_LAUNCH("rmsnorm_backward_dw_partial_kernel", err);
        rmsnorm_backward_dw_final_kernel<<<blocks_for(D), THREADS, 0, s>>>(dw, scratch, nchunks, D);
        Q_CUDA_CHECK_LAUNCH("rmsnorm_backward_dw_final_kernel", err);
    }
    return 0;
}

// ----------------------------------------------------------------------------
// dropout: the CPU's counter-based hash (autograd/gemm.c), bit for bit

__device__ __forceinline__ uint64_t rng_hash(uint64_t seed, uint64_t index) {  // splitmix64 of seed ^ index
    uint64_t z = seed ^ (index + 0x9e3779b97f4a7c15ull * (index + 1));
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// ag_rng_uniform: 24 bits, exact in fp32, times an exact power of two.
__device__ __forceinline__ float rng_uniform(uint64_t seed, uint64_t index) {
    return __fmul_rn(__ull2float_rn(rng_hash(seed, index) >> 40), 1.0f / 16777216.0f);
}

__global__ void dropout_forward_kernel(float *out, const float *x, int64_t n, float p, float scale, uint64_t seed) {
    GRID_STRIDE(i, n) out[i] = rng_uniform(seed, (uint64_t)i) >= p ? __fmul_rn(x[i], scale) : 0.0f;
}

__global__ void dropout_backward_kernel(float *__restrict__ dx, const float *__restrict__ dout, int64_t n, float p,
                                        float scale, uint64_t seed) {
    GRID_STRIDE(i, n) {
        if (rng_uniform(seed, (uint64_t)i) >= p) dx[i] = __fadd_rn(dx[i], __fmul_rn(dout[i], scale));
    }
}

static int check_dropout(const char *fn, int64_t n, float p, q_err *err) {
    if (check_count(fn, "n", n, err)) return -1;
    if (!(p <= 1.0f)) return q_err_set(err, "autograd/ops_cuda.cu: %s: dropout p = %g is not in [0, 1]", fn, p);
    return 0;
}

__global__ void axpy1_kernel(float *__restrict__ y, const float *__restrict__ x, int64_t n) {
    GRID_STRIDE(i, n) y[i] = __fadd_rn(y[i], x[i]);
}

extern "C" int ag_cuda_dropout_forward(float *out, const float *x, int64_t n, float p, uint64_t seed, void *stream,
                                       q_err *err) {
    if (check_dropout("dropout_forward", n, p, err)) return -1;
    if (n == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (p <= 0.0f) {  // a copy, as on the CPU
        if (out != x)
            Q_CUDA_CHECK(cudaMemcpyAsync(out, x, (size_t)n * sizeof(float), cudaMemcpyDeviceToDevice, s), err);
        return 0;
    }
    const float scale = 1.0f / (1.0f - p);  // computed here, once, as the CPU does
    dropout_forward_kernel<<<blocks_for(n), THREADS, 0, s>>>(out, x, n, p, scale, seed);
    Q_CUDA_CHECK_LAUNCH("dropout_forward_kernel", err);
    return 0;
}

extern "C" int ag_cuda_dropout_backward(float *dx, const float *dout, int64_t n, float p, uint64_t seed,
                                        void *stream, q_err *err) {
    if (check_dropout("dropout_backward", n, p, err)) return -1;
    if (n == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (p <= 0.0f) {
        axpy1_kernel<<<blocks_for(n), THREADS, 0, s>>>(dx, dout, n);
        Q_CUDA_CHECK_LAUNCH("axpy1_kernel", err);
        return 0;
    }
    const float scale = 1.0f / (1.0f - p);
    dropout_backward_kernel<<<blocks_for(n), THREADS, 0, s>>>(dx, dout, n, p, scale, seed);
    Q_CUDA_CHECK_LAUNCH("dropout_backward_kernel", err);
    return 0;
}

// ----------------------------------------------------------------------------
// RoPE, rotate_half layout: one block per token; its angles are computed once
// into shared memory and used by every head. A thread owns a pair (i, i+hd/2)
// and reads both before writing, so out may be x.

enum { ROPE_THREADS = 128 };

__device__ void rope_angles(float *c, float *s, int32_t pos, const float *inv_freq, int64_t half) {
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
        const float theta = __fmul_rn((float)pos, inv_freq[i]);  // an fp32 product, as HF's freqs matmul
        sincosf(theta, &s[i], &c[i]);
    }
    __syncthreads();
}

__global__ void rope_forward_kernel(float *out, const float *x, const int32_t *__restrict__ pos,
                                    const float *__restrict__ inv_freq, int64_t H, int64_t hd) {
    extern __shared__ float cs[];  // cos [half] | sin [half]
    const int64_t n = blockIdx.x, half = hd / 2;
    float *c = cs, *s = cs + half;
    rope_angles(c, s, pos[n], inv_freq, half);
    for (int64_t j = threadIdx.x; j < H * half; j += blockDim.x) {
        const int64_t h = j / half, i = j - h * half, off = (n * H + h) * hd + i;
        const float a = x[off], b = x[off + half];
        out[off] = __fsub_rn(__fmul_rn(a, c[i]), __fmul_rn(b, s[i]));
        out[off + half] = __fadd_rn(__fmul_rn(b, c[i]), __fmul_rn(a, s[i]));
    }
}

// The rotation by -theta, accumulated.
__global__ void rope_backward_kernel(float *__restrict__ dx, const float *__restrict__ dout,
                                     const int32_t *__restrict__ pos, const float *__restrict__ inv_freq, int64_t H,
                                     int64_t hd) {
    extern __shared__ float cs[];
    const int64_t n = blockIdx.x, half = hd / 2;
    float *c = cs, *s = cs + half;
    rope_angles(c, s, pos[n], inv_freq, half);
    for (int64_t j = threadIdx.x; j < H * half; j += blockDim.x) {
        const int64_t h = j / half, i = j - h * half, off = (n * H + h) * hd + i;
        const float g1 = dout[off], g2 = dout[off + half];
        dx[off] = __fadd_rn(dx[off], __fadd_rn(__fmul_rn(g1, c[i]), __fmul_rn(g2, s[i])));
        dx[off + half] = __fadd_rn(dx[off + half], __fsub_rn(__fmul_rn(g2, c[i]), __fmul_rn(g1, s[i])));
    }
}

static int check_rope(const char *fn, int64_t N, int64_t H, int64_t hd, q_err *err) {
    if (check_count(fn, "N", N, err) || check_count(fn, "H", H, err) || check_count(fn, "hd", hd, err) ||
        check_rows(fn, N, err))
        return -1;
    if (hd % 2) return q_err_set(err, "autograd/ops_cuda.cu: %s: head size hd = %lld is odd", fn, (long long)hd);
    // the angles live in shared memory: 48 KiB holds hd up to 6144
    if (hd * sizeof(float) > 48 * 1024)
        return q_err_set(err, "autograd/ops_cuda.cu: %s: head size hd = %lld is too large", fn, (long long)hd);
    return 0;
}

extern "C" int ag_cuda_rope_forward(float *out, const float *x, const int32_t *pos, const float *inv_freq, int64_t N,
                                    int64_t H, int64_t hd, void *stream, q_err *err) {
    if (check_rope("rope_forward", N, H, hd, err)) return -1;
    if (N == 0 || H == 0 || hd == 0) return 0;
    rope_forward_kernel<<<(unsigned)N, ROPE_THREADS, hd * sizeof(float), (cudaStream_t)stream>>>(out, x, pos,
                                                                                                 inv_freq, H, hd);
    Q_CUDA_CHECK_LAUNCH("rope_forward_kernel", err);
    return 0;
}

extern "C" int ag_cuda_rope_backward(float *dx, const float *dout, const int32_t *pos, const float *inv_freq,
                                     int64_t N, int64_t H, int64_t hd, void *stream, q_err *err) {
    if (check_rope("rope_backward", N, H, hd, err)) return -1;
    if (N == 0 || H == 0 || hd == 0) return 0;
    rope_backward_kernel<<<(unsigned)N, ROPE_THREADS, hd * sizeof(float), (cudaStream_t)stream>>>(dx, dout, pos,
                                                                                                  inv_freq, H, hd);
    Q_CUDA_CHECK_LAUNCH("rope_backward_kernel", err);
    return 0;
}

// ----------------------------------------------------------------------------
// SwiGLU: out = silu(gate) * up

__global__ void swiglu_forward_kernel(float *__restrict__ out, const float *__restrict__ gate,
                                      const float *__restrict__ up, int64_t n) {
    GRID_STRIDE(i, n) {
        const float g = gate[i];
        out[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up[i]);
    }
}

// silu'(g) = sig(g) (1 + g (1 - sig(g))), PyTorch's silu_backward.
__global__ void swiglu_backward_kernel(float *__restrict__ dgate, float *__restrict__ dup,
                                       const float *__restrict__ dout, const float *__restrict__ gate,
                                       const float *__restrict__ up, int64_t n) {
    GRID_STRIDE(i, n) {
        const float g = gate[i], e = expf(-g);
        const float sig = __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
        if (dgate) {
            const float dsilu = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, sig)));
            dgate[i] = __fadd_rn(dgate[i], __fmul_rn(__fmul_rn(__fmul_rn(dout[i], up[i]), sig), dsilu));
        }
        if (dup) dup[i] = __fadd_rn(dup[i], __fmul_rn(dout[i], __fdiv_rn(g, __fadd_rn(1.0f, e))));
    }
}

extern "C" int ag_cuda_swiglu_forward(float *out, const float *gate, const float *up, int64_t n, void *stream,
                                      q_err *err) {
    if (check_count("swiglu_forward", "n", n, err)) return -1;
    if (n == 0) return 0;
    swiglu_forward_kernel<<<blocks_for(n), THREADS, 0, (cudaStream_t)stream>>>(out, gate, up, n);
    Q_CUDA_CHECK_LAUNCH("swiglu_forward_kernel", err);
    return 0;
}

extern "C" int ag_cuda_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                                       const float *up, int64_t n, void *stream, q_err *err) {
    if (check_count("swiglu_backward", "n", n, err)) return -1;
    if (n == 0 || (!dgate && !dup)) return 0;
    swiglu_backward_kernel<<<blocks_for(n), THREADS, 0, (cudaStream_t)stream>>>(dgate, dup, dout, gate, up, n);
    Q_CUDA_CHECK_LAUNCH("swiglu_backward_kernel", err);
    return 0;
}

// ----------------------------------------------------------------------------
// residual add (out may alias a or b: an element is read before it is written)

__global__ void add_forward_kernel(float *out, const float *a, const float *b, int64_t n) {
    GRID_STRIDE(i, n) out[i] = __fadd_rn(a[i], b[i]);
}

// da and db may be the same array (x + x): one thread does both adds.
__global__ void add_backward_kernel(float *da, float *db, const float *__restrict__ dout, int64_t n) {
    GRID_STRIDE(i, n) {
        const float g = dout[i];
        if (da) da[i] = __fadd_rn(da[i], g);
        if (db) db[i] = __fadd_rn(db[i], g);
    }
}

extern "C" int ag_cuda_add_forward(float *out, const float *a, const float *b, int64_t n, void *stream, q_err *err) {
    if (check_count("add_forward", "n", n, err)) return -1;
    if (n == 0) return 0;
    add_forward_kernel<<<blocks_for(n), THREADS, 0, (cudaStream_t)stream>>>(out, a, b, n);
    Q_CUDA_CHECK_LAUNCH("add_forward_kernel", err);
    return 0;
}

extern "C" int ag_cuda_add_backward(float *da, float *db, const float *dout, int64_t n, void *stream, q_err *err) {
    if (check_count("add_backward", "n", n, err)) return -1;
    if (n == 0 || (!da && !db)) return 0;
    add_backward_kernel<<<blocks_for(n), THREADS, 0, (cudaStream_t)stream>>>(da, db, dout, n);
    Q_CUDA_CHECK_LAUNCH("add_backward_kernel", err);
    return 0;
}

// ----------------------------------------------------------------------------

extern "C" bool ag_cuda_available(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
