// nf4/nf4_internal.h: pieces shared by the CPU (.c) and CUDA (.cu) files of
// nf4/. Not part of the public API.
#ifndef QLORA_NF4_INTERNAL_H
#define QLORA_NF4_INTERNAL_H

#include "nf4.h"

#ifdef __cplusplus
extern "C" {
#endif

// Quantization thresholds of a 4-bit table: a scaled value x gets bucket
// k = #{i : x > mid[i]} and code order[k].
typedef struct nf4_bounds {
    float mid[15];     // ascending midpoints between neighbouring values
    uint8_t order[16]; // code of the k-th smallest value
} nf4_bounds;

void nf4_bounds_init(nf4_qtype qt, nf4_bounds *b);

#ifdef __cplusplus
}
#endif
#endif
