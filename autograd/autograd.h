// autograd/autograd.h: the op set of a Llama-family transformer with a frozen
// NF4 base and LoRA adapters, as hand-written forward/backward pairs, and the
// small reverse-mode tape that replays them.
//
// Two layers:
//   1. kernels (ag_*_forward / ag_*_backward): plain functions over fp32
//      arrays, row-major, no tape (attention mallocs its per-call block
//      buffers; nothing else allocates). This is the CPU reference
//      every CUDA kernel is tested against. Backward kernels ACCUMULATE into
//      their gradient outputs (+=), so residual branches, shared inputs and
//      gradient accumulation need no extra copies.
//   2. the tape (ag_tape, ag_tensor): ops called on tensors allocate their
//      outputs from the tape's arena, run the forward kernel and record what
//      the backward needs; ag_tape_backward replays the records in reverse.
//      ag_checkpoint runs a segment (a transformer layer) without keeping its
//      activations and recomputes them during the backward.
//
// Shapes: N tokens (a batch of rows flattened, B*T), D model width,
// H / Hkv query / key-value heads of size hd, I / O linear in / out features,
// r LoRA rank, F MLP width, V vocabulary.
#ifndef QLORA_AUTOGRAD_H
#define QLORA_AUTOGRAD_H

#include "core/core.h"
#include "nf4/nf4.h"

#ifdef __cplusplus
extern "C" {
#endif

#define AG_IGNORE_INDEX (-100)

// ----------------------------------------------------------------------------
// random numbers: counter-based, so a value depends only on (seed, index).
// Dropout masks are recomputed in the backward and under checkpointing
// instead of stored, and the same seed gives the same run on every machine.

uint64_t ag_rng_hash(uint64_t seed, uint64_t index);          // splitmix64 of seed ^ index
static inline float ag_rng_uniform(uint64_t seed, uint64_t index) {  // [0, 1), 24 bits
    return (float)(ag_rng_hash(seed, index) >> 40) * (1.0f / 16777216.0f);
}

// ----------------------------------------------------------------------------
// GEMM, row-major: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
// op(X) = X or X^T; lda/ldb/ldc are the row strides of the arrays as stored.
// OpenBLAS's sgemm when the build has it, a blocked OpenMP loop otherwise.
void ag_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
             int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
const char *ag_gemm_backend(void);  // "openblas" or "builtin"
// Threads for OpenMP loops and OpenBLAS (n <= 0: leave the defaults).
void ag_set_threads(int n);
// Call first thing in main, before any OpenMP region: settles how OpenMP and
// the BLAS share cores (passive waiting when OpenBLAS has its own pthreads).
void ag_threads_init(void);

// ----------------------------------------------------------------------------
// kernels

// out[N,D] = table[ids[n], :]. ids must be in [0, V) (checked by the caller).
void ag_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N, int64_t D);
// dtable[V,D] += scatter of dout[N,D] by ids.
void ag_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N, int64_t D);

// RMSNorm as HF Llama computes it in fp32:
//   rstd[n] = 1 / sqrt(mean(x[n,:]^2) + eps);  out[n,d] = w[d] * (x[n,d] * rstd[n])
void ag_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int64_t N, int64_t D, float eps);
// dx[N,D] += ...; dw[D] += ... (dw may be NULL: norm weights are frozen).
void ag_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                         const float *rstd, int64_t N, int64_t D);

// Inverted dropout on the LoRA branch input: element i is kept when
// ag_rng_uniform(seed, i) >= p, and kept values are scaled by 1 / (1 - p).
// p == 0 copies. dx[n] += dout * (same mask and scale).
void ag_dropout_forward(float *out, const float *x, int64_t n, float p, uint64_t seed);
void ag_dropout_backward(float *dx, const float *dout, int64_t n, float p, uint64_t seed);

// The NF4 + LoRA linear, with the base weight already dequantized to fp32:
//   y[N,O] = x[N,I] W[O,I]^T + bias[O] + scale * (xa[N,r] = xd[N,I] A[r,I]^T) B[O,r]^T
// xd is dropout(x) (x itself when dropout is off). xa is written: the backward
// needs it. bias may be NULL. r == 0 (A, B, xd, xa NULL) is a plain linear.
void ag_lora_linear_forward(float *y, float *xa, const float *x, const float *xd, const float *W,
                            const float *bias, const float *A, const float *B, float scale, int64_t N,
                            int64_t I, int64_t O, int64_t r);
// From dy[N,O]:
//   dx[N,I]  += dy W                               (through the frozen base; never dW)
//   dB[O,r]  += scale * dy^T xa
//   dA[r,I]  += scale * (dy B)^T xd
//   dxd[N,I] += scale * (dy B) A                   (the LoRA branch's input; may alias dx)
// scratch holds N*r floats. Any of dx, dxd, dA, dB may be NULL (no gradient wanted).
void ag_lora_linear_backward(float *dx, float *dxd, float *dA, float *dB, const float *dy, const float *xd,
                             const float *xa, const float *W, const float *A, const float *B, float scale,
                             int64_t N, int64_t I, int64_t O, int64_t r, float *scratch);

// Rotary embedding, HF's rotate_half layout: dimension i pairs with i + hd/2.
//   theta = (float)pos[n] * inv_freq[i]   (an fp32 product, as HF does)
//   out[i]      = x[i] cos(theta) - x[i+hd/2] sin(theta)
//   out[i+hd/2] = x[i+hd/2] cos(theta) + x[i] sin(theta)
// x, out: [N,H,hd]; may be the same array. Backward rotates by -theta, dx += .
void ag_rope_forward(float *out, const float *x, const int32_t *pos, const float *inv_freq, int64_t N, int64_t H,
                     int64_t hd);
void ag_rope_backward(float *dx, const float *dout, const int32_t *pos, const float *inv_freq, int64_t N, int64_t H,
                      int64_t hd);

// Llama 3 rope_scaling (type "llama3"); factor == 0 means no scaling.
typedef struct ag_rope_scaling {
    float factor;
    float low_freq_factor;
    float high_freq_factor;
    int64_t original_max_position;
} ag_rope_scaling;
// inv_freq[hd/2] = 1 / theta^(2i/hd), then Llama 3's wavelength-dependent scaling.
void ag_rope_inv_freq(float *inv_freq, int64_t hd, double theta, const ag_rope_scaling *scaling);

// Causal grouped-query attention over packed documents. Query token n attends
// keys j in [start[n], n]: start[n] is the index of the first token of n's
// document (rows of a batch are documents too). Query head h reads key/value
// head h / (H / Hkv); H % Hkv == 0. Scores are scaled by 1/sqrt(hd).
// Documents of 8+ tokens that are contiguous runs (as batches make them) go
// through GEMMs per (document, kv head, 64-query block), never holding more
// than a block's scores; shorter documents and non-contiguous start[] use a
// per-token scalar path.
//   q[N,H,hd], k[N,Hkv,hd], v[N,Hkv,hd] -> out[N,H,hd], lse[N,H] (log-sum-exp of
//   the scaled scores, kept so the backward recomputes the probabilities).
void ag_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                          const int32_t *start, int64_t N, int64_t H, int64_t Hkv, int64_t hd);
// dq, dk, dv += from dout, using out and lse of the forward.
void ag_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                           const float *v, const float *out, const float *lse, const int32_t *start, int64_t N,
                           int64_t H, int64_t Hkv, int64_t hd);

// out[N,F] = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
void ag_swiglu_forward(float *out, const float *gate, const float *up, int64_t n);
void ag_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up, int64_t n);

// Cross-entropy of logits = h[N,D] Wlm[V,D]^T against targets[N] (AG_IGNORE_INDEX
// skipped; others must be in [0, V) or the loss is NaN), computed
// token_chunk valid rows at a time (ignored rows never reach the GEMMs) and
// vocab_chunk columns at a time with an online log-sum-exp, so no more than
// token_chunk * vocab_chunk logits exist at once. When vocab_chunk >= V a row chunk's logits are kept
// between the loss and the gradient (one GEMM fewer).
// Returns the summed loss over valid targets in *loss_sum and their count in
// *n_valid. When dh is not NULL it also accumulates
//   dh[N,D] += grad_scale * d(loss_sum)/dh
// (grad_scale = 1 / valid tokens of the whole accumulated batch).
// scratch: ag_cross_entropy_scratch_floats(...) floats.
int64_t ag_cross_entropy_scratch_floats(int64_t D, int64_t V, int64_t token_chunk, int64_t vocab_chunk);
void ag_cross_entropy(double *loss_sum, int64_t *n_valid, float *dh, const float *h, const float *Wlm,
                      const int32_t *targets, int64_t N, int64_t D, int64_t V, float grad_scale,
                      int64_t token_chunk, int64_t vocab_chunk, float *scratch);

// ----------------------------------------------------------------------------
// CUDA kernels: the kernels above on device pointers, same semantics and
// shapes (backward kernels accumulate, += ; NULL gradients are skipped where
// the CPU kernel allows it). Each is enqueued on stream (a cudaStream_t; NULL
// is the default stream) and returns 0, or -1 with err filled (bad arguments,
// a failed launch, or "built without CUDA"). Results are within fp32
// rounding of the CPU kernels (sums run in a different order; device expf /
// sincosf may differ by an ulp); dropout masks are bit-identical.
bool ag_cuda_available(void);  // a CUDA device is present and usable

int ag_cuda_embedding_forward(float *out, const int32_t *ids, const float *table, int64_t N, int64_t D,
                              void *stream, q_err *err);
// Deterministic without atomics: a thread owns a column and adds the tokens
// in order (bit-identical to the CPU). Parallel over D only: meant for the
// rare unfrozen table, not a hot path.
int ag_cuda_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int64_t N, int64_t D,
                               void *stream, q_err *err);

// rstd may be NULL.
int ag_cuda_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int64_t N, int64_t D,
                            float eps, void *stream, q_err *err);
// dx and/or dw may be NULL. dw is reduced over rows in two deterministic
// passes through scratch (ag_cuda_rmsnorm_backward_scratch_floats(N, D)
// floats of device memory; may be NULL when dw is).
int64_t ag_cuda_rmsnorm_backward_scratch_floats(int64_t N, int64_t D);
int ag_cuda_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *w,
                             const float *rstd, int64_t N, int64_t D, float *scratch, void *stream, q_err *err);

int ag_cuda_dropout_forward(float *out, const float *x, int64_t n, float p, uint64_t seed, void *stream,
                            q_err *err);
int ag_cuda_dropout_backward(float *dx, const float *dout, int64_t n, float p, uint64_t seed, void *stream,
                             q_err *err);

// out may equal x. hd must be even.
int ag_cuda_rope_forward(float *out, const float *x, const int32_t *pos, const float *inv_freq, int64_t N,
                         int64_t H, int64_t hd, void *stream, q_err *err);
int ag_cuda_rope_backward(float *dx, const float *dout, const int32_t *pos, const float *inv_freq, int64_t N,
                          int64_t H, int64_t hd, void *stream, q_err *err);

// dgate and/or dup may be NULL.
int ag_cuda_swiglu_forward(float *out, const float *gate, const float *up, int64_t n, void *stream, q_err *err);
int ag_cuda_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                            int64_t n, void *stream, q_err *err);

// The residual add: out[n] = a + b (out may alias a or b); da, db += dout
// (either may be NULL).
int ag_cuda_add_forward(float *out, const float *a, const float *b, int64_t n, void *stream, q_err *err);
int ag_cuda_add_backward(float *da, float *db, const float *dout, int64_t n, void *stream, q_err *err);

// Causal GQA attention on the device, as ag_attention_forward/backward, by a
// tiled kernel with an online softmax: a block holds 16 queries of one head
// and walks the keys 32 at a time, so no score matrix is ever stored (memory
// is O(N H hd)). fp32 CUDA-core arithmetic in every precision mode.
// Preconditions (not checked: start lives on the device): start[] is
// non-decreasing with start[n] <= n (documents are contiguous runs, as
// model batches make them); hd <= 256 (checked).
int ag_cuda_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                              const int32_t *start, int64_t N, int64_t H, int64_t Hkv, int64_t hd, void *stream,
                              q_err *err);
// dq, dk, dv += as the CPU. Deterministic: dq by query tiles, dk/dv by key
// tiles (two kernels, each output element owned by one thread, no atomics).
// scratch: ag_cuda_attention_backward_scratch_floats(N, H) floats of device
// memory (the row sums D = dout . out).
int64_t ag_cuda_attention_backward_scratch_floats(int64_t N, int64_t H);
int ag_cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                               const float *v, const float *out, const float *lse, const int32_t *start, int64_t N,
                               int64_t H, int64_t Hkv, int64_t hd, float *scratch, void *stream, q_err *err);

// ----------------------------------------------------------------------------
// CUDA: device memory, the context, GEMMs

// Device memory. ag_cuda_malloc zeroes; copies go either way (unified
// addressing tells host from device pointers); a copy that touches host
// memory has finished on return, device-to-device copies are only enqueued.
int ag_cuda_malloc(void **p, int64_t bytes, q_err *err);
void ag_cuda_free(void *p);  // NULL is fine
int ag_cuda_copy(void *dst, const void *src, int64_t bytes, void *stream, q_err *err);
int ag_cuda_zero(void *p, int64_t bytes, void *stream, q_err *err);
// The first device: its name, free and total memory (for memory plans).
int ag_cuda_device_info(char *name, size_t name_size, int64_t *free_bytes, int64_t *total_bytes, q_err *err);

// Math of the large GEMMs (frozen base, LM head). LoRA GEMMs always run in
// fp32 (tf32 in TF32 mode): they are small and carry the trained signal.
typedef enum ag_precision {
    AG_PRECISION_FP32,  // fp32 operands and math (no tensor cores): the reference
    AG_PRECISION_TF32,  // fp32 operands, tf32 tensor cores (10-bit mantissa products)
    AG_PRECISION_BF16,  // bf16 operands (weights dequantized straight to bf16), fp32 accumulation (sm80+)
    AG_PRECISION_FP16,  // fp16 operands, fp32 accumulation (activations beyond 65504 overflow)
} ag_precision;
const char *ag_precision_name(ag_precision p);                 // "fp32", "tf32", "bf16", "fp16"
int ag_precision_parse(const char *s, ag_precision *p, q_err *err);

// One stream, one cuBLAS handle, the precision, and growable device scratch
// (the dequantized-weight workspace, 16-bit operand copies, loss buffers)
// shared by every op enqueued through it. Ops on one context run in order.
typedef struct ag_cuda_ctx ag_cuda_ctx;
int ag_cuda_ctx_create(ag_cuda_ctx **ctx, ag_precision precision, q_err *err);
void ag_cuda_ctx_free(ag_cuda_ctx *ctx);
void *ag_cuda_ctx_stream(const ag_cuda_ctx *ctx);
ag_precision ag_cuda_ctx_precision(const ag_cuda_ctx *ctx);
int64_t ag_cuda_ctx_scratch_bytes(const ag_cuda_ctx *ctx);  // device bytes the scratch holds now
int ag_cuda_ctx_sync(ag_cuda_ctx *ctx, q_err *err);         // waits for the stream; reports a fault
// Stream-ordered, zeroed device memory from the driver's pool (cheap to take
// and give back per tensor, as the tape does); released in stream order.
void *ag_cuda_ctx_alloc(ag_cuda_ctx *ctx, int64_t bytes, q_err *err);
void ag_cuda_ctx_release(ag_cuda_ctx *ctx, void *p);

// Row-major C[M,N] = alpha op(A) op(B) + beta C on device fp32 arrays, as
// ag_gemm, computed in precision prec (16-bit modes round A and B into the
// context's scratch first; C and the accumulation stay fp32).
int ag_cuda_gemm(ag_cuda_ctx *ctx, ag_precision prec, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 float alpha, const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc, q_err *err);

// The loss head on the device, as ag_cross_entropy: rows of h [N,D] are
// taken token_chunk at a time and the vocabulary vocab_chunk columns at a
// time (logits GEMM in the context's precision, online log-sum-exp in fp32,
// per-row losses in double summed on the host in token order), with
// dh[N,D] += grad_scale * dloss/dh fused in when dh is not NULL. targets is a
// device array; ignored rows cost their share of the GEMMs but add nothing.
// Returns after the stream has finished (the loss is on the host).
int ag_cuda_cross_entropy(ag_cuda_ctx *ctx, double *loss_sum, int64_t *n_valid, float *dh, const float *h,
                          const float *Wlm, const int32_t *targets, int64_t N, int64_t D, int64_t V,
                          float grad_scale, int64_t token_chunk, int64_t vocab_chunk, q_err *err);

// ----------------------------------------------------------------------------
// tensors and the tape

typedef enum ag_device { AG_DEVICE_CPU, AG_DEVICE_CUDA } ag_device;

typedef struct ag_tensor {
    q_dtype dtype;       // F32 on the CPU path
    ag_device device;
    int ndim;
    int64_t shape[4];
    int64_t numel;
    float *data;         // [numel], device memory when device is AG_DEVICE_CUDA
    float *grad;         // [numel], NULL until a gradient reaches it (then zeroed and accumulated)
    bool requires_grad;  // false: nothing upstream wants a gradient (token inputs, embeddings)
} ag_tensor;

// Bytes held by tapes, shared by a tape and its recompute sub-tapes, so a
// step's peak activation memory can be read off and compared.
typedef struct ag_mem {
    int64_t live;
    int64_t peak;
} ag_mem;

typedef struct ag_record ag_record;
typedef struct ag_alloc {
    void *p;
    int64_t bytes;
    bool device;          // from the CUDA context's pool
} ag_alloc;
typedef struct ag_tape {
    ag_record *records;   // [n_records] in forward order
    int64_t n_records, cap_records;
    ag_alloc *allocs;     // every buffer this tape owns, freed by ag_tape_free
    int64_t n_allocs, cap_allocs;
    ag_mem *mem;          // accounting (may be shared)
    bool recording;       // false: forward only, nothing saved for a backward
    float *workspace;     // [workspace_numel] dequantized base weight, reused by every linear (CPU)
    int64_t workspace_numel;
    ag_cuda_ctx *cuda;    // not NULL: tensors live on the device and ops run through this context
    bool failed;          // an op failed; every later op is a no-op
    q_err err;            // what failed, when it was not an allocation on the host
} ag_tape;

// A tape that records (or not) and accounts its bytes into mem (may be NULL).
// The workspace must hold O*I floats of the largest linear.
void ag_tape_init(ag_tape *t, bool recording, ag_mem *mem, float *workspace, int64_t workspace_numel);
// A tape whose tensors live on the device: every op below dispatches to its
// ag_cuda_* kernel on ctx's stream, and every pointer handed to an op
// (weights, ids, positions, starts, targets, adapters) is a device pointer.
void ag_tape_init_cuda(ag_tape *t, bool recording, ag_mem *mem, ag_cuda_ctx *ctx);
// Replays the records in reverse. The caller has set the gradient of the
// final output (ag_cross_entropy does it itself).
void ag_tape_backward(ag_tape *t);
void ag_tape_free(ag_tape *t);  // frees every tensor and record the tape made

// A zeroed tensor owned by the tape (NULL and t->failed on allocation failure).
ag_tensor *ag_tensor_new(ag_tape *t, int ndim, const int64_t *shape, bool requires_grad);
// The gradient buffer of x, allocated zeroed on first use.
float *ag_tensor_grad(ag_tape *t, ag_tensor *x);

// The frozen base of a linear and its LoRA adapter, as the ops see them.
typedef struct ag_linear {
    int64_t in, out;
    nf4_view w;            // [O,I] quantized base (used when dense is NULL)
    q_dtype w_dtype;       // dtype the weight was quantized from: dequantized values are rounded to it, as bitsandbytes does
    const float *dense;    // [O,I] an unquantized base instead (tests, fp32 runs), or NULL
    const float *bias;     // [O] or NULL
    int64_t r;             // LoRA rank, 0 = no adapter
    float scale;           // alpha / r, or alpha / sqrt(r) with rsLoRA
    float dropout;
    uint64_t dropout_seed; // distinct per linear and step, so recompute draws the same mask
    const float *A;        // [r,I] fp32 values of the fp16 adapter
    const float *B;        // [O,r]
    float *dA, *dB;        // [r,I], [O,r] gradient accumulators (+=), or NULL
} ag_linear;

// The NF4 + LoRA linear on the device, every pointer of lin a device pointer
// (the nf4_view's arrays too). The base is dequantized into the context's
// workspace (rounded to w_dtype as the CPU does; straight to bf16/fp16 in the
// 16-bit modes), then one cuBLAS GEMM; forward and backward each dequantize
// again, so only one weight is ever expanded. LoRA in the cheap order:
// xa = xd A^T [N,r] first, then y += scale xa B^T. Semantics as
// ag_lora_linear_forward / ag_lora_linear_backward (with dA, dB from lin;
// dxd may alias dx).
int ag_cuda_linear_forward(ag_cuda_ctx *ctx, float *y, float *xa, const float *x, const float *xd,
                           const ag_linear *lin, int64_t N, q_err *err);
int ag_cuda_linear_backward(ag_cuda_ctx *ctx, float *dx, float *dxd, const float *dy, const float *xd,
                            const float *xa, const ag_linear *lin, int64_t N, q_err *err);

// Ops: allocate the output from the tape, run the forward kernel and, when
// recording, push the backward. Shapes as in the kernels; tensors are 2-D
// [N, features] and heads are a view of the features.
ag_tensor *ag_embedding(ag_tape *t, const int32_t *ids, const float *table, int64_t N, int64_t D);
ag_tensor *ag_rmsnorm(ag_tape *t, ag_tensor *x, const float *w, float eps);
ag_tensor *ag_linear_apply(ag_tape *t, ag_tensor *x, const ag_linear *lin);
ag_tensor *ag_rope(ag_tape *t, ag_tensor *x, const int32_t *pos, const float *inv_freq, int64_t H, int64_t hd);
ag_tensor *ag_attention(ag_tape *t, ag_tensor *q, ag_tensor *k, ag_tensor *v, const int32_t *start, int64_t H,
                        int64_t Hkv, int64_t hd);
ag_tensor *ag_swiglu(ag_tape *t, ag_tensor *gate, ag_tensor *up);
ag_tensor *ag_add(ag_tape *t, ag_tensor *a, ag_tensor *b);
// The loss head: loss_sum and n_valid as ag_cross_entropy returns them. When
// recording, dh is computed now (fused) and handed to h in the backward.
void ag_loss(ag_tape *t, ag_tensor *h, const float *Wlm, const int32_t *targets, int64_t V, float grad_scale,
             int64_t token_chunk, int64_t vocab_chunk, double *loss_sum, int64_t *n_valid);

// Activation checkpointing: runs fn(sub_tape, x, ctx) on a tape that keeps
// nothing, copies its output out, and records a step that reruns fn on a
// recording tape during the backward and replays it. fn must be
// deterministic (dropout masks are counter-based, so it is).
typedef ag_tensor *(*ag_segment_fn)(ag_tape *t, ag_tensor *x, void *ctx);
ag_tensor *ag_checkpoint(ag_tape *t, ag_tensor *x, ag_segment_fn fn, void *ctx);

#ifdef __cplusplus
}
#endif
#endif  // QLORA_AUTOGRAD_H
