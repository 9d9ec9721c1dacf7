// autograd/attention_cuda.cu: causal grouped-query attention over packed
// documents on the GPU, with the semantics of ag_attention_forward/backward
// in ops.c (tested against them in tests/test_attention_cuda.c).
//
// Design: a memory-efficient ("flash") kernel on CUDA cores, all fp32. No
// score matrix is ever stored; the backward recomputes the probabilities
// from the forward's log-sum-exp.
//   forward  grid (N/16, H), 4 warps of 4 query rows each. The block's 16
//            queries sit in shared memory; it walks the keys its rows can
//            reach 32 at a time (K, V tiles in shared memory). Lane j scores
//            key k0 + j; an online softmax (running max m, running sum l,
//            rescaled by exp(m_old - m_new)) updates the output accumulators
//            in registers, lane i holding dims i, i + 32, ... of each row.
//   backward Drow[n,h] = dout . out first (the scratch), then two kernels:
//            dq by query tiles (as the forward: lane j rebuilds p and
//            ds = p (dp - Drow) for key k0 + j), and dk, dv by key tiles
//            (grid (N/16, Hkv), a warp owns 4 keys; the block walks the
//            queries that can reach its keys 32 at a time, for each query
//            head of the kv group, lane i taking query i).
// Determinism: every output element is owned by one thread (dq by the
// query's warp, dk/dv by the key's warp), which adds in a fixed order, so
// no float atomics are needed and runs are bitwise reproducible. The sums
// run in a different order than the CPU's, so results agree to fp32
// rounding, not bit for bit.
//
// Precondition (not checked: start lives on the device): start[] is
// non-decreasing with start[n] <= n (documents are contiguous runs). The
// forward and dq kernels only need start[n] <= n; the dk/dv kernel stops
// walking queries once start[first query of a tile] passes its last key,
// which is only right for non-decreasing start.
#include <stdint.h>

#include "autograd/cuda_internal.h"

enum {
    ATT_WARPS = 4,
    ATT_THREADS = 32 * ATT_WARPS,
    ATT_RPW = 4,                     // query rows (dq, forward) or keys (dk/dv) per warp
    ATT_BQ = ATT_WARPS * ATT_RPW,    // 16 rows per block
    ATT_BK = 32,                     // the walked tile: a key (or query) per lane
    ATT_MAX_HD = 256,                // 8 dims per lane in registers
    ATT_DEFAULT_SMEM = 48 * 1024,    // beyond this a kernel must opt in
};

static const unsigned FULL = 0xffffffffu;

// Same as ops.c's attn_scale: HF's eager path scales the q . k products.
static float attn_scale(int64_t hd) { return (float)(1.0 / sqrt((double)hd)); }

// Dims per lane (NC chunks of 32) for a head size; the kernels are templated
// on it so the accumulators stay in registers and small heads waste nothing.
static int attn_chunks(int64_t hd) { return hd <= 32 ? 1 : hd <= 64 ? 2 : hd <= 128 ? 4 : 8; }

// Rows read lane-per-row (lane j reads row j at the same column) use an odd
// stride, so the 32 lanes hit 32 different banks.
static __host__ __device__ int odd_stride(int hd) { return hd | 1; }

static size_t forward_smem(int hd) {  // Q [16][hd], K [32][odd], V [32][hd]
    return (size_t)(ATT_BQ * hd + ATT_BK * odd_stride(hd) + ATT_BK * hd) * sizeof(float);
}
static size_t backward_smem(int hd) {  // two [16][hd] tiles, two [32][odd] tiles (either kernel)
    return (size_t)(2 * ATT_BQ * hd + 2 * ATT_BK * odd_stride(hd)) * sizeof(float);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// Butterfly sum: every lane ends with the same value (a + b == b + a).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// rows [row0, row0 + rows) of x (head `head` of `heads`, hd wide) into
// s[rows][stride]; rows at or past N are zeros.
__device__ void load_rows(float *s, int stride, const float *__restrict__ x, int64_t row0, int rows, int64_t N,
                          int64_t heads, int64_t head, int hd) {
    for (int idx = threadIdx.x; idx < rows * hd; idx += blockDim.x) {
        const int r = idx / hd, d = idx - r * hd;
        const int64_t n = row0 + r;
        s[r * stride + d] = n < N ? x[(n * heads + head) * hd + d] : 0.0f;
    }
}

// The first key any row of the query tile [q0, qlast] reaches.
__device__ int64_t first_key(const int32_t *__restrict__ start, int64_t q0, int64_t qlast) {
    int64_t k = qlast;
    for (int64_t n = q0; n <= qlast; n++) k = min64(k, start[n]);
    return k;
}

// ----------------------------------------------------------------------------
// forward

template <int NC>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_forward_kernel(float *__restrict__ out, float *__restrict__ lse, const float *__restrict__ q,
                        const float *__restrict__ k, const float *__restrict__ v,
                        const int32_t *__restrict__ start, int64_t N, int64_t H, int64_t Hkv, int hd, float scale) {
    extern __shared__ float smem[];
    const int ks = odd_stride(hd);
    float *Qs = smem;                // [BQ][hd]: read as broadcasts
    float *Ks = Qs + ATT_BQ * hd;    // [BK][ks]: lane j reads row j
    float *Vs = Ks + ATT_BK * ks;    // [BK][hd]: lanes read consecutive dims of a row
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t h = blockIdx.y, g = h / (H / Hkv);
    const int64_t q0 = (int64_t)blockIdx.x * ATT_BQ, qlast = min64(q0 + ATT_BQ, N) - 1;

    load_rows(Qs, hd, q, q0, ATT_BQ, N, H, h, hd);  // first read after the loop's barrier
    const int64_t kbegin = first_key(start, q0, qlast);

    int64_t rn[ATT_RPW], rst[ATT_RPW];  // the warp's rows and their first keys
    float m[ATT_RPW], l[ATT_RPW], acc[ATT_RPW][NC];
#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        rn[r] = q0 + warp * ATT_RPW + r;
        rst[r] = rn[r] < N ? start[rn[r]] : rn[r] + 1;  // past N: an empty range
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++) acc[r][c] = 0.0f;
    }
    const float *qw = Qs + warp * ATT_RPW * hd;

    // Every thread runs every iteration (bounds are block-uniform): rows past
    // N still reach the barriers and the shuffles.
    for (int64_t k0 = kbegin; k0 <= qlast; k0 += ATT_BK) {
        for (int idx = threadIdx.x; idx < ATT_BK * hd; idx += ATT_THREADS) {
            const int j = idx / hd, d = idx - j * hd;
            const int64_t kj = k0 + j;
            float kx = 0.0f, vx = 0.0f;
            if (kj <= qlast) {
                const int64_t off = (kj * Hkv + g) * hd + d;
                kx = k[off];
                vx = v[off];
            }
            Ks[j * ks + d] = kx;
            Vs[j * hd + d] = vx;
        }
        __syncthreads();

        // lane j scores key k0 + j against the warp's 4 rows
        float s[ATT_RPW];
#pragma unroll
        for (int r = 0; r < ATT_RPW; r++) s[r] = 0.0f;
        const float *kr = Ks + lane * ks;
        for (int d = 0; d < hd; d++) {
            const float kd = kr[d];
#pragma unroll
            for (int r = 0; r < ATT_RPW; r++) s[r] = fmaf(qw[r * hd + d], kd, s[r]);
        }

        // online softmax, one row at a time (the branch is warp-uniform)
        const int64_t kj = k0 + lane;
        float p[ATT_RPW];
#pragma unroll
        for (int r = 0; r < ATT_RPW; r++) {
            const bool valid = rn[r] < N && kj >= rst[r] && kj <= rn[r];
            const float sc = valid ? s[r] * scale : -INFINITY;
            const float mt = warp_max(sc);
            p[r] = 0.0f;
            if (mt != -INFINITY) {  // some key of this tile is in the row's range
                const float mnew = fmaxf(m[r], mt);
                const float corr = expf(m[r] - mnew);  // 0 on the row's first tile (m = -inf)
                p[r] = valid ? expf(sc - mnew) : 0.0f;
                l[r] = l[r] * corr + warp_sum(p[r]);
#pragma unroll
                for (int c = 0; c < NC; c++) acc[r][c] *= corr;
                m[r] = mnew;
            }
        }

        // acc += P V: p of key j broadcast from lane j, keys in order
        for (int j = 0; j < ATT_BK; j++) {
            float vj[NC];
#pragma unroll
            for (int c = 0; c < NC; c++) vj[c] = c * 32 + lane < hd ? Vs[j * hd + c * 32 + lane] : 0.0f;
#pragma unroll
            for (int r = 0; r < ATT_RPW; r++) {
                const float pj = __shfl_sync(FULL, p[r], j);
#pragma unroll
                for (int c = 0; c < NC; c++) acc[r][c] = fmaf(pj, vj[c], acc[r][c]);
            }
        }
        __syncthreads();  // the tiles are overwritten next
    }

    // A row past N has no key; every other row has at least key n (l >= 1).
#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        if (rn[r] >= N) continue;
        float *o = out + (rn[r] * H + h) * hd;
#pragma unroll
        for (int c = 0; c < NC; c++)
            if (c * 32 + lane < hd) o[c * 32 + lane] = acc[r][c] / l[r];
        if (lane == 0) lse[rn[r] * H + h] = m[r] + logf(l[r]);
    }
}

// ----------------------------------------------------------------------------
// backward

// Drow[r] = dout[r,:] . out[r,:] over the N*H rows, a warp per row.
__global__ void attn_rowdot_kernel(float *__restrict__ Drow, const float *__restrict__ dout,
                                   const float *__restrict__ out, int64_t rows, int hd) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x / 32;
    const int64_t stride = (int64_t)gridDim.x * wpb;
    for (int64_t r = (int64_t)blockIdx.x * wpb + threadIdx.x / 32; r < rows; r += stride) {  // warp-uniform
        float s = 0.0f;
        for (int d = lane; d < hd; d += 32) s = fmaf(dout[r * hd + d], out[r * hd + d], s);
        s = warp_sum(s);
        if (lane == 0) Drow[r] = s;
    }
}

// dq by query tiles: the forward's walk, with p = exp(s - lse) recomputed,
// dp = dout . v and ds = p (dp - Drow) for key k0 + lane; dq += scale ds k.
template <int NC>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_dq_kernel(float *__restrict__ dq, const float *__restrict__ dout, const float *__restrict__ q,
                   const float *__restrict__ k, const float *__restrict__ v, const float *__restrict__ lse,
                   const float *__restrict__ Drow, const int32_t *__restrict__ start, int64_t N, int64_t H,
                   int64_t Hkv, int hd, float scale) {
    extern __shared__ float smem[];
    const int ks = odd_stride(hd);
    float *Qs = smem;                 // [BQ][hd]: broadcasts
    float *dOs = Qs + ATT_BQ * hd;    // [BQ][hd]: broadcasts
    float *Ks = dOs + ATT_BQ * hd;    // [BK][ks]: lane j reads row j, then rows by dims
    float *Vs = Ks + ATT_BK * ks;     // [BK][ks]: lane j reads row j
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t h = blockIdx.y, g = h / (H / Hkv);
    const int64_t q0 = (int64_t)blockIdx.x * ATT_BQ, qlast = min64(q0 + ATT_BQ, N) - 1;

    load_rows(Qs, hd, q, q0, ATT_BQ, N, H, h, hd);
    load_rows(dOs, hd, dout, q0, ATT_BQ, N, H, h, hd);
    const int64_t kbegin = first_key(start, q0, qlast);

    int64_t rn[ATT_RPW], rst[ATT_RPW];
    float rl[ATT_RPW], rD[ATT_RPW], acc[ATT_RPW][NC];
#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        rn[r] = q0 + warp * ATT_RPW + r;
        const bool in = rn[r] < N;
        rst[r] = in ? start[rn[r]] : rn[r] + 1;
        rl[r] = in ? lse[rn[r] * H + h] : 0.0f;
        rD[r] = in ? Drow[rn[r] * H + h] : 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++) acc[r][c] = 0.0f;
    }
    const float *qw = Qs + warp * ATT_RPW * hd, *dow = dOs + warp * ATT_RPW * hd;

    for (int64_t k0 = kbegin; k0 <= qlast; k0 += ATT_BK) {  // block-uniform bounds
        for (int idx = threadIdx.x; idx < ATT_BK * hd; idx += ATT_THREADS) {
            const int j = idx / hd, d = idx - j * hd;
            const int64_t kj = k0 + j;
            float kx = 0.0f, vx = 0.0f;
            if (kj <= qlast) {
                const int64_t off = (kj * Hkv + g) * hd + d;
                kx = k[off];
                vx = v[off];
            }
            Ks[j * ks + d] = kx;
            Vs[j * ks + d] = vx;
        }
        __syncthreads();

        float s[ATT_RPW], dp[ATT_RPW];
#pragma unroll
        for (int r = 0; r < ATT_RPW; r++) s[r] = dp[r] = 0.0f;
        const float *kr = Ks + lane * ks, *vr = Vs + lane * ks;
        for (int d = 0; d < hd; d++) {
            const float kd = kr[d], vd = vr[d];
#pragma unroll
            for (int r = 0; r < ATT_RPW; r++) {
                s[r] = fmaf(qw[r * hd + d], kd, s[r]);
                dp[r] = fmaf(dow[r * hd + d], vd, dp[r]);
            }
        }

        const int64_t kj = k0 + lane;
        float ds[ATT_RPW];
        bool any = false;
#pragma unroll
        for (int r = 0; r < ATT_RPW; r++) {
            const bool valid = rn[r] < N && kj >= rst[r] && kj <= rn[r];
            ds[r] = valid ? expf(s[r] * scale - rl[r]) * (dp[r] - rD[r]) : 0.0f;
            any = any || valid;
        }

        if (__any_sync(FULL, any)) {  // warp-uniform; skips tiles wholly outside the warp's rows
            for (int j = 0; j < ATT_BK; j++) {
                float kj_d[NC];
#pragma unroll
                for (int c = 0; c < NC; c++) kj_d[c] = c * 32 + lane < hd ? Ks[j * ks + c * 32 + lane] : 0.0f;
#pragma unroll
                for (int r = 0; r < ATT_RPW; r++) {
                    const float dsj = __shfl_sync(FULL, ds[r], j);
#pragma unroll
                    for (int c = 0; c < NC; c++) acc[r][c] = fmaf(dsj, kj_d[c], acc[r][c]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < ATT_RPW; r++) {
        if (rn[r] >= N) continue;
        float *o = dq + (rn[r] * H + h) * hd;
#pragma unroll
        for (int c = 0; c < NC; c++)
            if (c * 32 + lane < hd) o[c * 32 + lane] += scale * acc[r][c];
    }
}

// dk, dv by key tiles: grid (N/16, Hkv), a warp owns 4 keys of kv head g.
// Queries before the tile never reach it (causal), so the walk starts at its
// first key; it stops at the first query tile whose first query's document
// starts past the last key (start is non-decreasing). For each query tile,
// each head of the group in order: lane i takes query n0 + i,
//   dv_j += p_ij dout_i,  dk_j += scale ds_ij q_i.
template <int NC>
__global__ void __launch_bounds__(ATT_THREADS)
    attn_dkdv_kernel(float *__restrict__ dk, float *__restrict__ dv, const float *__restrict__ dout,
                     const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,
                     const float *__restrict__ lse, const float *__restrict__ Drow,
                     const int32_t *__restrict__ start, int64_t N, int64_t H, int64_t Hkv, int hd, float scale) {
    extern __shared__ float smem[];
    const int ks = odd_stride(hd);
    float *Kt = smem;                 // [BQ][hd]: the block's keys, broadcasts
    float *Vt = Kt + ATT_BQ * hd;     // [BQ][hd]
    float *Qs = Vt + ATT_BQ * hd;     // [BK][ks]: lane i reads row i, then rows by dims
    float *dOs = Qs + ATT_BK * ks;    // [BK][ks]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t g = blockIdx.y, G = H / Hkv;
    const int64_t j0 = (int64_t)blockIdx.x * ATT_BQ, jlast = min64(j0 + ATT_BQ, N) - 1;

    load_rows(Kt, hd, k, j0, ATT_BQ, N, Hkv, g, hd);  // first read after the loop's first barrier
    load_rows(Vt, hd, v, j0, ATT_BQ, N, Hkv, g, hd);

    int64_t rj[ATT_RPW];  // the warp's keys
    float dk_acc[ATT_RPW][NC], dv_acc[ATT_RPW][NC];
#pragma unroll
    for (int t = 0; t < ATT_RPW; t++) {
        rj[t] = j0 + warp * ATT_RPW + t;
#pragma unroll
        for (int c = 0; c < NC; c++) dk_acc[t][c] = dv_acc[t][c] = 0.0f;
    }
    const float *kw = Kt + warp * ATT_RPW * hd, *vw = Vt + warp * ATT_RPW * hd;

    // Block-uniform bounds and break (every thread reads the same start[n0]).
    for (int64_t n0 = j0; n0 < N; n0 += ATT_BK) {
        if (start[n0] > jlast) break;
        for (int64_t hh = 0; hh < G; hh++) {
            const int64_t h = g * G + hh;
            load_rows(Qs, ks, q, n0, ATT_BK, N, H, h, hd);
            load_rows(dOs, ks, dout, n0, ATT_BK, N, H, h, hd);
            const int64_t ni = n0 + lane;  // this lane's query
            const bool in = ni < N;
            const float li = in ? lse[ni * H + h] : 0.0f, Di = in ? Drow[ni * H + h] : 0.0f;
            const int64_t sti = in ? start[ni] : ni + 1;
            __syncthreads();

            float s[ATT_RPW], dp[ATT_RPW];
#pragma unroll
            for (int t = 0; t < ATT_RPW; t++) s[t] = dp[t] = 0.0f;
            const float *qr = Qs + lane * ks, *dor = dOs + lane * ks;
            for (int d = 0; d < hd; d++) {
                const float qd = qr[d], od = dor[d];
#pragma unroll
                for (int t = 0; t < ATT_RPW; t++) {
                    s[t] = fmaf(qd, kw[t * hd + d], s[t]);
                    dp[t] = fmaf(od, vw[t * hd + d], dp[t]);
                }
            }

            float p[ATT_RPW], ds[ATT_RPW];
            bool any = false;
#pragma unroll
            for (int t = 0; t < ATT_RPW; t++) {
                const bool valid = in && ni >= rj[t] && sti <= rj[t];  // key rj[t] in [start[ni], ni]
                p[t] = valid ? expf(s[t] * scale - li) : 0.0f;
                ds[t] = valid ? p[t] * (dp[t] - Di) : 0.0f;
                any = any || valid;
            }

            if (__any_sync(FULL, any)) {  // warp-uniform
                for (int i = 0; i < ATT_BK; i++) {  // queries in order
                    float qi[NC], oi[NC];
#pragma unroll
                    for (int c = 0; c < NC; c++) {
                        const bool dim = c * 32 + lane < hd;
                        qi[c] = dim ? Qs[i * ks + c * 32 + lane] : 0.0f;
                        oi[c] = dim ? dOs[i * ks + c * 32 + lane] : 0.0f;
                    }
#pragma unroll
                    for (int t = 0; t < ATT_RPW; t++) {
                        const float pi = __shfl_sync(FULL, p[t], i), dsi = __shfl_sync(FULL, ds[t], i);
#pragma unroll
                        for (int c = 0; c < NC; c++) {
                            dv_acc[t][c] = fmaf(pi, oi[c], dv_acc[t][c]);
                            dk_acc[t][c] = fmaf(dsi, qi[c], dk_acc[t][c]);
                        }
                    }
                }
            }
            __syncthreads();  // Qs, dOs are overwritten next
        }
    }

#pragma unroll
    for (int t = 0; t < ATT_RPW; t++) {
        if (rj[t] >= N) continue;
        const int64_t off = (rj[t] * Hkv + g) * hd;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = c * 32 + lane;
            if (d < hd) {
                dv[off + d] += dv_acc[t][c];
                dk[off + d] += scale * dk_acc[t][c];
            }
        }
    }
}

// ----------------------------------------------------------------------------
// entry points

// -1: refused (err set); 0: nothing to do; 1: run.
static int attn_check(const char *fn, int64_t N, int64_t H, int64_t Hkv, int64_t hd, q_err *err) {
    const char *names[] = {"N", "H", "Hkv", "hd"};
    const int64_t vals[] = {N, H, Hkv, hd};
    for (int i = 0; i < 4; i++)
        if (vals[i] < 0)
            return q_err_set(err, "autograd/attention_cuda.cu: %s: %s = %lld is negative", fn, names[i],
                             (long long)vals[i]);
    if (hd > ATT_MAX_HD)
        return q_err_set(err, "autograd/attention_cuda.cu: %s: head size hd = %lld is larger than %d", fn,
                         (long long)hd, ATT_MAX_HD);
    if (N == 0 || H == 0 || hd == 0) return 0;
    if (Hkv == 0 || H % Hkv)
        return q_err_set(err, "autograd/attention_cuda.cu: %s: H = %lld is not a multiple of Hkv = %lld", fn,
                         (long long)H, (long long)Hkv);
    if (H > 65535)  // the grid's y dimension
        return q_err_set(err, "autograd/attention_cuda.cu: %s: H = %lld heads is too many", fn, (long long)H);
    if (N > INT32_MAX)  // start[] is int32
        return q_err_set(err, "autograd/attention_cuda.cu: %s: N = %lld tokens is too many", fn, (long long)N);
    return 1;
}

// Kernels over 48 KiB of dynamic shared memory must say so first: the
// forward from hd = 154 (80.1 KiB at hd = 256), the backward kernels from
// hd = 128 (96.3 KiB at hd = 256, under the 99 KiB of sm86/sm89; sm80 and
// sm90 allow more).
template <typename Kernel>
static int attn_smem_opt_in(Kernel kernel, size_t bytes, q_err *err) {
    if (bytes > ATT_DEFAULT_SMEM)
        Q_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), err);
    return 0;
}

template <int NC>
static int attn_forward_run(float *out, float *lse, const float *q, const float *k, const float *v,
                            const int32_t *start, int64_t N, int64_t H, int64_t Hkv, int hd, cudaStream_t s,
                            q_err *err) {
    const size_t smem = forward_smem(hd);
    if (attn_smem_opt_in(attn_forward_kernel<NC>, smem, err)) return -1;
    const dim3 grid((unsigned)((N + ATT_BQ - 1) / ATT_BQ), (unsigned)H);
    attn_forward_kernel<NC><<<grid, ATT_THREADS, smem, s>>>(out, lse, q, k, v, start, N, H, Hkv, hd, attn_scale(hd));
    Q_CUDA_CHECK_LAUNCH("attn_forward_kernel", err);
    return 0;
}

extern "C" int ag_cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                                         const int32_t *start, int64_t N, int64_t H, int64_t Hkv, int64_t hd,
                                         void *stream, q_err *err) {
    const int rc = attn_check("attention_forward", N, H, Hkv, hd, err);
    if (rc <= 0) return rc;
    cudaStream_t s = (cudaStream_t)stream;
    switch (attn_chunks(hd)) {
    case 1: return attn_forward_run<1>(out, lse, q, k, v, start, N, H, Hkv, (int)hd, s, err);
    case 2: return attn_forward_run<2>(out, lse, q, k, v, start, N, H, Hkv, (int)hd, s, err);
    case 4: return attn_forward_run<4>(out, lse, q, k, v, start, N, H, Hkv, (int)hd, s, err);
    default: return attn_forward_run<8>(out, lse, q, k, v, start, N, H, Hkv, (int)hd, s, err);
    }
}

extern "C" int64_t ag_cuda_attention_backward_scratch_floats(int64_t N, int64_t H) {
    if (N <= 0 || H <= 0) return 0;
    return N * H;
}

template <int NC>
static int attn_backward_run(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                             const float *v, const float *out, const float *lse, const int32_t *start, int64_t N,
                             int64_t H, int64_t Hkv, int hd, float *Drow, cudaStream_t s, q_err *err) {
    const float scale = attn_scale(hd);
    const int64_t rows = N * H, wpb = ATT_THREADS / 32;
    const int64_t blocks = (rows + wpb - 1) / wpb < (1 << 20) ? (rows + wpb - 1) / wpb : (1 << 20);
    attn_rowdot_kernel<<<(unsigned)blocks, ATT_THREADS, 0, s>>>(Drow, dout, out, rows, hd);
    Q_CUDA_CHECK_LAUNCH("attn_rowdot_kernel", err);

    const size_t smem = backward_smem(hd);
    const unsigned tiles = (unsigned)((N + ATT_BQ - 1) / ATT_BQ);
    if (attn_smem_opt_in(attn_dq_kernel<NC>, smem, err)) return -1;
    attn_dq_kernel<NC><<<dim3(tiles, (unsigned)H), ATT_THREADS, smem, s>>>(dq, dout, q, k, v, lse, Drow, start, N,
                                                                         H, Hkv, hd, scale);
    Q_CUDA_CHECK_LAUNCH("attn_dq_kernel", err);

    if (attn_smem_opt_in(attn_dkdv_kernel<NC>, smem, err)) return -1;
    attn_dkdv_kernel<NC><<<dim3(tiles, (unsigned)Hkv), ATT_THREADS, smem, s>>>(dk, dv, dout, q, k, v, lse, Drow,
                                                                             start, N, H, Hkv, hd, scale);
    Q_CUDA_CHECK_LAUNCH("attn_dkdv_kernel", err);
    return 0;
}

extern "C" int ag_cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                                          const float *k, const float *v, const float *out, const float *lse,
                                          const int32_t *start, int64_t N, int64_t H, int64_t Hkv, int64_t hd,
                                          float *scratch, void *stream, q_err *err) {
    const int rc = attn_check("attention_backward", N, H, Hkv, hd, err);
    if (rc <= 0) return rc;
    if (!dq || !dk || !dv)
        return q_err_set(err, "autograd/attention_cuda.cu: attention_backward: dq, dk and dv are all required");
    if (!scratch)
        return q_err_set(err, "autograd/attention_cuda.cu: attention_backward: no scratch "
                              "(ag_cuda_attention_backward_scratch_floats)");
    cudaStream_t s = (cudaStream_t)stream;
    // the same call for each register tile width
#define RUN_BACKWARD(NC) \
    attn_backward_run<NC>(dq, dk, dv, dout, q, k, v, out, lse, start, N, H, Hkv, (int)hd, scratch, s, err)
    switch (attn_chunks(hd)) {
    case 1: return RUN_BACKWARD(1);
    case 2: return RUN_BACKWARD(2);
    case 4: return RUN_BACKWARD(4);
    default: return RUN_BACKWARD(8);
    }
#undef RUN_BACKWARD
}
