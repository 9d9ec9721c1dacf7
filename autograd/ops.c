// autograd/ops.c: the CPU kernels of the transformer op set (the "kernels"
// section of autograd.h). Every matrix product goes through ag_gemm, so
// OpenBLAS carries the heavy lifting; the rest is row-wise loops split over
// OpenMP threads.
//
// Determinism: every output element is computed by exactly one thread, in an
// order that does not depend on the schedule (reductions run in a fixed
// order inside one row; no atomics), so a run is bitwise reproducible; the
// kernels' own loops give the same bits on any thread count, only OpenBLAS
// may not. ag_gemm is only ever called outside parallel regions: OpenBLAS
// has its own threads.
//
// Allocation: attention takes per-call work buffers (a block of scores, the
// list of documents); every other kernel works in its arguments.
//
// The build uses -ffp-contract=off and no -ffast-math, so a plain float sum
// does not vectorize; the dot products below accumulate into LANES
// independent partial sums (vectorizable, fixed order) and combine them in a
// fixed tree.
#include "autograd.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// helpers

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// The kernels return void (they cannot fail on valid shapes); a per-call
// work buffer that cannot be had is fatal.
static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "autograd: out of memory (%zu bytes)\n", bytes);
        abort();
    }
    return p;
}

// Below about this many element operations a parallel region costs more
// (fork, barrier, a thread that may be descheduled) than it saves.
#define PAR_MIN_WORK 32768

enum { LANES = 16 };

// Sums the LANES partial sums in a fixed pairwise tree (spelled out: GCC
// keeps it in registers then, where the loop form went through the stack).
static inline float lanes_sum(const float *acc) {
    float h[8], q[4];
    for (int l = 0; l < 8; l++) h[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; l++) q[l] = h[l] + h[l + 4];
    return (q[0] + q[2]) + (q[1] + q[3]);
}

// sum_i a[i] b[i]
static inline float dot_f32(const float *restrict a, const float *restrict b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += a[i] * b[i];
    return lanes_sum(acc);
}

// sum_i a[i] b[i] c[i], as (a*b)*c
static inline float dot3_f32(const float *restrict a, const float *restrict b, const float *restrict c, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l] * c[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += a[i] * b[i] * c[i];
    return lanes_sum(acc);
}

// y[i] += a x[i]
static inline void axpy_f32(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

// ----------------------------------------------------------------------------
// embedding

void ag_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N, int64_t D) {
#pragma omp parallel for schedule(static) if (N * D >= PAR_MIN_WORK)
    for (int64_t n = 0; n < N; n++) memcpy(out + n * D, table + (int64_t)ids[n] * D, (size_t)D * sizeof(float));
}

// Repeated ids make rows collide, so threads split the columns instead of
// the tokens: each column block sees the tokens in order, no races.
void ag_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N, int64_t D) {
    enum { BLOCK = 256 };
    const int64_t nblocks = (D + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) if (N * D >= PAR_MIN_WORK)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t d0 = b * BLOCK, len = d0 + BLOCK <= D ? BLOCK : D - d0;
        for (int64_t n = 0; n < N; n++) {
            float *dst = dtable + (int64_t)ids[n] * D + d0;
            const float *src = dout + n * D + d0;
            for (int64_t d = 0; d < len; d++) dst[d] += src[d];
        }
    }
}

// ----------------------------------------------------------------------------
// RMSNorm

void ag_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int64_t N, int64_t D, float eps) {
#pragma omp parallel for schedule(static) if (N * D >= PAR_MIN_WORK)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * D;
        float *o = out + n * D;
        const float r = 1.0f / sqrtf(dot_f32(xr, xr, D) / (float)D + eps);  // HF: rsqrt(mean(x^2) + eps)
        if (rstd) rstd[n] = r;
        for (int64_t d = 0; d < D; d++) o[d] = w[d] * (xr[d] * r);
    }
}

// y_d = w_d x_d r with r = (sum(x^2)/D + eps)^-1/2, dr/dx_i = -r^3 x_i / D:
//   dx_i = r w_i g_i - x_i r^3/D sum_d(w_d g_d x_d),   dw_d = sum_n g_nd x_nd r_n
void ag_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                         const float *rstd, int64_t N, int64_t D) {
    if (dx) {
#pragma omp parallel for schedule(static) if (N * D >= PAR_MIN_WORK)
        for (int64_t n = 0; n < N; n++) {
            const float *g = dout + n * D, *xr = x + n * D;
            float *d_x = dx + n * D;
            const float r = rstd[n];
            const float c = dot3_f32(w, g, xr, D) * (r * r * r) / (float)D;
            for (int64_t d = 0; d < D; d++) d_x[d] += r * (w[d] * g[d]) - c * xr[d];
        }
    }
    if (dw) {
        // a reduction over tokens: threads own column blocks, tokens run in order
        enum { BLOCK = 256 };
        const int64_t nblocks = (D + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) if (N * D >= PAR_MIN_WORK)
        for (int64_t b = 0; b < nblocks; b++) {
            const int64_t d0 = b * BLOCK, len = d0 + BLOCK <= D ? BLOCK : D - d0;
            float acc[BLOCK] = {0};
            for (int64_t n = 0; n < N; n++) {
                const float *g = dout + n * D + d0, *xr = x + n * D + d0;
                const float r = rstd[n];
                for (int64_t d = 0; d < len; d++) acc[d] += g[d] * (xr[d] * r);
            }
            for (int64_t d = 0; d < len; d++) dw[d0 + d] += acc[d];
        }
    }
}

// ----------------------------------------------------------------------------
// dropout (inverted; the mask is a pure function of (seed, index))

void ag_dropout_forward(float *out, const float *x, int64_t n, float p, uint64_t seed) {
    if (p <= 0.0f) {
        if (out != x) memcpy(out, x, (size_t)n * sizeof(float));
        return;
    }
    const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (int64_t i = 0; i < n; i++) out[i] = ag_rng_uniform(seed, (uint64_t)i) >= p ? x[i] * scale : 0.0f;
}

void ag_dropout_backward(float *dx, const float *dout, int64_t n, float p, uint64_t seed) {
    if (p <= 0.0f) {
        axpy_f32(dx, 1.0f, dout, n);
        return;
    }
    const float scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (int64_t i = 0; i < n; i++)
        if (ag_rng_uniform(seed, (uint64_t)i) >= p) dx[i] += dout[i] * scale;
}

// ----------------------------------------------------------------------------
// NF4 + LoRA linear (base weight already dequantized)

void ag_lora_linear_forward(float *y, float *xa, const float *x, const float *xd, const float *W,
                            const float *bias, const float *A, const float *B, float scale, int64_t N,
                            int64_t I, int64_t O, int64_t r) {
    // y[N,O] = x[N,I] W[O,I]^T (+ bias)
    ag_gemm(false, true, N, O, I, 1.0f, x, I, W, I, 0.0f, y, O);
    if (bias) {
#pragma omp parallel for schedule(static) if (N * O >= PAR_MIN_WORK)
        for (int64_t n = 0; n < N; n++) {
            float *yr = y + n * O;
            for (int64_t o = 0; o < O; o++) yr[o] += bias[o];
        }
    }
    if (r == 0) return;
    // xa[N,r] = xd[N,I] A[r,I]^T;  y += scale * xa[N,r] B[O,r]^T
    ag_gemm(false, true, N, r, I, 1.0f, xd, I, A, I, 0.0f, xa, r);
    ag_gemm(false, true, N, O, r, scale, xa, r, B, r, 1.0f, y, O);
}

void ag_lora_linear_backward(float *dx, float *dxd, float *dA, float *dB, const float *dy, const float *xd,
                             const float *xa, const float *W, const float *A, const float *B, float scale,
                             int64_t N, int64_t I, int64_t O, int64_t r, float *scratch) {
    // dx[N,I] += dy[N,O] W[O,I]
    if (dx) ag_gemm(false, false, N, I, O, 1.0f, dy, O, W, I, 1.0f, dx, I);
    if (r == 0) return;
    // dB[O,r] += scale * dy[N,O]^T xa[N,r]
    if (dB) ag_gemm(true, false, O, r, N, scale, dy, O, xa, r, 1.0f, dB, r);
    if (!dA && !dxd) return;
    // t[N,r] = dy[N,O] B[O,r]: the gradient at xa, before the scale
    float *t = scratch;
    ag_gemm(false, false, N, r, O, 1.0f, dy, O, B, r, 0.0f, t, r);
    // dA[r,I] += scale * t[N,r]^T xd[N,I]
    if (dA) ag_gemm(true, false, r, I, N, scale, t, r, xd, I, 1.0f, dA, I);
    // dxd[N,I] += scale * t[N,r] A[r,I]  (a separate GEMM, so dxd may alias dx)
    if (dxd) ag_gemm(false, false, N, I, r, scale, t, r, A, I, 1.0f, dxd, I);
}

// ----------------------------------------------------------------------------
// rotary embedding (rotate_half layout: i pairs with i + hd/2)

// Angles are computed for a block of frequencies at a time (once per token,
// shared by all heads) so the rotation loops run contiguously over a block.
enum { ROPE_BLOCK = 64 };

static void rope_angles(float *c, float *s, float pos, const float *inv_freq, int64_t len) {
    for (int64_t i = 0; i < len; i++) {
        const float theta = pos * inv_freq[i];  // an fp32 product, as HF's freqs matmul
        c[i] = cosf(theta);
        s[i] = sinf(theta);
    }
}

void ag_rope_forward(float *out, const float *x, const int32_t *pos, const float *inv_freq, int64_t N, int64_t H,
                     int64_t hd) {
    const int64_t half = hd / 2;
#pragma omp parallel for schedule(static) if (N * H * hd >= PAR_MIN_WORK)
    for (int64_t n = 0; n < N; n++) {
        float c[ROPE_BLOCK], s[ROPE_BLOCK];
        for (int64_t i0 = 0; i0 < half; i0 += ROPE_BLOCK) {
            const int64_t len = i0 + ROPE_BLOCK <= half ? ROPE_BLOCK : half - i0;
            rope_angles(c, s, (float)pos[n], inv_freq + i0, len);
            for (int64_t h = 0; h < H; h++) {
                const int64_t off = (n * H + h) * hd + i0;
                const float *x1 = x + off, *x2 = x1 + half;
                float *o1 = out + off, *o2 = o1 + half;
                if (out == x) {  // in place: both halves read before either is written
                    for (int64_t i = 0; i < len; i++) {
                        const float a = o1[i], b = o2[i];
                        o1[i] = a * c[i] - b * s[i];
                        o2[i] = b * c[i] + a * s[i];
                    }
                } else {
                    for (int64_t i = 0; i < len; i++) {
                        o1[i] = x1[i] * c[i] - x2[i] * s[i];
                        o2[i] = x2[i] * c[i] + x1[i] * s[i];
                    }
                }
            }
        }
    }
}

// The rotation is orthogonal: its transpose is the rotation by -theta.
void ag_rope_backward(float *dx, const float *dout, const int32_t *pos, const float *inv_freq, int64_t N, int64_t H,
                      int64_t hd) {
    const int64_t half = hd / 2;
#pragma omp parallel for schedule(static) if (N * H * hd >= PAR_MIN_WORK)
    for (int64_t n = 0; n < N; n++) {
        float c[ROPE_BLOCK], s[ROPE_BLOCK];
        for (int64_t i0 = 0; i0 < half; i0 += ROPE_BLOCK) {
            const int64_t len = i0 + ROPE_BLOCK <= half ? ROPE_BLOCK : half - i0;
            rope_angles(c, s, (float)pos[n], inv_freq + i0, len);
            for (int64_t h = 0; h < H; h++) {
                const int64_t off = (n * H + h) * hd + i0;
                const float *g1 = dout + off, *g2 = g1 + half;
                float *d1 = dx + off, *d2 = d1 + half;
                for (int64_t i = 0; i < len; i++) {
                    d1[i] += g1[i] * c[i] + g2[i] * s[i];
                    d2[i] += g2[i] * c[i] - g1[i] * s[i];
                }
            }
        }
    }
}

// HF's float32 steps, one by one, so the table matches transformers' bit for
// bit (powf taken as the correctly rounded double pow):
//   inv_freq = 1.0 / (theta ** (arange(0, hd, 2).float() / hd))
// and _compute_llama3_parameters, where `s / t` on a tensor is t.reciprocal() * s.
void ag_rope_inv_freq(float *inv_freq, int64_t hd, double theta, const ag_rope_scaling *scaling) {
    const int64_t half = hd / 2;
    const bool llama3 = scaling && scaling->factor != 0.0f;
    const double two_pi = 6.283185307179586476925286766559;
    float factor = 1, lf = 0, hf = 0, ctx = 0, low_wl = 0, high_wl = 0, band = 1;
    if (llama3) {
        factor = scaling->factor;
        lf = scaling->low_freq_factor;
        hf = scaling->high_freq_factor;
        ctx = (float)scaling->original_max_position;
        low_wl = (float)((double)scaling->original_max_position / lf);   // Python floats
        high_wl = (float)((double)scaling->original_max_position / hf);
        band = (float)((double)hf - (double)lf);
    }
    for (int64_t i = 0; i < half; i++) {
        const float e = (float)(2 * i) / (float)hd;
        const float p = (float)pow((double)(float)theta, (double)e);
        float f = 1.0f / p;
        if (llama3) {
            const float wavelen = (1.0f / f) * (float)two_pi;
            if (wavelen > low_wl) {
                f = f / factor;  // long wavelengths: interpolate by factor
            } else if (!(wavelen < high_wl)) {
                // between the two: blend the scaled and unscaled frequency
                const float smooth = ((1.0f / wavelen) * ctx - lf) / band;
                f = (1.0f - smooth) * f / factor + smooth * f;
            }  // short wavelengths: unchanged
        }
        inv_freq[i] = f;
    }
}

// ----------------------------------------------------------------------------
// attention: causal GQA over packed documents
//
// Packed documents (contiguous runs of tokens, as batches make them) run as
// matrices. Per document, key/value head g and block of up to ATTN_QB
// queries, the G = H/Hkv query heads of the group are gathered into one
// [G*B, hd] matrix (row hh*B + i is head hh of query i), so one GEMM scores
// them all against the document's keys up to the block's last query:
//   S[G*B, Lk] = scale Q K^T,  P = softmax(S) under the causal mask,  O = P V.
// A block keeps G*B*Lk scores, never N x N. The GEMMs run outside parallel
// regions (OpenBLAS has its own threads); the row-wise softmax loops are
// split over OpenMP threads, a row per thread, so every element is computed
// by one thread in a fixed order.
//
// Documents shorter than ATTN_GEMM_MIN tokens, and every token when start[]
// is not a set of contiguous documents (a query reaching into an earlier
// run), take the scalar path instead: per token and kv head, dot products.
// Tiny GEMMs cost more in calls than they save.

enum {
    ATTN_QB = 64,        // queries per block: G*64 rows of scores stay in L2 for documents of ~1k tokens
    ATTN_GEMM_MIN = 8,   // shortest document for the GEMM path (measured: the backward wins from 8 tokens,
                         // the forward breaks even there; 1-4 token documents are 4-10x faster scalar)
};

// Scores are (q . k) * scale, as HF's eager path (matmul, then the scaling).
static float attn_scale(int64_t hd) { return (float)(1.0 / sqrt((double)hd)); }

// Tokens [b, e) that no query outside them reaches.
typedef struct attn_span {
    int64_t b, e;
} attn_span;

// The plan of a call: spans for the scalar path (small[nsmall]), spans for
// the GEMM path (big[nbig]) and the scalar path's tokens (tok[ntok], in
// order). Documents are maximal runs where start[n] == n opens one and later
// tokens repeat it; any other start[] makes all tokens one scalar span.
typedef struct attn_plan {
    attn_span *small, *big;
    int64_t nsmall, nbig, *tok, ntok, longest;  // longest: of the big spans
} attn_plan;

static attn_plan attn_plan_make(const int32_t *start, int64_t N) {
    attn_plan p = {.small = xmalloc((size_t)(N + 1) * sizeof(attn_span)),
                   .big = xmalloc((size_t)(N + 1) * sizeof(attn_span)),
                   .tok = xmalloc((size_t)(N + 1) * sizeof(int64_t))};
    bool packed = N > 0 && start[0] == 0;
    for (int64_t n = 1; n < N && packed; n++) packed = start[n] == n || start[n] == start[n - 1];
    if (!packed) {
        p.small[p.nsmall++] = (attn_span){0, N};
        for (int64_t n = 0; n < N; n++) p.tok[p.ntok++] = n;
        return p;
    }
    for (int64_t b = 0, e = 1; b < N; b = e++) {
        while (e < N && start[e] == b) e++;  // [b, e): one document
        if (e - b >= ATTN_GEMM_MIN) {
            p.big[p.nbig++] = (attn_span){b, e};
            p.longest = e - b > p.longest ? e - b : p.longest;
        } else {
            p.small[p.nsmall++] = (attn_span){b, e};
            for (int64_t n = b; n < e; n++) p.tok[p.ntok++] = n;
        }
    }
    return p;
}

static void attn_plan_free(attn_plan *p) {
    free(p->small);
    free(p->big);
    free(p->tok);
}

// sum_i x[i] in double, over LANES partial sums in a fixed order
static inline double sum_f64(const float *restrict x, int64_t n) {
    double acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += x[i];
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

// max_i x[i] (n >= 1); the order cannot change a maximum
static inline float max_f32(const float *restrict x, int64_t n) {
    float acc[LANES];
    for (int l = 0; l < LANES; l++) acc[l] = x[0];
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
    for (int l = 0; i < n; i++, l++) acc[l] = x[i] > acc[l] ? x[i] : acc[l];
    float m = acc[0];
    for (int l = 1; l < LANES; l++) m = acc[l] > m ? acc[l] : m;
    return m;
}

// row[0, len) <- softmax(row[0, len)), row[len, Lk) <- 0 (the causal mask);
// returns the log-sum-exp. The maximum is subtracted, the sum is in double.
static float softmax_row(float *restrict row, int64_t len, int64_t Lk) {
    const float m = max_f32(row, len);
    for (int64_t j = 0; j < len; j++) row[j] = expf(row[j] - m);
    const double sum = sum_f64(row, len);
    const float inv = (float)(1.0 / sum);
    for (int64_t j = 0; j < len; j++) row[j] *= inv;
    for (int64_t j = len; j < Lk; j++) row[j] = 0.0f;
    return m + (float)log(sum);
}

// dst[hh*B + i, :] = src[(n0 + i)*H + g*G + hh, :]: a group's heads of B
// tokens as one matrix [G*B, hd]
static void attn_gather(float *dst, const float *src, int64_t n0, int64_t B, int64_t g, int64_t G, int64_t H,
                        int64_t hd) {
    for (int64_t hh = 0; hh < G; hh++)
        for (int64_t i = 0; i < B; i++)
            memcpy(dst + (hh * B + i) * hd, src + ((n0 + i) * H + g * G + hh) * hd, (size_t)hd * sizeof(float));
}

// The inverse of attn_gather, adding (accumulate) or copying.
static void attn_scatter(float *dst, const float *src, bool accumulate, int64_t n0, int64_t B, int64_t g, int64_t G,
                         int64_t H, int64_t hd) {
    for (int64_t hh = 0; hh < G; hh++)
        for (int64_t i = 0; i < B; i++) {
            float *d = dst + ((n0 + i) * H + g * G + hh) * hd;
            const float *s = src + (hh * B + i) * hd;
            if (accumulate)
                for (int64_t c = 0; c < hd; c++) d[c] += s[c];
            else
                memcpy(d, s, (size_t)hd * sizeof(float));
        }
}

// A row of G*B rows x Lk scores is worth a parallel region sooner than the
// other kernels' loops: each score costs an expf.
static bool attn_par(int64_t R, int64_t Lk) { return R * Lk * 8 >= PAR_MIN_WORK; }

// The scalar forward of the plan's tokens: one task per (query token n, kv
// head g), the group's G heads sharing each key and value row while it is
// in cache. A task owns out/lse of its heads; the dynamic schedule changes
// no value.
static void attn_forward_scalar(float *out, float *lse, const float *q, const float *k, const float *v,
                                const int32_t *start, const attn_plan *p, int64_t N, int64_t H, int64_t Hkv,
                                int64_t hd) {
    const int64_t G = H / Hkv, T = p->ntok;
    const float scale = attn_scale(hd);
    float *scores = xmalloc((size_t)max_threads() * (size_t)(G * N) * sizeof(float));  // per thread [G, <= N]

#pragma omp parallel for schedule(dynamic, 16) if (T * T * H * hd >= PAR_MIN_WORK)
    for (int64_t t = 0; t < T * Hkv; t++) {
        const int64_t n = p->tok[t / Hkv], g = t % Hkv;
        const int64_t j0 = start[n], L = n - j0 + 1;
        float *sc = scores + (int64_t)thread_id() * G * N;  // [G, L]
        const float *qn = q + (n * H + g * G) * hd;          // the group's G heads are adjacent
        float *on = out + (n * H + g * G) * hd;

        for (int64_t j = 0; j < L; j++) {
            const float *kj = k + ((j0 + j) * Hkv + g) * hd;
            for (int64_t hh = 0; hh < G; hh++) sc[hh * L + j] = dot_f32(qn + hh * hd, kj, hd) * scale;
        }
        for (int64_t hh = 0; hh < G; hh++) lse[n * H + g * G + hh] = softmax_row(sc + hh * L, L, L);
        // out[h] = sum_j P[h,j] v_j
        memset(on, 0, (size_t)(G * hd) * sizeof(float));
        for (int64_t j = 0; j < L; j++) {
            const float *vj = v + ((j0 + j) * Hkv + g) * hd;
            for (int64_t hh = 0; hh < G; hh++) axpy_f32(on + hh * hd, sc[hh * L + j], vj, hd);
        }
    }
    free(scores);
}

void ag_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                          const int32_t *start, int64_t N, int64_t H, int64_t Hkv, int64_t hd) {
    attn_plan p = attn_plan_make(start, N);
    if (p.ntok) attn_forward_scalar(out, lse, q, k, v, start, &p, N, H, Hkv, hd);

    const int64_t G = H / Hkv, KV = Hkv * hd, QB = p.longest < ATTN_QB ? p.longest : ATTN_QB;
    const float scale = attn_scale(hd);
    float *qb = xmalloc((size_t)(G * QB * hd) * sizeof(float));        // [G*B, hd] queries, then outputs
    float *S = xmalloc((size_t)(G * QB * p.longest) * sizeof(float));  // [G*B, Lk] scores, then probabilities
    for (int64_t s = 0; s < p.nbig; s++) {
        const int64_t d0 = p.big[s].b, L = p.big[s].e - d0;
        for (int64_t g = 0; g < Hkv; g++) {
            const float *kd = k + (d0 * Hkv + g) * hd, *vd = v + (d0 * Hkv + g) * hd;  // [L, hd], stride KV
            for (int64_t b0 = 0; b0 < L; b0 += QB) {
                const int64_t B = L - b0 < QB ? L - b0 : QB, Lk = b0 + B, R = G * B;
                attn_gather(qb, q, d0 + b0, B, g, G, H, hd);
                ag_gemm(false, true, R, Lk, hd, scale, qb, hd, kd, KV, 0.0f, S, Lk);
#pragma omp parallel for schedule(static) if (attn_par(R, Lk))
                for (int64_t r = 0; r < R; r++) {
                    const int64_t hh = r / B, i = r % B;
                    lse[(d0 + b0 + i) * H + g * G + hh] = softmax_row(S + r * Lk, b0 + i + 1, Lk);
                }
                ag_gemm(false, false, R, hd, Lk, 1.0f, S, Lk, vd, KV, 0.0f, qb, hd);
                attn_scatter(out, qb, false, d0 + b0, B, g, G, H, hd);
            }
        }
    }
    free(S);
    free(qb);
    attn_plan_free(&p);
}

// The scalar backward of the plan's small spans: one task per (span, kv
// head), which owns dq of the span's queries in the group's heads and dk/dv
// of its keys in head g, and walks the queries in order: no races, a fixed
// accumulation order. With P = exp(s - lse), dP = dout . v, D = dout . out,
// dS = P (dP - D):  dq += scale dS k,  dk += scale dS^T q,  dv += P^T dout.
static void attn_backward_scalar(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                                 const float *v, const float *out, const float *lse, const int32_t *start,
                                 const attn_plan *p, int64_t H, int64_t Hkv, int64_t hd) {
    const int64_t G = H / Hkv, T = p->ntok;
    const float scale = attn_scale(hd);
    const int64_t per_thread = G * hd + G;  // dq accumulators [G, hd], D [G]
    float *work = xmalloc((size_t)max_threads() * (size_t)per_thread * sizeof(float));

#pragma omp parallel for schedule(dynamic, 1) if (T * T * H * hd >= PAR_MIN_WORK)
    for (int64_t t = 0; t < p->nsmall * Hkv; t++) {
        const attn_span sp = p->small[t / Hkv];
        const int64_t g = t % Hkv;
        float *acc = work + (int64_t)thread_id() * per_thread, *Drow = acc + G * hd;
        for (int64_t n = sp.b; n < sp.e; n++) {
            const int64_t base = (n * H + g * G) * hd;
            const float *qn = q + base, *don = dout + base, *ln = lse + n * H + g * G;
            for (int64_t hh = 0; hh < G; hh++) Drow[hh] = dot_f32(don + hh * hd, out + base + hh * hd, hd);
            memset(acc, 0, (size_t)(G * hd) * sizeof(float));
            for (int64_t j = start[n]; j <= n; j++) {
                const int64_t kv = (j * Hkv + g) * hd;
                const float *kj = k + kv, *vj = v + kv;
                float *dkj = dk + kv, *dvj = dv + kv;
                for (int64_t hh = 0; hh < G; hh++) {
                    const float *qh = qn + hh * hd, *doh = don + hh * hd;
                    const float pr = expf(dot_f32(qh, kj, hd) * scale - ln[hh]);  // the forward's score, bit for bit
                    const float ds = pr * (dot_f32(doh, vj, hd) - Drow[hh]);
                    axpy_f32(acc + hh * hd, ds, kj, hd);
                    axpy_f32(dkj, scale * ds, qh, hd);
                    axpy_f32(dvj, pr, doh, hd);
                }
            }
            for (int64_t hh = 0; hh < G; hh++) axpy_f32(dq + base + hh * hd, scale, acc + hh * hd, hd);
        }
    }
    free(work);
}

// The GEMM backward, per (document, kv head, query block) as the forward:
// P = exp(scale Q K^T - lse) recomputed, dP = dO V^T, D_i = dO_i . O_i,
// dS = P (dP - D);  dq += scale dS K,  dk += scale dS^T Q,  dv += P^T dO.
// dk/dv of a document's keys collect from its query blocks in order (GEMMs
// with beta 1), so the accumulation order is fixed.
void ag_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                           const float *v, const float *out, const float *lse, const int32_t *start, int64_t N,
                           int64_t H, int64_t Hkv, int64_t hd) {
    attn_plan p = attn_plan_make(start, N);
    if (p.nsmall) attn_backward_scalar(dq, dk, dv, dout, q, k, v, out, lse, start, &p, H, Hkv, hd);

    const int64_t G = H / Hkv, KV = Hkv * hd, QB = p.longest < ATTN_QB ? p.longest : ATTN_QB, Lmax = p.longest;
    const float scale = attn_scale(hd);
    float *qb = xmalloc((size_t)(3 * G * QB * hd) * sizeof(float));  // queries, dout, dq [G*B, hd] each
    float *dob = qb + G * QB * hd, *dqb = dob + G * QB * hd;
    float *P = xmalloc((size_t)(2 * G * QB * Lmax) * sizeof(float)), *dS = P + G * QB * Lmax;  // [G*B, Lk] each
    for (int64_t s = 0; s < p.nbig; s++) {
        const int64_t d0 = p.big[s].b, L = p.big[s].e - d0;
        for (int64_t g = 0; g < Hkv; g++) {
            const int64_t kv0 = (d0 * Hkv + g) * hd;  // the document's keys and values [L, hd], stride KV
            for (int64_t b0 = 0; b0 < L; b0 += QB) {
                const int64_t B = L - b0 < QB ? L - b0 : QB, Lk = b0 + B, R = G * B;
                attn_gather(qb, q, d0 + b0, B, g, G, H, hd);
                attn_gather(dob, dout, d0 + b0, B, g, G, H, hd);
                ag_gemm(false, true, R, Lk, hd, scale, qb, hd, k + kv0, KV, 0.0f, P, Lk);
                ag_gemm(false, true, R, Lk, hd, 1.0f, dob, hd, v + kv0, KV, 0.0f, dS, Lk);
#pragma omp parallel for schedule(static) if (attn_par(R, Lk))
                for (int64_t r = 0; r < R; r++) {
                    const int64_t hh = r / B, i = r % B, len = b0 + i + 1, h = (d0 + b0 + i) * H + g * G + hh;
                    const float D = dot_f32(dob + r * hd, out + h * hd, hd), l = lse[h];
                    float *restrict pr = P + r * Lk, *restrict ds = dS + r * Lk;
                    for (int64_t j = 0; j < len; j++) pr[j] = expf(pr[j] - l);
                    for (int64_t j = 0; j < len; j++) ds[j] = pr[j] * (ds[j] - D);
                    for (int64_t j = len; j < Lk; j++) pr[j] = ds[j] = 0.0f;
                }
                ag_gemm(true, false, Lk, hd, R, 1.0f, P, Lk, dob, hd, 1.0f, dv + kv0, KV);
                ag_gemm(true, false, Lk, hd, R, scale, dS, Lk, qb, hd, 1.0f, dk + kv0, KV);
                ag_gemm(false, false, R, hd, Lk, scale, dS, Lk, k + kv0, KV, 0.0f, dqb, hd);
                attn_scatter(dq, dqb, true, d0 + b0, B, g, G, H, hd);
            }
        }
    }
    free(P);
    free(qb);
    attn_plan_free(&p);
}

// ----------------------------------------------------------------------------
// SwiGLU

void ag_swiglu_forward(float *out, const float *gate, const float *up, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// silu'(g) = sig(g) (1 + g (1 - sig(g))), PyTorch's silu_backward.
void ag_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PAR_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const float g = gate[i], e = expf(-g);
        const float sig = 1.0f / (1.0f + e);
        if (dgate) dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        if (dup) dup[i] += dout[i] * (g / (1.0f + e));
    }
}

// ----------------------------------------------------------------------------
// cross-entropy over the LM head, chunked

// Token chunks are up to token_chunk *valid* tokens: masked tokens (prompts
// in SFT) are skipped before the GEMMs. When a chunk's valid tokens are not
// adjacent their rows of h are gathered into hbuf and their gradient comes
// back through dhbuf.
//   scratch: logits [tc, min(vc, V)] | hbuf [tc, D] | dhbuf [tc, D] |
//            row max [tc] | row sum / lse [tc] | target logit [tc] | target id [tc]
int64_t ag_cross_entropy_scratch_floats(int64_t D, int64_t V, int64_t token_chunk, int64_t vocab_chunk) {
    const int64_t vc = vocab_chunk < V ? vocab_chunk : V;
    return token_chunk * vc + 2 * token_chunk * D + 4 * token_chunk;
}

// The target id of chunk row c rides in a float slot of the scratch (memcpy:
// no aliasing games, exact for any int32).
static inline void put_id(float *slot, int32_t id) { memcpy(slot, &id, sizeof id); }
static inline int32_t get_id(const float *slot) {
    int32_t id;
    memcpy(&id, slot, sizeof id);
    return id;
}

void ag_cross_entropy(double *loss_sum, int64_t *n_valid, float *dh, const float *h, const float *Wlm,
                      const int32_t *targets, int64_t N, int64_t D, int64_t V, float grad_scale,
                      int64_t token_chunk, int64_t vocab_chunk, float *scratch) {
    const int64_t tc = token_chunk, vc = vocab_chunk < V ? vocab_chunk : V;
    const bool keep = vocab_chunk >= V;  // one vocab chunk: its logits survive until the gradient
    float *logits = scratch, *hbuf = logits + tc * vc, *dhbuf = hbuf + tc * D;
    float *rmax = dhbuf + tc * D, *rsum = rmax + tc, *tlogit = rsum + tc, *tid = tlogit + tc;
    double total = 0;
    int64_t valid = 0, n = 0;

    while (n < N) {
        // the next chunk: cnt valid tokens within [n0, n1)
        while (n < N && targets[n] == AG_IGNORE_INDEX) n++;
        if (n == N) break;
        const int64_t n0 = n;
        int64_t n1 = n, cnt = 0;
        for (; n < N && cnt < tc; n++) {
            if (targets[n] == AG_IGNORE_INDEX) continue;
            put_id(tid + cnt, targets[n]);
            cnt++;
            n1 = n + 1;
        }
        const bool adjacent = n1 - n0 == cnt;
        const float *hr = h + n0 * D;
        if (!adjacent) {
            for (int64_t i = n0, c = 0; i < n1; i++)
                if (targets[i] != AG_IGNORE_INDEX) memcpy(hbuf + (c++) * D, h + i * D, (size_t)D * sizeof(float));
            hr = hbuf;
        }

        // pass 1: online log-sum-exp over vocabulary chunks
        for (int64_t c = 0; c < cnt; c++) {
            rmax[c] = -INFINITY;
            rsum[c] = 0.0f;
            tlogit[c] = NAN;  // overwritten by the chunk holding the target
        }
        for (int64_t v0 = 0; v0 < V; v0 += vc) {
            const int64_t w = v0 + vc <= V ? vc : V - v0;
            ag_gemm(false, true, cnt, w, D, 1.0f, hr, D, Wlm + v0 * D, D, 0.0f, logits, w);  // [cnt, w]
#pragma omp parallel for schedule(static) if (cnt * w >= PAR_MIN_WORK)
            for (int64_t c = 0; c < cnt; c++) {
                const float *row = logits + c * w;
                float m = rmax[c];
                for (int64_t j = 0; j < w; j++) m = row[j] > m ? row[j] : m;
                double s = 0;
                for (int64_t j = 0; j < w; j++) s += expf(row[j] - m);
                // rescale the running sum to the new max (exp(-inf) = 0 on the first chunk)
                rsum[c] = (float)((double)rsum[c] * expf(rmax[c] - m) + s);
                rmax[c] = m;
                const int64_t tj = (int64_t)get_id(tid + c) - v0;
                if (tj >= 0 && tj < w) tlogit[c] = row[tj];
            }
        }
        // loss in double, in token order; the lse replaces the running sum
        for (int64_t c = 0; c < cnt; c++) {
            const double l = (double)rmax[c] + log((double)rsum[c]);
            total += l - (double)tlogit[c];
            rsum[c] = (float)l;
        }
        valid += cnt;
        if (!dh) continue;

        // pass 2: dlogits = grad_scale (softmax - onehot), dh += dlogits Wlm
        float *dst = adjacent ? dh + n0 * D : dhbuf;
        for (int64_t v0 = 0; v0 < V; v0 += vc) {
            const int64_t w = v0 + vc <= V ? vc : V - v0;
            if (!keep) ag_gemm(false, true, cnt, w, D, 1.0f, hr, D, Wlm + v0 * D, D, 0.0f, logits, w);
#pragma omp parallel for schedule(static) if (cnt * w >= PAR_MIN_WORK)
            for (int64_t c = 0; c < cnt; c++) {
                float *row = logits + c * w;
                const float lse = rsum[c];
                const int64_t tj = (int64_t)get_id(tid + c) - v0;
                const bool here = tj >= 0 && tj < w;
                const float xt = here ? row[tj] : 0.0f;
                for (int64_t j = 0; j < w; j++) row[j] = grad_scale * expf(row[j] - lse);
                if (here) row[tj] = grad_scale * (expf(xt - lse) - 1.0f);
            }
            const float beta = adjacent || v0 > 0 ? 1.0f : 0.0f;  // dhbuf starts fresh per chunk
            ag_gemm(false, false, cnt, D, w, 1.0f, logits, w, Wlm + v0 * D, D, beta, dst, D);
        }
        if (!adjacent) {
            for (int64_t i = n0, c = 0; i < n1; i++)
                if (targets[i] != AG_IGNORE_INDEX) axpy_f32(dh + i * D, 1.0f, dhbuf + (c++) * D, D);
        }
    }
    *loss_sum = total;
    *n_valid = valid;
}
