// autograd/loss_cuda.cu: the loss head on the device, ag_cuda_cross_entropy,
// with the semantics of the CPU ag_cross_entropy in ops.c and tested against
// it (tests/test_loss_cuda.c).
//
// How: rows of h are taken tc = min(token_chunk, N) at a time (all of them,
// ignored rows included: gathering the valid rows would need a device-side
// compaction, and a masked row only costs its share of the GEMMs), and the
// vocabulary vc = min(vocab_chunk, V) columns at a time, so the logits held at
// once are tc * vc floats (plus three floats per row of statistics), never
// N * V. Per row chunk:
//   pass 1: for each vocabulary chunk, a GEMM logits = h_rows Wlm_chunk^T in
//           the context's precision, then a kernel (a block per row) that
//           merges the chunk into the row's running max and sum (online
//           log-sum-exp) and catches the target's logit; after the last chunk
//           it writes the row's loss (double) and keeps the lse for pass 2.
//   pass 2 (when dh is wanted): for each vocabulary chunk, the logits again
//           (unless the whole vocabulary was one chunk: then pass 1's are
//           still there, as on the CPU), a kernel turning them into
//           dlogits = grad_scale (softmax - onehot) (zero rows for ignored
//           targets), and a GEMM dh_rows += dlogits Wlm_chunk.
// The per-row losses are copied to the host and summed in token order in
// double, as the CPU sums them.
//
// Determinism: no atomics. A row's reductions run in one block, as a fixed
// tree (each thread walks its strided columns in order, then warp shuffles),
// dh is only written by GEMMs on one stream, and the host sums in token
// order, so the same inputs give the same bits on the same device.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "autograd/cuda_internal.h"

static const char *const WHERE = "autograd/loss_cuda.cu: cross_entropy";

// ----------------------------------------------------------------------------
// block reductions (blockDim.x a multiple of 32, at most 1024). The result
// reaches every thread. The second __syncthreads keeps the next call from
// overwriting the shared slots before every thread has read the result.

static __device__ float ce_block_max(float v) {
    __shared__ float warp_vals[32];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, nwarps = blockDim.x / 32;
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? warp_vals[lane] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// In double, as the CPU adds a chunk's exponentials.
static __device__ double ce_block_sum(double v) {
    __shared__ double warp_vals[32];
    __shared__ double total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, nwarps = blockDim.x / 32;
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nwarps ? warp_vals[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// ----------------------------------------------------------------------------
// kernels: one block per row of the chunk; every pointer is already offset to
// the chunk's first row (targets, row_loss) or is per chunk row (rmax, rsum,
// tlogit).

// Pass 1: merges the logits [rows, w] of vocabulary columns [v0, v0 + w) into
// the running max / sum. first: the row's statistics are not set yet. last:
// the vocabulary is complete: write the loss and replace the sum by the lse.
static __global__ void ce_lse_kernel(const float *__restrict__ logits, int64_t w, int64_t v0,
                                     const int32_t *__restrict__ targets, float *__restrict__ rmax,
                                     float *__restrict__ rsum, float *__restrict__ tlogit,
                                     double *__restrict__ row_loss, bool first, bool last) {
    const int64_t c = blockIdx.x;
    const float *row = logits + c * w;
    // every thread reads the old max before the reductions; thread 0 writes
    // the new one only after them, so the read never races with the write
    const float m_old = first ? -INFINITY : rmax[c];
    float m = m_old;
    for (int64_t j = threadIdx.x; j < w; j += blockDim.x) m = row[j] > m ? row[j] : m;
    m = ce_block_max(m);
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < w; j += blockDim.x) s += (double)expf(row[j] - m);
    s = ce_block_sum(s);
    if (threadIdx.x != 0) return;

    // the old sum is relative to the old max; on the first chunk there is none
    const float scale = m_old == -INFINITY ? 0.0f : expf(m_old - m);
    const float s_old = first ? 0.0f : rsum[c];
    const float s_new = (float)((double)s_old * scale + s);
    rmax[c] = m;
    const int32_t t = targets[c];
    if (first) tlogit[c] = NAN;  // a valid target outside [0, V) leaves it NaN: the loss is NaN, as on the CPU
    const int64_t tj = (int64_t)t - v0;
    if (t != AG_IGNORE_INDEX && tj >= 0 && tj < w) tlogit[c] = row[tj];
    if (!last) {
        rsum[c] = s_new;
        return;
    }
    const double lse = (double)m + log((double)s_new);
    row_loss[c] = t == AG_IGNORE_INDEX ? 0.0 : lse - (double)tlogit[c];
    rsum[c] = (float)lse;  // pass 2 reads the lse here
}

// Pass 2: logits [rows, w] -> dlogits in place: grad_scale softmax, minus
// grad_scale at the target column; ignored rows become zeros, so the dh GEMM
// adds exactly nothing to them.
static __global__ void ce_dlogits_kernel(float *__restrict__ logits, int64_t w, int64_t v0,
                                         const int32_t *__restrict__ targets, const float *__restrict__ lse,
                                         float grad_scale) {
    const int64_t c = blockIdx.x;
    float *row = logits + c * w;
    const int32_t t = targets[c];
    if (t == AG_IGNORE_INDEX) {
        for (int64_t j = threadIdx.x; j < w; j += blockDim.x) row[j] = 0.0f;
        return;
    }
    const float l = lse[c];
    const int64_t tj = (int64_t)t - v0;  // each column is read and written by one thread: no race
    for (int64_t j = threadIdx.x; j < w; j += blockDim.x) {
        const float p = expf(row[j] - l);
        row[j] = j == tj ? grad_scale * (p - 1.0f) : grad_scale * p;
    }
}

// ----------------------------------------------------------------------------

// Sums the valid rows' losses in token order on the host (rows and ids are
// copied back first; the caller's stream has everything enqueued before).
static int sum_on_host(ag_cuda_ctx *ctx, double *loss_sum, int64_t *n_valid, const double *d_rows,
                       const int32_t *targets, int64_t N, q_err *err) {
    double *rows = (double *)malloc((size_t)N * sizeof(double));
    int32_t *ids = (int32_t *)malloc((size_t)N * sizeof(int32_t));
    if (!rows || !ids) {
        free(rows), free(ids);
        return q_err_set(err, "%s: out of memory for %lld row losses", WHERE, (long long)N);
    }
    cudaError_t e = cudaMemcpyAsync(rows, d_rows, (size_t)N * sizeof(double), cudaMemcpyDeviceToHost, ctx->stream);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(ids, targets, (size_t)N * sizeof(int32_t), cudaMemcpyDeviceToHost, ctx->stream);
    // synchronize even after a failed enqueue: nothing may still write into rows / ids once they are freed
    const cudaError_t es = cudaStreamSynchronize(ctx->stream);
    if (e == cudaSuccess) e = es;
    if (e != cudaSuccess) {
        free(rows), free(ids);
        return q_err_set(err, "%s: copying the row losses back failed: %s", WHERE, cudaGetErrorString(e));
    }
    double total = 0.0;
    int64_t valid = 0;
    for (int64_t n = 0; n < N; n++) {
        if (ids[n] == AG_IGNORE_INDEX) continue;
        total += rows[n];
        valid++;
    }
    free(rows), free(ids);
    *loss_sum = total;
    *n_valid = valid;
    return 0;
}

extern "C" int ag_cuda_cross_entropy(ag_cuda_ctx *ctx, double *loss_sum, int64_t *n_valid, float *dh, const float *h,
                                     const float *Wlm, const int32_t *targets, int64_t N, int64_t D, int64_t V,
                                     float grad_scale, int64_t token_chunk, int64_t vocab_chunk, q_err *err) {
    if (!ctx) return q_err_set(err, "%s: no CUDA context", WHERE);
    const char *names[3] = {"N", "D", "V"};
    const int64_t sizes[3] = {N, D, V};
    for (int i = 0; i < 3; i++)
        if (sizes[i] < 0) return q_err_set(err, "%s: %s = %lld is negative", WHERE, names[i], (long long)sizes[i]);
    if (token_chunk <= 0)
        return q_err_set(err, "%s: token_chunk = %lld is not positive", WHERE, (long long)token_chunk);
    if (vocab_chunk <= 0)
        return q_err_set(err, "%s: vocab_chunk = %lld is not positive", WHERE, (long long)vocab_chunk);
    if (V == 0 && N > 0) return q_err_set(err, "%s: V = 0 (a softmax over no classes)", WHERE);
    if (N == 0) {
        *loss_sum = 0.0;
        *n_valid = 0;
        return 0;
    }
    const int64_t tc = token_chunk < N ? token_chunk : N, vc = vocab_chunk < V ? vocab_chunk : V;
    if (tc > INT32_MAX)  // a block per row of a chunk: the grid's x dimension
        return q_err_set(err, "%s: a chunk of %lld rows is too many", WHERE, (long long)tc);
    const bool keep = vocab_chunk >= V;  // one vocabulary chunk: its logits survive until the gradient

    // Both slots up front, once: a later request could move the first.
    float *logits = (float *)ag_cuda_scratch(ctx, AG_SCRATCH_LOSS, (tc * vc + 3 * tc) * (int64_t)sizeof(float), err);
    if (!logits) return -1;
    double *d_rows = (double *)ag_cuda_scratch(ctx, AG_SCRATCH_LOSS_ROWS, N * (int64_t)sizeof(double), err);
    if (!d_rows) return -1;
    float *rmax = logits + tc * vc, *rsum = rmax + tc, *tlogit = rsum + tc;
    const ag_precision prec = ctx->precision;
    cudaStream_t s = ctx->stream;

    for (int64_t n0 = 0; n0 < N; n0 += tc) {
        const int64_t rows = n0 + tc <= N ? tc : N - n0;
        const float *hr = h + n0 * D;
        const int32_t *tr = targets + n0;

        // pass 1: online log-sum-exp over the vocabulary chunks
        for (int64_t v0 = 0; v0 < V; v0 += vc) {
            const int64_t w = v0 + vc <= V ? vc : V - v0;
            if (ag_cuda_gemm(ctx, prec, false, true, rows, w, D, 1.0f, hr, D, Wlm + v0 * D, D, 0.0f, logits, w,
                             err))
                return -1;
            ce_lse_kernel<<<(unsigned)rows, AG_CUDA_THREADS, 0, s>>>(logits, w, v0, tr, rmax, rsum, tlogit,
                                                                     d_rows + n0, v0 == 0, v0 + w >= V);
            Q_CUDA_CHECK_LAUNCH("ce_lse_kernel", err);
        }
        if (!dh) continue;

        // pass 2: dlogits = grad_scale (softmax - onehot), dh += dlogits Wlm
        for (int64_t v0 = 0; v0 < V; v0 += vc) {
            const int64_t w = v0 + vc <= V ? vc : V - v0;
            if (!keep && ag_cuda_gemm(ctx, prec, false, true, rows, w, D, 1.0f, hr, D, Wlm + v0 * D, D, 0.0f,
                                      logits, w, err))
                return -1;
            ce_dlogits_kernel<<<(unsigned)rows, AG_CUDA_THREADS, 0, s>>>(logits, w, v0, tr, rsum, grad_scale);
            Q_CUDA_CHECK_LAUNCH("ce_dlogits_kernel", err);
            if (ag_cuda_gemm(ctx, prec, false, false, rows, D, w, 1.0f, logits, w, Wlm + v0 * D, D, 1.0f,
                             dh + n0 * D, D, err))
                return -1;
        }
    }
    return sum_on_host(ctx, loss_sum, n_valid, d_rows, targets, N, err);
}
