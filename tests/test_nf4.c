// tests/test_nf4.c: NF4/FP4 quantization against bitsandbytes' own bytes
// (tests/fixtures/nf4_bnb.safetensors, made by
// scripts/fixtures/make_nf4_fixtures.py), plus properties on random inputs
// and the CUDA kernels against the CPU path when a GPU is present.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "nf4/nf4.h"
#include "test_util.h"

#ifdef QLORA_HAVE_CUDA
#include <cuda_runtime.h>
#endif

// ----------------------------------------------------------------------------
// tables against the values documented in formats.md 1.1, 1.2, 1.5

static void test_tables(void) {
    static const uint32_t nf4_bits[16] = {
        0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
        0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};
    static const uint32_t fp4_bits[8] = {0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000,
                                         0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000};
    const float *nf4 = nf4_code_table(NF4_QTYPE_NF4), *fp4 = nf4_code_table(NF4_QTYPE_FP4);
    for (int i = 0; i < 16; i++) CU_ASSERT_EQUAL(q_f32_bits(nf4[i]), nf4_bits[i]);
    for (int i = 0; i < 8; i++) {
        CU_ASSERT_EQUAL(q_f32_bits(fp4[i]), fp4_bits[i]);
        CU_ASSERT_EQUAL(fp4[i + 8], -fp4[i]);
    }
    q_err err;
    for (int64_t bs = 32; bs <= 4096; bs *= 2) CU_ASSERT_EQUAL(nf4_blocksize_check(bs, &err), 0);
    CU_ASSERT_EQUAL(nf4_blocksize_check(16, &err), -1);
    CU_ASSERT_EQUAL(nf4_blocksize_check(48, &err), -1);
    CU_ASSERT_EQUAL(nf4_blocksize_check(8192, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "8192"));
}

// The signed dynamic map: shape facts from formats.md 2.2, and every entry
// within 2 ulp of the map bitsandbytes built for the fixtures (builds of
// PyTorch round linspace differently; files carry their own map).
static void test_dynamic_map(void) {
    float map[256];
    nf4_dynamic_map(map);
    for (int i = 1; i < 256; i++) CU_ASSERT(map[i] > map[i - 1]);
    CU_ASSERT_EQUAL(q_f32_bits(map[0]), 0xbf7e3333u);  // -0.99296875, no -1.0
    CU_ASSERT_EQUAL(map[127], 0.0f);
    CU_ASSERT_EQUAL(map[255], 1.0f);
    CU_ASSERT_EQUAL(q_f32_bits(map[128]), 0x3513a3b7u);  // 5.5e-7, the smallest positive
    q_st_file f;
    q_err err;
    TEST_OK(q_st_open(&f, test_fixture("nf4_bnb.safetensors"), &err), &err);
    const q_st_tensor *ref = q_st_find(&f, "c0.nested_map");
    CU_ASSERT_PTR_NOT_NULL_FATAL(ref);
    int differ = 0;
    for (int i = 0; i < 256; i++) {
        float r;
        memcpy(&r, (const char *)ref->data + 4 * i, 4);
        int64_t ulps = llabs((int64_t)(int32_t)q_f32_bits(map[i]) - (int64_t)(int32_t)q_f32_bits(r));
        CU_ASSERT(ulps <= 2);
        differ += ulps != 0;
    }
    printf("\n    dynamic map: %d of 256 entries differ from this PyTorch build's (each <= 2 ulp) ", differ);
    q_st_close(&f);
}

// ----------------------------------------------------------------------------
// golden: bitsandbytes' bytes

typedef struct fixture_case {
    const q_st_tensor *input, *packed, *absmax, *qabsmax, *nested_absmax, *nested_map, *offset, *dequant;
    nf4_qtype qtype;
    int64_t blocksize;
    char kind[64];
} fixture_case;

static int case_load(const q_st_file *f, int k, fixture_case *c) {
    char key[64];
#define GET(field)                                               \
    snprintf(key, sizeof key, "c%d." #field, k);                 \
    c->field = q_st_find(f, key);                                \
    if (!c->field) return -1;
    GET(input) GET(packed) GET(absmax) GET(qabsmax) GET(nested_absmax) GET(nested_map) GET(offset) GET(dequant)
#undef GET
    snprintf(key, sizeof key, "c%d", k);
    const char *meta = q_st_meta(f, key);
    q_json *j;
    q_err err;
    if (!meta || q_json_parse(meta, strlen(meta), &j, &err)) return -1;
    nf4_qtype_from_name(q_json_get(j, "qtype")->string, &c->qtype);
    c->blocksize = q_json_get(j, "blocksize")->integer;
    snprintf(c->kind, sizeof c->kind, "%s", q_json_get(j, "kind")->string);
    q_json_free(j);
    return 0;
}

static float tensor_f32(const q_st_tensor *t, int64_t i) {
    float v;
    memcpy(&v, (const char *)t->data + 4 * i, 4);
    return v;
}

static void test_bnb_golden(void) {
    q_st_file f;
    q_err err;
    TEST_OK(q_st_open(&f, test_fixture("nf4_bnb.safetensors"), &err), &err);
    const char *ncases = q_st_meta(&f, "cases");
    CU_ASSERT_PTR_NOT_NULL_FATAL(ncases);
    int n = atoi(ncases), checked = 0, offset_exact = 0, near_tie_codes = 0, total_codes = 0;
    double max_offset_rel = 0;
    CU_ASSERT_FATAL(n >= 20);
    for (int k = 0; k < n; k++) {
        fixture_case c;
        CU_ASSERT_EQUAL_FATAL(case_load(&f, k, &c), 0);
        const int64_t numel = c.input->numel, nblocks = nf4_nblocks(numel, c.blocksize);
        const int64_t nnested = nf4_nblocks(nblocks, NF4_NESTED_BLOCKSIZE);
        total_codes += (int)nblocks;
        CU_ASSERT_EQUAL_FATAL(c.packed->numel, nf4_packed_bytes(numel));
        CU_ASSERT_EQUAL_FATAL(c.absmax->numel, nblocks);

        // 1. 4-bit codes byte for byte, fp32 absmax bit for bit
        uint8_t *packed = malloc((size_t)c.packed->numel);
        float *absmax = malloc((size_t)nblocks * 4);
        TEST_OK(nf4_quantize_blocks(c.input->data, c.input->dtype, numel, c.qtype, c.blocksize, packed, absmax,
                                    &err), &err);
        int bad_bytes = 0;
        for (int64_t i = 0; i < c.packed->numel; i++) bad_bytes += packed[i] != ((const uint8_t *)c.packed->data)[i];
        if (bad_bytes) printf("\n    case %d (%s): %d packed bytes differ ", k, c.kind, bad_bytes);
        CU_ASSERT_EQUAL(bad_bytes, 0);
        CU_ASSERT_EQUAL(memcmp(absmax, c.absmax->data, (size_t)nblocks * 4), 0);

        // 2. double quantization with bitsandbytes' offset and map: codes and nested scales exact
        float off_ref = tensor_f32(c.offset, 0), off_ours, off_used;
        uint8_t *qabsmax = malloc((size_t)nblocks);
        float *nested = malloc((size_t)nnested * 4), map[256];
        memcpy(map, c.nested_map->data, sizeof map);
        nf4_double_quantize(absmax, nblocks, map, &off_ref, qabsmax, nested, &off_used);
        CU_ASSERT_EQUAL(off_used, off_ref);
        // bitsandbytes' CPU 8-bit quantizer (0.50.2) is not exactly nearest: measured, it
        // flips to the farther code within ~1.5e-5 of the midpoint between two map
        // entries. qlora takes the exact nearest. A code may differ only there, by one.
        int bad_codes = 0;
        for (int64_t i = 0; i < nblocks; i++) {
            const int theirs = ((const uint8_t *)c.qabsmax->data)[i], ours = qabsmax[i];
            if (theirs == ours) continue;
            const float m = nested[i / NF4_NESTED_BLOCKSIZE], z = (absmax[i] - off_ref) / m;
            const float mid = (map[theirs] + map[ours]) / 2;
            const bool near_mid = abs(theirs - ours) == 1 && fabsf(z - mid) < 2e-5f;
            near_tie_codes++;
            if (!near_mid) {
                printf("\n    case %d (%s): nested code %lld: ours %d, bitsandbytes %d, scaled %.9g ", k, c.kind,
                       (long long)i, ours, theirs, z);
                bad_codes++;
            }
        }
        CU_ASSERT_EQUAL(bad_codes, 0);
        CU_ASSERT_EQUAL(memcmp(nested, c.nested_absmax->data, (size_t)nnested * 4), 0);

        // 3. our own offset (double-accumulated mean) against PyTorch's float32 mean
        nf4_double_quantize(absmax, nblocks, map, NULL, qabsmax, nested, &off_ours);
        double rel = fabs((double)off_ours - off_ref) / fabs(off_ref);
        if (rel > max_offset_rel) max_offset_rel = rel;
        offset_exact += off_ours == off_ref;
        CU_ASSERT(rel <= 4 * 1.2e-7);  // a few fp32 ulps: PyTorch's cascade sum rounds per chunk

        // 4. dequantization of bitsandbytes' double-quantized state, bit for bit, in the input dtype
        nf4_view v = {.qtype = c.qtype, .numel = numel, .blocksize = c.blocksize, .packed = c.packed->data,
                      .qabsmax = c.qabsmax->data, .nested_absmax = c.nested_absmax->data,
                      .nested_map = c.nested_map->data, .offset = off_ref};
        void *out = malloc(c.dequant->nbytes);
        memset(out, 0xff, c.dequant->nbytes);  // poison: unwritten elements show up as NaN bits
        TEST_OK(nf4_dequantize(&v, out, c.dequant->dtype, &err), &err);
        CU_ASSERT_EQUAL(memcmp(out, c.dequant->data, c.dequant->nbytes), 0);
        checked++;
        free(out);
        free(packed);
        free(absmax);
        free(qabsmax);
        free(nested);
    }
    printf("\n    %d bitsandbytes cases: codes, scales, dequantized values exact; %d of %d nested codes differ"
           " at a near-tie; own offset equal in %d, max rel diff %.2e ",
           checked, near_tie_codes, total_codes, offset_exact, max_offset_rel);
    q_st_close(&f);
}

// ----------------------------------------------------------------------------
// properties on fresh random inputs

// Nearest-code quantization: each weight is off by at most half the widest
// gap of the table, times its block's absmax (plus double-quant scale error).
static void test_random_roundtrip(void) {
    uint64_t rng = 42;
    const q_dtype dts[3] = {Q_DTYPE_F32, Q_DTYPE_F16, Q_DTYPE_BF16};
    for (int64_t bs = 32; bs <= 4096; bs *= 2) {
        for (int d = 0; d < 3; d++) {
            for (int nested = 0; nested < 2; nested++) {
                const int64_t shape[2] = {37, 129};  // odd numel, partial last block
                const int64_t n = shape[0] * shape[1];
                float *x = malloc(n * 4), *xr = malloc(n * 4), *y = malloc(n * 4);
                void *xin = malloc(n * 4);
                for (int64_t i = 0; i < n; i++) x[i] = 0.05f * test_normal(&rng);
                q_convert_from_f32(x, xin, dts[d], n);
                q_convert_to_f32(xin, dts[d], xr, n);  // the exact values quantized
                nf4_tensor t;
                q_err err;
                TEST_OK(nf4_tensor_quantize(&t, xin, dts[d], 2, shape, NF4_QTYPE_NF4, bs, nested, &err), &err);
                nf4_view v = nf4_tensor_view(&t);
                float *amax = malloc(t.nblocks * 4);
                nf4_absmax_dequantize(&v, amax);
                TEST_OK(nf4_dequantize(&v, y, Q_DTYPE_F32, &err), &err);
                const float half_gap = (-0.6961928009986877f + 1.0f) / 2;  // widest NF4 gap (codes 0, 1) / 2
                int bad = 0;
                for (int64_t i = 0; i < n; i++) {
                    float true_amax = 0;
                    int64_t b0 = (i / bs) * bs, b1 = b0 + bs < n ? b0 + bs : n;
                    for (int64_t j = b0; j < b1; j++) true_amax = fmaxf(true_amax, fabsf(xr[j]));
                    float bound = half_gap * true_amax + fabsf(amax[i / bs] - true_amax) + 1e-6f * true_amax;
                    bad += !(fabsf(y[i] - xr[i]) <= bound);
                }
                CU_ASSERT_EQUAL(bad, 0);
                // double quant: each scale within half the widest map gap (0.9/64, the top decade) of its nested absmax
                for (int64_t b = 0; nested && b < t.nblocks; b++) {
                    float true_amax = 0;
                    for (int64_t j = b * bs; j < (b + 1) * bs && j < n; j++) true_amax = fmaxf(true_amax, fabsf(xr[j]));
                    CU_ASSERT(fabsf(amax[b] - true_amax) <= 0.00704f * t.nested_absmax[b / 256] + 1e-6f * true_amax);
                }
                nf4_tensor_free(&t);
                free(x), free(xr), free(y), free(xin), free(amax);
            }
        }
    }
}

static void test_errors(void) {
    q_err err;
    float x[64] = {0};
    uint8_t packed[32];
    float absmax[1];
    x[17] = NAN;
    CU_ASSERT_EQUAL(nf4_quantize_blocks(x, Q_DTYPE_F32, 64, NF4_QTYPE_NF4, 64, packed, absmax, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "non-finite"));
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "element 17"));
    x[17] = INFINITY;
    CU_ASSERT_EQUAL(nf4_quantize_blocks(x, Q_DTYPE_F32, 64, NF4_QTYPE_NF4, 64, packed, absmax, &err), -1);
    x[17] = 0;
    CU_ASSERT_EQUAL(nf4_quantize_blocks(x, Q_DTYPE_F32, 64, NF4_QTYPE_NF4, 48, packed, absmax, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "block size 48"));
    CU_ASSERT_EQUAL(nf4_quantize_blocks(x, Q_DTYPE_I32, 64, NF4_QTYPE_NF4, 64, packed, absmax, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "I32"));
    nf4_tensor t;
    const int64_t bad_shape[2] = {4, 0};
    CU_ASSERT_EQUAL(nf4_tensor_quantize(&t, x, Q_DTYPE_F32, 2, bad_shape, NF4_QTYPE_NF4, 64, true, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "dimension 1"));
    const int64_t ok_shape[2] = {4, 16};
    CU_ASSERT_EQUAL(nf4_tensor_quantize(&t, x, Q_DTYPE_F32, 2, ok_shape, NF4_QTYPE_NF4, 100, true, &err), -1);
    // an all-zero tensor is fine: every scale 0, every code 7, dequantizes to zeros
    TEST_OK(nf4_tensor_quantize(&t, x, Q_DTYPE_F32, 2, ok_shape, NF4_QTYPE_NF4, 64, true, &err), &err);
    for (int i = 0; i < 32; i++) CU_ASSERT_EQUAL(t.packed[i], 0x77);
    float y[64];
    nf4_view v = nf4_tensor_view(&t);
    TEST_OK(nf4_dequantize(&v, y, Q_DTYPE_F32, &err), &err);
    for (int i = 0; i < 64; i++) CU_ASSERT_EQUAL(y[i], 0.0f);
    nf4_tensor_free(&t);
}

// ----------------------------------------------------------------------------
// CUDA against the CPU path, on fresh random inputs; outputs poisoned first

#ifdef QLORA_HAVE_CUDA
#define DEV_CHECK(call) CU_ASSERT_EQUAL_FATAL((call), cudaSuccess)

static void test_cuda_vs_cpu(void) {
    if (!nf4_cuda_available()) {
        printf("\n    SKIPPED: no CUDA device present; the CUDA kernels were not run ");
        return;
    }
    uint64_t rng = 7;
    const q_dtype dts[3] = {Q_DTYPE_F32, Q_DTYPE_F16, Q_DTYPE_BF16};
    const int64_t lens[3] = {1, 4097, 300001};
    for (int64_t bs = 32; bs <= 4096; bs *= 2)
        for (int d = 0; d < 3; d++)
            for (int li = 0; li < 3; li++)
                for (int qt = 0; qt < 2; qt++) {
                    const int64_t n = lens[li], nb = nf4_nblocks(n, bs), nn = nf4_nblocks(nb, 256);
                    const size_t es = q_dtype_size(dts[d]);
                    float *x = malloc(n * 4);
                    void *xin = malloc(n * es);
                    for (int64_t i = 0; i < n; i++) x[i] = 0.02f * test_normal(&rng) * (i % 97 == 0 ? 30 : 1);
                    q_convert_from_f32(x, xin, dts[d], n);
                    q_err err;
                    uint8_t *packed = malloc(nf4_packed_bytes(n)), *packed_d = malloc(nf4_packed_bytes(n));
                    float *absmax = malloc(nb * 4), *absmax_d = malloc(nb * 4), map[256];
                    TEST_OK(nf4_quantize_blocks(xin, dts[d], n, (nf4_qtype)qt, bs, packed, absmax, &err), &err);
                    void *dx, *dout;
                    uint8_t *dpacked, *dq;
                    float *dabsmax, *dnested, *dmap;
                    DEV_CHECK(cudaMalloc(&dx, n * es));
                    DEV_CHECK(cudaMalloc((void **)&dpacked, nf4_packed_bytes(n)));
                    DEV_CHECK(cudaMalloc((void **)&dabsmax, nb * 4));
                    DEV_CHECK(cudaMalloc((void **)&dq, nb));
                    DEV_CHECK(cudaMalloc((void **)&dnested, nn * 4));
                    DEV_CHECK(cudaMalloc((void **)&dmap, 1024));
                    DEV_CHECK(cudaMalloc(&dout, n * es));
                    DEV_CHECK(cudaMemcpy(dx, xin, n * es, cudaMemcpyHostToDevice));
                    DEV_CHECK(cudaMemset(dpacked, 0xab, nf4_packed_bytes(n)));
                    DEV_CHECK(cudaMemset(dabsmax, 0xff, nb * 4));
                    TEST_OK(nf4_cuda_quantize_blocks(dx, dts[d], n, (nf4_qtype)qt, bs, dpacked, dabsmax, NULL, &err),
                            &err);
                    DEV_CHECK(cudaMemcpy(packed_d, dpacked, nf4_packed_bytes(n), cudaMemcpyDeviceToHost));
                    DEV_CHECK(cudaMemcpy(absmax_d, dabsmax, nb * 4, cudaMemcpyDeviceToHost));
                    CU_ASSERT_EQUAL(memcmp(packed, packed_d, nf4_packed_bytes(n)), 0);
                    CU_ASSERT_EQUAL(memcmp(absmax, absmax_d, nb * 4), 0);

                    // double quant with the host's offset, then dequant: both against the CPU
                    uint8_t *q = malloc(nb), *q_d = malloc(nb);
                    float *nested = malloc(nn * 4), *nested_d = malloc(nn * 4), off;
                    nf4_dynamic_map(map);
                    nf4_double_quantize(absmax, nb, map, NULL, q, nested, &off);
                    DEV_CHECK(cudaMemcpy(dmap, map, 1024, cudaMemcpyHostToDevice));
                    DEV_CHECK(cudaMemset(dq, 0xab, nb));
                    TEST_OK(nf4_cuda_double_quantize(dabsmax, nb, dmap, off, dq, dnested, NULL, &err), &err);
                    DEV_CHECK(cudaMemcpy(q_d, dq, nb, cudaMemcpyDeviceToHost));
                    DEV_CHECK(cudaMemcpy(nested_d, dnested, nn * 4, cudaMemcpyDeviceToHost));
                    CU_ASSERT_EQUAL(memcmp(q, q_d, nb), 0);
                    CU_ASSERT_EQUAL(memcmp(nested, nested_d, nn * 4), 0);
                    for (q_dtype od = Q_DTYPE_F32; od <= Q_DTYPE_BF16; od++) {
                        const size_t os = q_dtype_size(od);
                        void *ref = malloc(n * os), *got = malloc(n * os);
                        nf4_view v = {.qtype = (nf4_qtype)qt, .numel = n, .blocksize = bs, .packed = packed,
                                      .qabsmax = q, .nested_absmax = nested, .nested_map = map, .offset = off};
                        TEST_OK(nf4_dequantize(&v, ref, od, &err), &err);
                        nf4_view dv = v;
                        dv.packed = dpacked, dv.qabsmax = dq, dv.nested_absmax = dnested, dv.nested_map = dmap;
                        DEV_CHECK(cudaMemset(dout, 0xff, n * os));
                        TEST_OK(nf4_cuda_dequantize(&dv, dout, od, NULL, &err), &err);
                        DEV_CHECK(cudaMemcpy(got, dout, n * os, cudaMemcpyDeviceToHost));
                        CU_ASSERT_EQUAL(memcmp(ref, got, n * os), 0);
                        free(ref), free(got);
                    }
                    cudaFree(dx), cudaFree(dpacked), cudaFree(dabsmax), cudaFree(dq), cudaFree(dnested);
                    cudaFree(dmap), cudaFree(dout);
                    free(x), free(xin), free(packed), free(packed_d), free(absmax), free(absmax_d);
                    free(q), free(q_d), free(nested), free(nested_d);
                }
    // the non-finite policy holds on the device too
    float bad[64] = {0};
    bad[5] = NAN;
    void *dbad;
    uint8_t *dp;
    float *da;
    q_err err;
    DEV_CHECK(cudaMalloc(&dbad, sizeof bad));
    DEV_CHECK(cudaMalloc((void **)&dp, 32));
    DEV_CHECK(cudaMalloc((void **)&da, 4));
    DEV_CHECK(cudaMemcpy(dbad, bad, sizeof bad, cudaMemcpyHostToDevice));
    CU_ASSERT_EQUAL(nf4_cuda_quantize_blocks(dbad, Q_DTYPE_F32, 64, NF4_QTYPE_NF4, 64, dp, da, NULL, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "element 5"));
    cudaFree(dbad), cudaFree(dp), cudaFree(da);
}
#else
static void test_cuda_vs_cpu(void) {
    printf("\n    SKIPPED: built without CUDA; the CUDA kernels were not compiled ");
}
#endif

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("nf4", NULL, NULL);
    CU_add_test(s, "code tables and block sizes", test_tables);
    CU_add_test(s, "signed dynamic map", test_dynamic_map);
    CU_add_test(s, "bitsandbytes golden bytes", test_bnb_golden);
    CU_add_test(s, "random round trip error bound", test_random_roundtrip);
    CU_add_test(s, "bad input", test_errors);
    CU_pSuite g = CU_add_suite("nf4_cuda", NULL, NULL);
    CU_add_test(g, "CUDA kernels vs CPU", test_cuda_vs_cpu);
    return test_main();
}
