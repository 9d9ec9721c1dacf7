// nf4/nf4_tables.c: the NF4 and FP4 code tables, their quantization
// thresholds, and the 8-bit signed dynamic map used for double quantization.
#include "nf4_internal.h"

#include <math.h>
#include <stdlib.h>

// bitsandbytes get_4bit_type("nf4"): normal quantiles, max-normalized,
// ascending (formats.md 1.1). float32 bits in the trailing comments.
static const float nf4_table[16] = {
    -1.0f,                  // 0xbf800000
    -0.6961928009986877f,   // 0xbf3239b1
    -0.5250730514526367f,   // 0xbf066b30
    -0.39491748809814453f,  // 0xbeca32a0
    -0.28444138169288635f,  // 0xbe91a24d
    -0.18477343022823334f,  // 0xbe3d353f
    -0.09105003625154495f,  // 0xbdba7871
    0.0f,                   // 0x00000000
    0.07958029955625534f,   // 0x3da2faff
    0.16093020141124725f,   // 0x3e24cae3
    0.24611230194568634f,   // 0x3e7c04dd
    0.33791524171829224f,   // 0x3ead033a
    0.44070982933044434f,   // 0x3ee1a4b8
    0.5626170039176941f,    // 0x3f1007ab
    0.7229568362236023f,    // 0x3f3913b3
    1.0f,                   // 0x3f800000
};

// bitsandbytes get_4bit_type("fp4"): bit 3 is the sign, bits 2..0 a
// 2-exponent/1-mantissa magnitude divided by 12. Code order is not value order.
static const float fp4_table[16] = {
    0.0f, 0.0052083334885537624f, 0.6666666865348816f, 1.0f,
    0.3333333432674408f, 0.5f, 0.1666666716337204f, 0.25f,
    0.0f, -0.0052083334885537624f, -0.6666666865348816f, -1.0f,
    -0.3333333432674408f, -0.5f, -0.1666666716337204f, -0.25f,
};

const float *nf4_code_table(nf4_qtype qt) { return qt == NF4_QTYPE_FP4 ? fp4_table : nf4_table; }

const char *nf4_qtype_name(nf4_qtype qt) { return qt == NF4_QTYPE_FP4 ? "fp4" : "nf4"; }

int nf4_qtype_from_name(const char *name, nf4_qtype *out) {
    if (strcmp(name, "nf4") == 0) { *out = NF4_QTYPE_NF4; return 0; }
    if (strcmp(name, "fp4") == 0) { *out = NF4_QTYPE_FP4; return 0; }
    return -1;
}

int nf4_blocksize_check(int64_t blocksize, q_err *err) {
    for (int64_t b = 32; b <= 4096; b *= 2)
        if (b == blocksize) return 0;
    return q_err_set(err, "unsupported block size %lld: must be a power of two from 32 to 4096",
                     (long long)blocksize);
}

// ----------------------------------------------------------------------------
// thresholds: sort the codes by value (stable, so FP4's +0 (code 0) sorts
// before its second zero (code 8)), then take float32 midpoints of
// neighbours. A value goes to the bucket above a threshold only when it is
// strictly greater: torch.bucketize(right=False), and the CUDA tree's `>`.

static int cmp_by_value(const void *a, const void *b) {
    const float *t = ((const int *)a)[1] ? fp4_table : nf4_table;
    int ia = ((const int *)a)[0], ib = ((const int *)b)[0];
    if (t[ia] < t[ib]) return -1;
    if (t[ia] > t[ib]) return 1;
    return ia - ib;
}

void nf4_bounds_init(nf4_qtype qt, nf4_bounds *b) {
    const float *t = nf4_code_table(qt);
    int pairs[16][2];
    for (int i = 0; i < 16; i++) { pairs[i][0] = i; pairs[i][1] = qt == NF4_QTYPE_FP4; }
    qsort(pairs, 16, sizeof pairs[0], cmp_by_value);
    for (int i = 0; i < 16; i++) b->order[i] = (uint8_t)pairs[i][0];
    for (int i = 0; i < 15; i++) b->mid[i] = (t[b->order[i]] + t[b->order[i + 1]]) / 2.0f;
}

// ----------------------------------------------------------------------------
// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for
// decade i = 0..6, the means of neighbouring points of linspace(0.1, 1,
// 2^i + 1), times 10^(i-6), with both signs; then 0 and 1; sorted.
// PyTorch's vectorized linspace rounds differently across builds (<= 2 ulp
// on ~40 entries), so this is one faithful instance, not every one; every file
// qlora writes carries the map its codes index (formats.md 2.2).

static float linspace_at(float start, float end, int steps, int i) {
    float step = (end - start) / (float)(steps - 1);
    // like torch: from the start for the first half, from the end after it
    return i < steps / 2 ? start + step * (float)i : end - step * (float)(steps - 1 - i);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

void nf4_dynamic_map(float map[256]) {
    int n = 0;
    for (int i = 0; i < 7; i++) {
        int items = (1 << i) + 1;
        float scale = (float)pow(10.0, i - 6);
        for (int k = 0; k + 1 < items; k++) {
            float mean = (linspace_at(0.1f, 1.0f, items, k) + linspace_at(0.1f, 1.0f, items, k + 1)) / 2.0f;
            map[n++] = scale * mean;
            map[n++] = -(scale * mean);
        }
    }
    map[n++] = 0.0f;
    map[n++] = 1.0f;
    qsort(map, 256, sizeof(float), cmp_float);
}
