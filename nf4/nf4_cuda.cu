// nf4/nf4_cuda.cu: CUDA kernels for NF4/FP4 quantization and dequantization,
// bit-identical to the CPU path in nf4.c (tested against it on random inputs).
//
// nvcc contracts a*b+c into an FMA by default, which rounds once instead of
// twice and would change the last bit; every arithmetic step that must match
// the CPU uses the explicit round-to-nearest intrinsics (__fmul_rn, ...).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "core/core_cuda.h"
#include "nf4_internal.h"

// ----------------------------------------------------------------------------
// dequantization: one thread per 16 elements (8 packed bytes). Block sizes
// are multiples of 32, so 16 elements never straddle two blocks.

__constant__ float c_tables[2][16];  // [NF4, FP4][code]

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

struct dq_args {
    const uint8_t *packed;        // [ceil(numel/2)]
    const float *absmax;          // [nblocks] or NULL when nested
    const uint8_t *qabsmax;       // [nblocks] when nested
    const float *nested_absmax;   // [ceil(nblocks/256)]
    const float *nested_map;      // [256]
    float offset;
    int64_t numel;
    int log2_blocksize;
    int table;                    // 0 NF4, 1 FP4
};

template <typename T>
__global__ void nf4_dequantize_kernel(dq_args a, T *__restrict__ out) {
    const int64_t e0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 16;
    if (e0 >= a.numel) return;
    const int64_t b = e0 >> a.log2_blocksize;
    float s;
    if (a.absmax) {
        s = a.absmax[b];
    } else {  // as dequantize_blockwise then += offset: two roundings
        s = __fadd_rn(__fmul_rn(a.nested_map[a.qabsmax[b]], a.nested_absmax[b >> 8]), a.offset);
    }
    const float *table = c_tables[a.table];
    const uint8_t *in = a.packed + e0 / 2;
    if (e0 + 16 <= a.numel) {
        uint8_t bytes[8];
        if (((uintptr_t)in & 7) == 0) {
            *(uint2 *)bytes = *(const uint2 *)in;
        } else {
            for (int i = 0; i < 8; i++) bytes[i] = in[i];
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            out[e0 + 2 * i] = from_float<T>(__fmul_rn(table[bytes[i] >> 4], s));
            out[e0 + 2 * i + 1] = from_float<T>(__fmul_rn(table[bytes[i] & 15], s));
        }
    } else {  // the tail of the tensor
        for (int64_t e = e0; e < a.numel; e++) {
            uint8_t byte = in[(e - e0) / 2];
            int code = (e & 1) ? (byte & 15) : (byte >> 4);
            out[e] = from_float<T>(__fmul_rn(table[code], s));
        }
    }
}

static int log2_exact(int64_t v) {
    int l = 0;
    while ((int64_t)1 << l < v) l++;
    return l;
}

static int upload_tables(q_err *err) {
    static bool done = false;  // per process; the tables never change
    if (done) return 0;
    float t[2][16];
    memcpy(t[0], nf4_code_table(NF4_QTYPE_NF4), sizeof t[0]);
    memcpy(t[1], nf4_code_table(NF4_QTYPE_FP4), sizeof t[1]);
    Q_CUDA_CHECK(cudaMemcpyToSymbol(c_tables, t, sizeof t), err);
    done = true;
    return 0;
}

extern "C" int nf4_cuda_dequantize(const nf4_view *q, void *out, q_dtype out_dtype, void *stream, q_err *err) {
    if (nf4_blocksize_check(q->blocksize, err)) return -1;
    if (upload_tables(err)) return -1;
    dq_args a = {q->packed, q->absmax, q->qabsmax, q->nested_absmax, q->nested_map, q->offset,
                 q->numel, log2_exact(q->blocksize), q->qtype == NF4_QTYPE_FP4};
    if (!a.absmax && !(a.qabsmax && a.nested_absmax && a.nested_map))
        return q_err_set(err, "nf4 view has neither absmax nor nested scales");
    const int threads = 256;
    const int64_t groups = (q->numel + 15) / 16;
    const unsigned grid = (unsigned)((groups + threads - 1) / threads);
    cudaStream_t s = (cudaStream_t)stream;
    switch (out_dtype) {
    case Q_DTYPE_F32: nf4_dequantize_kernel<float><<<grid, threads, 0, s>>>(a, (float *)out); break;
    case Q_DTYPE_F16: nf4_dequantize_kernel<__half><<<grid, threads, 0, s>>>(a, (__half *)out); break;
    case Q_DTYPE_BF16:
        nf4_dequantize_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(a, (__nv_bfloat16 *)out);
        break;
    default: return q_err_set(err, "cannot dequantize to %s", q_dtype_name(out_dtype));
    }
    Q_CUDA_CHECK_LAUNCH("nf4_dequantize_kernel", err);
    return 0;
}

// ----------------------------------------------------------------------------
// 4-bit quantization: one warp per quantization block, each lane owning pairs
// of elements (one output byte per pair). The rules are the CPU path's.

struct q_args {
    nf4_bounds bounds;
    int64_t numel;
    int64_t blocksize;
    int64_t nblocks;
};

__device__ __forceinline__ int bucket_of(float x, const float *mid) {
    int k = 0;
#pragma unroll
    for (int i = 0; i < 15; i++) k += x > mid[i];
    return k;
}

template <typename T>
__global__ void nf4_quantize_kernel(q_args a, const T *__restrict__ x, uint8_t *__restrict__ packed,
                                    float *__restrict__ absmax, unsigned long long *bad_index) {
    const int64_t b = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (b >= a.nblocks) return;  // whole warp exits together
    const int64_t start = b * a.blocksize;
    const int64_t len = start + a.blocksize <= a.numel ? a.blocksize : a.numel - start;
    float amax = 0.0f;
    for (int64_t i = lane; i < len; i += 32) {
        float v = to_float<T>(x[start + i]);
        if (!isfinite(v)) atomicMin(bad_index, (unsigned long long)(start + i));
        amax = fmaxf(amax, fabsf(v));
    }
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) absmax[b] = amax;
    const float am = fmaxf(amax, 1e-38f);
    const bool full = len == a.blocksize;
    const float r = __fdiv_rn(1.0f, am);
    for (int64_t p = lane; 2 * p < len; p += 32) {
        float v0 = to_float<T>(x[start + 2 * p]);
        float v1 = 2 * p + 1 < len ? to_float<T>(x[start + 2 * p + 1]) : 0.0f;
        float s0 = full ? __fmul_rn(v0, r) : __fdiv_rn(v0, am);
        float s1 = 2 * p + 1 < len ? (full ? __fmul_rn(v1, r) : __fdiv_rn(v1, am)) : 0.0f;
        uint8_t hi = a.bounds.order[bucket_of(s0, a.bounds.mid)];
        uint8_t lo = a.bounds.order[bucket_of(s1, a.bounds.mid)];
        packed[start / 2 + p] = (uint8_t)(hi << 4 | lo);
    }
}

extern "C" int nf4_cuda_quantize_blocks(const void *x, q_dtype dtype, int64_t numel, nf4_qtype qt, int64_t blocksize,
                                        uint8_t *packed, float *absmax, void *stream, q_err *err) {
    if (nf4_blocksize_check(blocksize, err)) return -1;
    if (numel <= 0) return q_err_set(err, "cannot quantize an empty tensor");
    q_args a;
    nf4_bounds_init(qt, &a.bounds);
    a.numel = numel;
    a.blocksize = blocksize;
    a.nblocks = nf4_nblocks(numel, blocksize);
    cudaStream_t s = (cudaStream_t)stream;
    unsigned long long *d_bad, h_bad = ~0ull;
    Q_CUDA_CHECK(cudaMallocAsync((void **)&d_bad, sizeof h_bad, s), err);
    Q_CUDA_CHECK(cudaMemcpyAsync(d_bad, &h_bad, sizeof h_bad, cudaMemcpyHostToDevice, s), err);
    const int warps = 8;
    const unsigned grid = (unsigned)((a.nblocks + warps - 1) / warps);
    switch (dtype) {
    case Q_DTYPE_F32:
        nf4_quantize_kernel<float><<<grid, warps * 32, 0, s>>>(a, (const float *)x, packed, absmax, d_bad);
        break;
    case Q_DTYPE_F16:
        nf4_quantize_kernel<__half><<<grid, warps * 32, 0, s>>>(a, (const __half *)x, packed, absmax, d_bad);
        break;
    case Q_DTYPE_BF16:
        nf4_quantize_kernel<__nv_bfloat16>
            <<<grid, warps * 32, 0, s>>>(a, (const __nv_bfloat16 *)x, packed, absmax, d_bad);
        break;
    default:
        cudaFreeAsync(d_bad, s);
        return q_err_set(err, "cannot quantize dtype %s: expected F32, F16 or BF16", q_dtype_name(dtype));
    }
    Q_CUDA_CHECK_LAUNCH("nf4_quantize_kernel", err);
    Q_CUDA_CHECK(cudaMemcpyAsync(&h_bad, d_bad, sizeof h_bad, cudaMemcpyDeviceToHost, s), err);
    Q_CUDA_CHECK(cudaFreeAsync(d_bad, s), err);
    Q_CUDA_CHECK(cudaStreamSynchronize(s), err);
    if (h_bad != ~0ull)
        return q_err_set(err, "non-finite weight at element %llu: refusing to quantize", h_bad);
    return 0;
}

// ----------------------------------------------------------------------------
// double quantization: one thread block of 256 per nested block

__global__ void nf4_double_quantize_kernel(const float *__restrict__ absmax, int64_t nblocks,
                                           const float *__restrict__ map, float offset,
                                           uint8_t *__restrict__ qabsmax, float *__restrict__ nested_absmax) {
    __shared__ float s_map[256];
    __shared__ float s_max[8];
    const int t = threadIdx.x;
    const int64_t i = (int64_t)blockIdx.x * 256 + t;
    s_map[t] = map[t];
    float v = i < nblocks ? __fsub_rn(absmax[i], offset) : 0.0f;
    float m = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((t & 31) == 0) s_max[t / 32] = m;
    __syncthreads();
    m = s_max[0];
    for (int w = 1; w < 8; w++) m = fmaxf(m, s_max[w]);
    if (t == 0) nested_absmax[blockIdx.x] = m;
    if (i >= nblocks) return;
    if (!(m > 0.0f)) {
        qabsmax[i] = 0;  // 0/0: every code decodes to the offset; bitsandbytes writes 0
        return;
    }
    const float x = __fdiv_rn(v, m);
    int lo = 0, hi = 255;  // the entry at or below x, then the strictly closer neighbour
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (s_map[mid] <= x) lo = mid;
        else hi = mid - 1;
    }
    if (lo < 255 && fabsf(__fsub_rn(x, s_map[lo + 1])) < fabsf(__fsub_rn(x, s_map[lo]))) lo++;
    qabsmax[i] = (uint8_t)lo;
}

extern "C" int nf4_cuda_double_quantize(const float *absmax, int64_t nblocks, const float *map, float offset,
                                        uint8_t *qabsmax, float *nested_absmax, void *stream, q_err *err) {
    if (nblocks <= 0) return q_err_set(err, "double quantization of an empty absmax array");
    const unsigned grid = (unsigned)nf4_nblocks(nblocks, NF4_NESTED_BLOCKSIZE);
    nf4_double_quantize_kernel<<<grid, 256, 0, (cudaStream_t)stream>>>(absmax, nblocks, map, offset, qabsmax,
                                                                        nested_absmax);
    Q_CUDA_CHECK_LAUNCH("nf4_double_quantize_kernel", err);
    return 0;
}

extern "C" bool nf4_cuda_available(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
