// nf4/nf4.c: CPU quantization and dequantization, the reference for the CUDA
// kernels and the path qlora uses to write bnb-4bit checkpoints.
//
// Floating-point order matters here: every product and sum below is a single
// fp32 operation in the order bitsandbytes performs it, and the build turns
// off FMA contraction (-ffp-contract=off), so results are bit-identical.
#include "nf4_internal.h"

#include <math.h>
#include <stdlib.h>

// ----------------------------------------------------------------------------
// step 1: block absmax and 4-bit codes

static inline int bucket_of(float x, const float mid[15]) {
    int k = 0;
    for (int i = 0; i < 15; i++) k += x > mid[i];  // branch-free; NaN lands in bucket 0
    return k;
}

int nf4_quantize_blocks(const void *x, q_dtype dtype, int64_t numel, nf4_qtype qt, int64_t blocksize,
                        uint8_t *packed, float *absmax, q_err *err) {
    if (!q_dtype_is_float(dtype))
        return q_err_set(err, "cannot quantize dtype %s: expected F32, F16 or BF16", q_dtype_name(dtype));
    if (nf4_blocksize_check(blocksize, err)) return -1;
    if (numel <= 0) return q_err_set(err, "cannot quantize an empty tensor");
    nf4_bounds bounds;
    nf4_bounds_init(qt, &bounds);
    const int64_t nblocks = nf4_nblocks(numel, blocksize);
    const size_t esize = q_dtype_size(dtype);
    int64_t bad_index = -1;  // first non-finite element found by any thread

#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        float v[4096];
        const int64_t start = b * blocksize;
        const int64_t len = start + blocksize <= numel ? blocksize : numel - start;
        q_convert_to_f32((const char *)x + start * esize, dtype, v, (size_t)len);
        float amax = 0.0f;
        bool finite = true;
        for (int64_t i = 0; i < len; i++) {
            finite &= isfinite(v[i]) != 0;
            amax = fmaxf(amax, fabsf(v[i]));
        }
        if (!finite) {
#pragma omp critical
            if (bad_index < 0 || start < bad_index) bad_index = start;
            continue;
        }
        absmax[b] = amax;
        // bitsandbytes' CPU path: clamp the scale away from 0 (an all-zero
        // block then maps to the code of 0.0); full blocks multiply by the
        // fp32 reciprocal, the trailing partial block divides.
        const float am = fmaxf(amax, 1e-38f);
        if (len == blocksize) {
            const float r = 1.0f / am;
            for (int64_t i = 0; i < len; i++) v[i] = v[i] * r;
        } else {
            for (int64_t i = 0; i < len; i++) v[i] = v[i] / am;
            v[len] = 0.0f;  // an odd tail pads the last low nibble with the code of 0.0
        }
        uint8_t *out = packed + start / 2;
        for (int64_t i = 0; i < len; i += 2) {
            uint8_t hi = bounds.order[bucket_of(v[i], bounds.mid)];
            uint8_t lo = bounds.order[bucket_of(v[i + 1], bounds.mid)];
            out[i / 2] = (uint8_t)(hi << 4 | lo);
        }
    }
    if (bad_index >= 0) {
        // report the exact element, found serially in the offending block
        const int64_t len = bad_index + blocksize <= numel ? blocksize : numel - bad_index;
        float v[4096];
        q_convert_to_f32((const char *)x + bad_index * esize, dtype, v, (size_t)len);
        int64_t i = 0;
        while (i < len && isfinite(v[i])) i++;
        return q_err_set(err, "non-finite weight (%g) at element %lld: refusing to quantize", v[i < len ? i : 0],
                         (long long)(bad_index + i));
    }
    return 0;
}

// ----------------------------------------------------------------------------
// step 2: double quantization of the absmax array

// Nearest entry of an ascending 256-entry map, as bitsandbytes' CPU
// quantize_blockwise finds it: the entry at or below x by binary search,
// then the one above if it is strictly closer.
static inline int map_nearest(float x, const float map[256]) {
    int lo = 0, hi = 255;  // invariant: answer in [lo, hi]
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (map[mid] <= x) lo = mid;
        else hi = mid - 1;
    }
    if (lo < 255 && fabsf(x - map[lo + 1]) < fabsf(x - map[lo])) lo++;
    return lo;
}

void nf4_double_quantize(const float *absmax, int64_t nblocks, const float map[256], const float *offset_in,
                         uint8_t *qabsmax, float *nested_absmax, float *offset) {
    float off;
    if (offset_in) {
        off = *offset_in;
    } else {
        // mean = fp32(sum) / n, with the sum accumulated in double so it does
        // not depend on thread count or vector width.
        double sum = 0.0;
        for (int64_t i = 0; i < nblocks; i++) sum += absmax[i];
        off = (float)sum / (float)nblocks;
    }
    *offset = off;
    const int64_t nnested = nf4_nblocks(nblocks, NF4_NESTED_BLOCKSIZE);
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < nnested; j++) {
        const int64_t start = j * NF4_NESTED_BLOCKSIZE;
        const int64_t end = start + NF4_NESTED_BLOCKSIZE < nblocks ? start + NF4_NESTED_BLOCKSIZE : nblocks;
        float m = 0.0f;
        for (int64_t i = start; i < end; i++) m = fmaxf(m, fabsf(absmax[i] - off));
        nested_absmax[j] = m;
        for (int64_t i = start; i < end; i++) {
            // all scales equal to the offset (0/0): any code decodes to the offset; bitsandbytes
            // (CPU and CUDA) yields code 0 there, so does qlora
            qabsmax[i] = m > 0.0f ? (uint8_t)map_nearest((absmax[i] - off) / m, map) : 0;
        }
    }
}

void nf4_absmax_dequantize(const nf4_view *q, float *absmax) {
    const int64_t nblocks = nf4_nblocks(q->numel, q->blocksize);
    if (!q->qabsmax) {
        memcpy(absmax, q->absmax, (size_t)nblocks * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < nblocks; i++) {
        float s = q->nested_map[q->qabsmax[i]] * q->nested_absmax[i / NF4_NESTED_BLOCKSIZE];
        absmax[i] = s + q->offset;  // two roundings, as bitsandbytes: dequantize_blockwise, then += offset
    }
}

// ----------------------------------------------------------------------------
// dequantization: per block, the 16 possible outputs are computed once
// (table value * absmax, rounded to the output dtype), then every element is
// a lookup. Same bits as multiplying element by element, far fewer flops.

int nf4_dequantize(const nf4_view *q, void *out, q_dtype out_dtype, q_err *err) {
    if (!q_dtype_is_float(out_dtype))
        return q_err_set(err, "cannot dequantize to %s: expected F32, F16 or BF16", q_dtype_name(out_dtype));
    if (nf4_blocksize_check(q->blocksize, err)) return -1;
    const int64_t nblocks = nf4_nblocks(q->numel, q->blocksize);
    float *absmax = malloc((size_t)nblocks * sizeof(float));
    if (!absmax) return q_err_set(err, "out of memory for %lld block scales", (long long)nblocks);
    nf4_absmax_dequantize(q, absmax);
    const float *table = nf4_code_table(q->qtype);
    const int64_t numel = q->numel, bs = q->blocksize;

#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * bs, len = start + bs <= numel ? bs : numel - start;
        const uint8_t *in = q->packed + start / 2;
        float lut[16];
        for (int c = 0; c < 16; c++) lut[c] = table[c] * absmax[b];
        if (out_dtype == Q_DTYPE_F32) {
            float *o = (float *)out + start;
            for (int64_t i = 0; i + 1 < len; i += 2) {
                o[i] = lut[in[i / 2] >> 4];
                o[i + 1] = lut[in[i / 2] & 15];
            }
            if (len & 1) o[len - 1] = lut[in[len / 2] >> 4];
        } else {
            uint16_t h[16];
            for (int c = 0; c < 16; c++)
                h[c] = out_dtype == Q_DTYPE_BF16 ? q_f32_to_bf16(lut[c]) : q_f32_to_f16(lut[c]);
            uint16_t *o = (uint16_t *)out + start;
            for (int64_t i = 0; i + 1 < len; i += 2) {
                o[i] = h[in[i / 2] >> 4];
                o[i + 1] = h[in[i / 2] & 15];
            }
            if (len & 1) o[len - 1] = h[in[len / 2] >> 4];
        }
    }
    free(absmax);
    return 0;
}

// ----------------------------------------------------------------------------
// owning tensor

int nf4_tensor_quantize(nf4_tensor *t, const void *w, q_dtype dtype, int ndim, const int64_t *shape,
                        nf4_qtype qt, int64_t blocksize, bool nested, q_err *err) {
    memset(t, 0, sizeof *t);
    if (ndim < 1 || ndim > 4) return q_err_set(err, "cannot quantize a %d-dimensional tensor (1 to 4)", ndim);
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] <= 0) return q_err_set(err, "cannot quantize a tensor with dimension %d of size %lld", i,
                                            (long long)shape[i]);
        if (numel > INT64_MAX / shape[i]) return q_err_set(err, "tensor too large to quantize");
        numel *= shape[i];
        t->shape[i] = shape[i];
    }
    if (nf4_blocksize_check(blocksize, err)) return -1;
    t->qtype = qt;
    t->dtype = dtype;
    t->ndim = ndim;
    t->numel = numel;
    t->blocksize = blocksize;
    t->nblocks = nf4_nblocks(numel, blocksize);
    t->nested = nested;
    float *absmax = malloc((size_t)t->nblocks * sizeof(float));
    t->packed = malloc((size_t)nf4_packed_bytes(numel));
    if (!absmax || !t->packed) {
        free(absmax);
        nf4_tensor_free(t);
        return q_err_set(err, "out of memory quantizing %lld elements", (long long)numel);
    }
    if (nf4_quantize_blocks(w, dtype, numel, qt, blocksize, t->packed, absmax, err)) {
        free(absmax);
        nf4_tensor_free(t);
        return -1;
    }
    if (!nested) {
        t->absmax = absmax;
        return 0;
    }
    t->qabsmax = malloc((size_t)t->nblocks);
    t->nested_absmax = malloc((size_t)nf4_nblocks(t->nblocks, NF4_NESTED_BLOCKSIZE) * sizeof(float));
    if (!t->qabsmax || !t->nested_absmax) {
        free(absmax);
        nf4_tensor_free(t);
        return q_err_set(err, "out of memory quantizing %lld block scales", (long long)t->nblocks);
    }
    nf4_dynamic_map(t->nested_map);
    nf4_double_quantize(absmax, t->nblocks, t->nested_map, NULL, t->qabsmax, t->nested_absmax, &t->offset);
    free(absmax);
    return 0;
}

void nf4_tensor_free(nf4_tensor *t) {
    free(t->packed);
    free(t->absmax);
    free(t->qabsmax);
    free(t->nested_absmax);
    t->packed = t->qabsmax = NULL;
    t->absmax = t->nested_absmax = NULL;
}

nf4_view nf4_tensor_view(const nf4_tensor *t) {
    nf4_view v = {
        .qtype = t->qtype, .numel = t->numel, .blocksize = t->blocksize, .packed = t->packed,
        .absmax = t->nested ? NULL : t->absmax, .qabsmax = t->nested ? t->qabsmax : NULL,
        .nested_absmax = t->nested ? t->nested_absmax : NULL, .nested_map = t->nested ? t->nested_map : NULL,
        .offset = t->offset,
    };
    return v;
}

int64_t nf4_tensor_bytes(const nf4_tensor *t) {
    int64_t b = nf4_packed_bytes(t->numel);
    if (t->nested)
        b += t->nblocks + nf4_nblocks(t->nblocks, NF4_NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4;
    else
        b += t->nblocks * 4;
    return b;
}
