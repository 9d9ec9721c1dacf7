// nf4/nf4.h: 4-bit NormalFloat (and FP4) blockwise quantization with double
// quantization of the scales, bit-compatible with bitsandbytes
// (docs: formats.md sections 1-4).
//
// A weight of numel n is cut into blocks of `blocksize` consecutive elements
// (row-major, the last block may be partial). Each block keeps its absmax in
// fp32 and each element a 4-bit code: the nearest table value to x / absmax.
// Two codes share a byte, the even element in the high nibble. With double
// quantization the fp32 absmax array is itself quantized: minus its mean
// (`offset`), then 8-bit codes of a signed dynamic map in blocks of 256, each
// with an fp32 `nested_absmax`. 4 + 8/64 + 32/(64*256) = 4.127 bits per weight.
//
// Where bitsandbytes' CPU and CUDA paths differ, qlora follows the CPU
// (default backend) path, because that is what runs without a GPU:
//   - an all-zero block gets code 7 (0.0) for NF4, not code 0;
//   - the trailing partial block divides by absmax, full blocks multiply by
//     the fp32 reciprocal;
//   - nested 8-bit codes: x / nested_absmax, nearest map value (ties to the
//     lower index).
// Non-finite weights are refused (bitsandbytes silently produces garbage).
#ifndef QLORA_NF4_H
#define QLORA_NF4_H

#include "core/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum nf4_qtype {
    NF4_QTYPE_NF4,
    NF4_QTYPE_FP4,
} nf4_qtype;

#define NF4_NESTED_BLOCKSIZE 256
#define NF4_DEFAULT_BLOCKSIZE 64

// ----------------------------------------------------------------------------
// tables

// The 16 code values, by code (NF4 ascending; FP4 sign-magnitude).
const float *nf4_code_table(nf4_qtype qt);
// The signed 8-bit dynamic map (create_dynamic_map(signed=True), 256 values
// ascending, computed as PyTorch's float32 linspace does on the CPU).
// Files store the map they were quantized with, and loaders use that copy.
void nf4_dynamic_map(float map[256]);
const char *nf4_qtype_name(nf4_qtype qt);  // "nf4" / "fp4"
int nf4_qtype_from_name(const char *name, nf4_qtype *out);

// 32, 64, ..., 4096 (bitsandbytes >= 0.49.2). Returns 0 when supported.
int nf4_blocksize_check(int64_t blocksize, q_err *err);
static inline int64_t nf4_nblocks(int64_t numel, int64_t blocksize) {
    return (numel + blocksize - 1) / blocksize;
}
static inline int64_t nf4_packed_bytes(int64_t numel) { return (numel + 1) / 2; }

// ----------------------------------------------------------------------------
// a quantized weight: non-owning view, host or device memory

typedef struct nf4_view {
    nf4_qtype qtype;
    int64_t numel;
    int64_t blocksize;
    const uint8_t *packed;        // [ceil(numel/2)] two codes per byte, even element high
    // exactly one of absmax / qabsmax is set
    const float *absmax;          // [nblocks] fp32 block scales (no double quant)
    const uint8_t *qabsmax;       // [nblocks] 8-bit codes of (absmax - offset)
    const float *nested_absmax;   // [ceil(nblocks/256)] scale of each 256 codes
    const float *nested_map;      // [256] the dynamic map the codes index
    float offset;                 // mean of the fp32 absmax
} nf4_view;

// ----------------------------------------------------------------------------
// a quantized weight: owning, host memory (what checkpoints hold)

typedef struct nf4_tensor {
    nf4_qtype qtype;
    q_dtype dtype;           // dtype of the weight before quantization (dequant target)
    int ndim;
    int64_t shape[4];        // [out, in] for a linear weight
    int64_t numel;
    int64_t blocksize;
    int64_t nblocks;
    bool nested;             // double-quantized scales
    uint8_t *packed;         // [ceil(numel/2)]
    float *absmax;           // [nblocks] when !nested
    uint8_t *qabsmax;        // [nblocks] when nested
    float *nested_absmax;    // [ceil(nblocks/256)] when nested
    float nested_map[256];   // when nested
    float offset;            // when nested
} nf4_tensor;

// Quantizes a float weight (F32/F16/BF16, row-major) on the CPU.
// `nested` selects double quantization with the built-in dynamic map.
int nf4_tensor_quantize(nf4_tensor *t, const void *w, q_dtype dtype, int ndim, const int64_t *shape,
                        nf4_qtype qt, int64_t blocksize, bool nested, q_err *err);
void nf4_tensor_free(nf4_tensor *t);
nf4_view nf4_tensor_view(const nf4_tensor *t);
// Bytes the quantized form takes (packed codes + scales + nested scales).
int64_t nf4_tensor_bytes(const nf4_tensor *t);

// ----------------------------------------------------------------------------
// CPU kernels (OpenMP over blocks)

// Step 1: absmax per block and packed codes. `x` is F32/F16/BF16.
// Fails on non-finite input, naming the element index.
int nf4_quantize_blocks(const void *x, q_dtype dtype, int64_t numel, nf4_qtype qt, int64_t blocksize,
                        uint8_t *packed, float *absmax, q_err *err);
// Step 2 (double quant): offset = mean(absmax); 8-bit codes of absmax - offset
// with `map`. When offset_in is non-NULL it is used instead of the mean
// (bitsandbytes' mean is PyTorch's float32 cascade sum, whose rounding depends
// on the CPU's vector width and thread count; tests pass its value in).
void nf4_double_quantize(const float *absmax, int64_t nblocks, const float map[256], const float *offset_in,
                         uint8_t *qabsmax, float *nested_absmax, float *offset);
// fp32 absmax of every block, undoing step 2 when the view is nested.
void nf4_absmax_dequantize(const nf4_view *q, float *absmax);
// Full dequantization to F32/F16/BF16, in bitsandbytes' order of operations.
int nf4_dequantize(const nf4_view *q, void *out, q_dtype out_dtype, q_err *err);

// ----------------------------------------------------------------------------
// CUDA kernels (device pointers in the view and outputs; stream may be NULL).
// Without a CUDA build these return an error saying so.

bool nf4_cuda_available(void);  // built with CUDA and a device is present
int nf4_cuda_dequantize(const nf4_view *q, void *out, q_dtype out_dtype, void *stream, q_err *err);
// 4-bit step on the device: F32/F16/BF16 input, writes packed codes and absmax.
// Same codes as the CPU path (it follows the CPU tie and all-zero rules).
int nf4_cuda_quantize_blocks(const void *x, q_dtype dtype, int64_t numel, nf4_qtype qt, int64_t blocksize,
                             uint8_t *packed, float *absmax, void *stream, q_err *err);
// Double quant on the device, offset given (computed on the host from absmax).
int nf4_cuda_double_quantize(const float *absmax, int64_t nblocks, const float *map, float offset,
                             uint8_t *qabsmax, float *nested_absmax, void *stream, q_err *err);

#ifdef __cplusplus
}
#endif
#endif  // QLORA_NF4_H
