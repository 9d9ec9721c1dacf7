// tests/test_linear_cuda.c: the device GEMM (ag_cuda_gemm) and the NF4 +
// LoRA linear (ag_cuda_linear_forward / ag_cuda_linear_backward) against
// their CPU references, in every precision mode: ag_gemm, and the path
// tape.c takes on the CPU (nf4_dequantize to fp32, rounding to the weight's
// original dtype as linear_weight() does, then ag_lora_linear_forward /
// ag_lora_linear_backward).
//
// Outputs that a call overwrites are poisoned with NaN (0xff bytes) before
// each run, so an element never written fails; gradients that a call
// accumulates into start from the same random values on both sides, sized
// like the gradient itself so that neither an overwrite nor a wrong
// increment can hide. Comparisons are normwise, ||got - ref|| / ||ref||
// (test_rel_err: a NaN never passes), with inputs of unit scale:
//   fp32 1e-5  the same products (the device dequantizes to the same
//              weights), summed in a different order: typically ~1e-7.
//   tf32 5e-3  operands rounded to 11 significant bits (unit roundoff
//              2^-11 ~ 5e-4), fp32 accumulation. The rounding errors are
//              independent, so a K-term sum's error grows like sqrt(K), as
//              its value does: the normwise error stays ~1e-3 at any K.
//   bf16 2e-2  8 significant bits (2^-8 ~ 4e-3) by the same argument:
//              ~3e-3 typical. Weights are exactly bf16 already when
//              w_dtype is BF16; activations are rounded.
//   fp16 2e-2  11 significant bits: well inside the bf16 bound.
// Without a device every suite prints one SKIPPED line; the precision names
// need no device and always run.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/autograd.h"
#include "core/core.h"
#include "nf4/nf4.h"
#include "test_util.h"

enum { N_PREC = 4 };
static const ag_precision precs[N_PREC] = {AG_PRECISION_FP32, AG_PRECISION_TF32, AG_PRECISION_BF16,
                                           AG_PRECISION_FP16};
static const char *const prec_names[N_PREC] = {"fp32", "tf32", "bf16", "fp16"};

// ----------------------------------------------------------------------------
// precision names: no device needed

static void test_precision_names(void) {
    q_err err;
    ag_precision p = AG_PRECISION_FP32;
    CU_ASSERT_EQUAL(ag_precision_parse("bf16", &p, &err), 0);
    CU_ASSERT_EQUAL(p, AG_PRECISION_BF16);
    for (int i = 0; i < N_PREC; i++) {
        CU_ASSERT_STRING_EQUAL(ag_precision_name(precs[i]), prec_names[i]);
        p = precs[(i + 1) % N_PREC];
        CU_ASSERT_EQUAL(ag_precision_parse(prec_names[i], &p, &err), 0);
        CU_ASSERT_EQUAL(p, precs[i]);
    }
    err.msg[0] = '\0';
    CU_ASSERT_EQUAL(ag_precision_parse("fp8", &p, &err), -1);
    for (int i = 0; i < N_PREC; i++) {
        const bool named = strstr(err.msg, prec_names[i]) != NULL;
        if (!named) printf("\n    \"%s\" does not name the accepted value %s ", err.msg, prec_names[i]);
        CU_ASSERT(named);
    }
}

#ifdef QLORA_HAVE_CUDA

// A call whose q_err is err_, asserted to succeed.
#define OK(call)                  \
    do {                          \
        q_err err_;               \
        TEST_OK((call), &err_);   \
    } while (0)

static const double tols[N_PREC] = {1e-5, 5e-3, 2e-2, 2e-2};

// ----------------------------------------------------------------------------
// host <-> device helpers beyond test_util's

static void dev_poison(float *d, int64_t n) {  // every element NaN
    const size_t bytes = (size_t)n * sizeof(float);
    void *h = malloc(bytes ? bytes : 4);
    memset(h, 0xff, bytes);
    if (bytes) OK(ag_cuda_copy(d, h, (int64_t)bytes, NULL, &err_));
    free(h);
}

static float *host_alloc(int64_t n) { return malloc((size_t)(n > 0 ? n : 1) * sizeof(float)); }

static float *host_normal(int64_t n, float sd, uint64_t *rng) {
    float *h = host_alloc(n);
    for (int64_t i = 0; i < n; i++) h[i] = sd * test_normal(rng);
    return h;
}

static float *host_copy(const float *x, int64_t n) {
    float *h = host_alloc(n);
    memcpy(h, x, (size_t)n * sizeof(float));
    return h;
}

static double rms(const float *x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return n > 0 ? sqrt(s / (double)n) : 0.0;
}

// The largest relative error of the running test per precision, printed at its end.
static double worst[N_PREC];

static void expect_close(const float *got, const float *ref, int64_t n, int p, const char *what, const char *label) {
    const double e = test_rel_err(got, ref, n);
    if (e > worst[p]) worst[p] = e;
    if (!(e < tols[p]))
        printf("\n    %s: %s [%s] relative error %.3g (tolerance %.0e) ", label, what, prec_names[p], e, tols[p]);
    CU_ASSERT(e < tols[p]);
}

static void report_worst(void) {
    printf("\n    worst relative error vs CPU:");
    for (int p = 0; p < N_PREC; p++) printf(" %s %.3g%s", prec_names[p], worst[p], p + 1 < N_PREC ? "," : " ");
}

// ----------------------------------------------------------------------------
// GEMM: C = alpha op(A) op(B) + beta C against ag_gemm

static void gemm_case(ag_cuda_ctx *ctx, int p, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                      float beta, int64_t pad, int64_t off, uint64_t *rng) {
    // Each operand is a sub-matrix starting `off` columns into rows of
    // `pad` extra elements (off <= pad): strides above the minimum and,
    // when off > 0, a start that is not 16-byte aligned.
    const int64_t a_rows = ta ? K : M, a_cols = ta ? M : K;
    const int64_t b_rows = tb ? N : K, b_cols = tb ? K : N;
    const int64_t lda = a_cols + pad, ldb = b_cols + pad, ldc = N + pad;
    const int64_t na = a_rows * lda, nb = b_rows * ldb, nc = M * ldc;
    float *A = host_normal(na, 1.0f, rng), *B = host_normal(nb, 1.0f, rng), *C0 = host_normal(nc, 1.0f, rng);
    float *Cref = host_copy(C0, nc);
    // beta == 0 never reads C (as BLAS): the device's C starts as NaN there
    if (beta == 0.0f)
        for (int64_t m = 0; m < M; m++) memset(C0 + m * ldc + off, 0xff, (size_t)N * sizeof(float));
    ag_gemm(ta, tb, M, N, K, alpha, A + off, lda, B + off, ldb, beta, Cref + off, ldc);

    float *d_A = test_dev_put(A, na), *d_B = test_dev_put(B, nb), *d_C = test_dev_put(C0, nc);
    OK(ag_cuda_gemm(ctx, precs[p], ta, tb, M, N, K, alpha, d_A + off, lda, d_B + off, ldb, beta, d_C + off, ldc,
                    &err_));
    OK(ag_cuda_ctx_sync(ctx, &err_));
    float *Cgot = host_alloc(nc), *got = host_alloc(M * N), *ref = host_alloc(M * N);
    test_dev_get(Cgot, d_C, nc);

    // the M x N sub-matrix is compared; everything around it is untouched, bit for bit
    bool outside_same = true;
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < ldc; j++) {
            const int64_t i = m * ldc + j;
            if (j >= off && j < off + N) {
                got[m * N + j - off] = Cgot[i];
                ref[m * N + j - off] = Cref[i];
            } else if (memcmp(&Cgot[i], &C0[i], sizeof(float)) != 0) {
                outside_same = false;
            }
        }
    char label[160];
    snprintf(label, sizeof label, "gemm %c%c M=%lld N=%lld K=%lld alpha=%g beta=%g ld+%lld off=%lld", ta ? 'T' : 'N',
             tb ? 'T' : 'N', (long long)M, (long long)N, (long long)K, (double)alpha, (double)beta, (long long)pad,
             (long long)off);
    expect_close(got, ref, M * N, p, "C", label);
    if (!outside_same) printf("\n    %s [%s]: wrote outside the C sub-matrix ", label, prec_names[p]);
    CU_ASSERT(outside_same);

    ag_cuda_free(d_A), ag_cuda_free(d_B), ag_cuda_free(d_C);
    free(A), free(B), free(C0), free(Cref), free(Cgot), free(got), free(ref);
}

static void test_gemm(void) {
    if (!test_have_device("the CUDA GEMM and linear were")) return;
    uint64_t rng = 21;
    memset(worst, 0, sizeof worst);
    // M, N, K: a single row, a single column, K not a multiple of 8, K = 8, a long K
    static const int64_t shapes[][3] = {{1, 300, 1000}, {37, 77, 50}, {256, 96, 129}, {64, 1, 13}, {130, 260, 8}};
    static const struct {
        float alpha, beta;
        int64_t pad, off;
    } runs[] = {
        {1.0f, 0.0f, 0, 0},   // tight strides, C overwritten
        {-0.5f, 1.0f, 5, 2},  // strided sub-matrices at an unaligned start, C accumulated
        {2.5f, 0.0f, 3, 1},
        {0.75f, 1.0f, 0, 0},
    };
    for (int p = 0; p < N_PREC; p++) {
        ag_cuda_ctx *ctx = NULL;
        OK(ag_cuda_ctx_create(&ctx, precs[p], &err_));
        CU_ASSERT_EQUAL(ag_cuda_ctx_precision(ctx), precs[p]);
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (int t = 0; t < 4; t++)
                for (size_t v = 0; v < sizeof runs / sizeof runs[0]; v++)
                    gemm_case(ctx, p, t & 1, t & 2, shapes[s][0], shapes[s][1], shapes[s][2], runs[v].alpha,
                              runs[v].beta, runs[v].pad, runs[v].off, &rng);
        ag_cuda_ctx_free(ctx);
    }
    report_worst();
}

// ----------------------------------------------------------------------------
// the NF4 + LoRA linear

// W [O,I] quantized to NF4 (blocksize 64, double-quantized scales) from a
// buffer of dtype dt, as a checkpoint of that dtype would be.
static void quantize_weight(nf4_tensor *qt, const float *W, int64_t O, int64_t I, q_dtype dt) {
    const int64_t n = O * I, shape[2] = {O, I};
    uint16_t *h16 = NULL;
    const void *src = W;
    if (dt != Q_DTYPE_F32) {
        h16 = malloc((size_t)n * sizeof(uint16_t));
        for (int64_t i = 0; i < n; i++) h16[i] = dt == Q_DTYPE_BF16 ? q_f32_to_bf16(W[i]) : q_f32_to_f16(W[i]);
        src = h16;
    }
    OK(nf4_tensor_quantize(qt, src, dt, 2, shape, NF4_QTYPE_NF4, 64, true, &err_));
    free(h16);
    CU_ASSERT_EQUAL(qt->dtype, dt);
    CU_ASSERT(qt->nested);
}

// The CPU's base weight, as tape.c's linear_weight() makes it.
static void reference_weight(float *Wf, const nf4_tensor *qt, q_dtype w_dtype) {
    const nf4_view v = nf4_tensor_view(qt);
    const int64_t n = v.numel;
    OK(nf4_dequantize(&v, Wf, Q_DTYPE_F32, &err_));
    if (w_dtype == Q_DTYPE_BF16) {
        for (int64_t i = 0; i < n; i++) Wf[i] = q_bf16_to_f32(q_f32_to_bf16(Wf[i]));
    } else if (w_dtype == Q_DTYPE_F16) {
        for (int64_t i = 0; i < n; i++) Wf[i] = q_f16_to_f32(q_f32_to_f16(Wf[i]));
    }
}

// The quantized weight's arrays copied to the device, in a view that points at them.
static nf4_view upload_view(const nf4_tensor *qt) {
    const nf4_view h = nf4_tensor_view(qt);
    CU_ASSERT_PTR_NULL(h.absmax);
    CU_ASSERT_PTR_NOT_NULL(h.qabsmax);
    const int64_t nblocks = nf4_nblocks(h.numel, h.blocksize);
    const int64_t nnested = nf4_nblocks(nblocks, NF4_NESTED_BLOCKSIZE);
    nf4_view d;
    memset(&d, 0, sizeof d);
    d.qtype = h.qtype;
    d.numel = h.numel;
    d.blocksize = h.blocksize;
    d.offset = h.offset;
    d.packed = test_dev_put_bytes(h.packed, nf4_packed_bytes(h.numel));
    d.qabsmax = test_dev_put_bytes(h.qabsmax, nblocks);
    d.nested_absmax = test_dev_put_bytes(h.nested_absmax, nnested * (int64_t)sizeof(float));
    d.nested_map = test_dev_put_bytes(h.nested_map, 256 * (int64_t)sizeof(float));
    return d;
}

static void free_view(const nf4_view *d) {
    ag_cuda_free((void *)d->packed);
    ag_cuda_free((void *)d->qabsmax);
    ag_cuda_free((void *)d->nested_absmax);
    ag_cuda_free((void *)d->nested_map);
}

typedef struct lin_case {
    int64_t r;
    bool bias;
    bool dense;        // lin.dense: a device fp32 weight instead of NF4
    bool xd_distinct;  // xd a different array from x, as dropout makes it
} lin_case;

static const lin_case lin_cases[] = {
    {0, false, false, false},  // a plain linear
    {0, true, false, false},
    {8, true, false, false},
    {16, false, false, false},
    {8, true, false, true},
    {8, false, true, false},
};

// Which gradients the backward is asked for.
enum { BWD_ALIAS, BWD_SEPARATE, BWD_NO_AB, BWD_NO_DX, BWD_COUNT };
static const char *const bwd_names[BWD_COUNT] = {
    "dxd == dx",       // as tape.c without dropout
    "dxd separate",    // as tape.c with dropout
    "dA = dB = NULL",  // a frozen adapter
    "dx = dxd = NULL", // an input that wants no gradient
};

static void linear_case(ag_cuda_ctx *const *ctx, const lin_case *lc, int64_t N, int64_t I, int64_t O,
                        q_dtype w_dtype, uint64_t *rng) {
    const int64_t r = lc->r;
    const float scale = r == 8 ? 2.0f : 0.75f;
    if (lc->dense) w_dtype = Q_DTYPE_F32;
    char label[200];
    snprintf(label, sizeof label, "linear N=%lld I=%lld O=%lld r=%lld%s%s w=%s", (long long)N, (long long)I,
             (long long)O, (long long)r, lc->bias ? " bias" : "", lc->xd_distinct ? " xd!=x" : "",
             lc->dense ? "dense fp32" : q_dtype_name(w_dtype));

    // the base: W itself (dense) or its NF4 form, dequantized and rounded to w_dtype
    float *W = host_normal(O * I, 0.05f, rng), *Wref = host_alloc(O * I);
    nf4_tensor qt;
    memset(&qt, 0, sizeof qt);
    nf4_view dview;
    memset(&dview, 0, sizeof dview);
    float *d_dense = NULL;
    if (lc->dense) {
        memcpy(Wref, W, (size_t)(O * I) * sizeof(float));
        d_dense = test_dev_put(W, O * I);
    } else {
        quantize_weight(&qt, W, O, I, w_dtype);
        reference_weight(Wref, &qt, w_dtype);
        dview = upload_view(&qt);
    }

    // inputs; LoRA big enough that dropping it (or its scale) fails every precision
    float *x = host_normal(N * I, 1.0f, rng);
    float *xd = lc->xd_distinct ? host_normal(N * I, 1.0f, rng) : x;
    float *bias = lc->bias ? host_normal(O, 0.5f, rng) : NULL;
    float *A = r ? host_normal(r * I, 1.0f / sqrtf((float)I), rng) : NULL;
    float *B = r ? host_normal(O * r, 0.1f, rng) : NULL;
    float *dy = host_normal(N * O, 1.0f, rng);

    float *d_x = test_dev_put(x, N * I), *d_xd = lc->xd_distinct ? test_dev_put(xd, N * I) : d_x;
    float *d_bias = bias ? test_dev_put(bias, O) : NULL;
    float *d_A = r ? test_dev_put(A, r * I) : NULL, *d_B = r ? test_dev_put(B, O * r) : NULL;
    float *d_dy = test_dev_put(dy, N * O);
    float *d_y = test_dev_alloc(N * O * (int64_t)sizeof(float));
    float *d_xa = r ? test_dev_alloc(N * r * (int64_t)sizeof(float)) : NULL;

    ag_linear lin;
    memset(&lin, 0, sizeof lin);
    lin.in = I;
    lin.out = O;
    lin.w = dview;
    lin.w_dtype = w_dtype;
    lin.dense = d_dense;
    lin.bias = d_bias;
    lin.r = r;
    lin.scale = scale;
    lin.A = d_A;
    lin.B = d_B;

    // forward
    float *y_ref = host_alloc(N * O), *xa_ref = r ? host_alloc(N * r) : NULL;
    ag_lora_linear_forward(y_ref, xa_ref, x, r ? xd : NULL, Wref, bias, A, B, scale, N, I, O, r);
    int64_t ngot = N * (I > O ? I : O);  // the largest array compared
    if (r * (I > O ? I : O) > ngot) ngot = r * (I > O ? I : O);
    float *got = host_alloc(ngot);
    for (int p = 0; p < N_PREC; p++) {
        dev_poison(d_y, N * O);
        if (r) dev_poison(d_xa, N * r);
        OK(ag_cuda_linear_forward(ctx[p], d_y, d_xa, d_x, r ? d_xd : NULL, &lin, N, &err_));
        OK(ag_cuda_ctx_sync(ctx[p], &err_));
        test_dev_get(got, d_y, N * O);
        expect_close(got, y_ref, N * O, p, "forward y", label);
        if (r) {
            test_dev_get(got, d_xa, N * r);
            expect_close(got, xa_ref, N * r, p, "forward xa", label);
        }
        // the weight is expanded into the context's workspace, >= 16 bits an element
        if (!lc->dense) CU_ASSERT(ag_cuda_ctx_scratch_bytes(ctx[p]) >= 2 * O * I);
    }

    // backward, from the CPU's xa, into gradients that hold values
    float *d_xa_ref = r ? test_dev_put(xa_ref, N * r) : NULL;
    float *d_dx = test_dev_alloc(N * I * (int64_t)sizeof(float)), *d_dxd = test_dev_alloc(N * I * (int64_t)sizeof(float));
    float *d_dA = r ? test_dev_alloc(r * I * (int64_t)sizeof(float)) : NULL;
    float *d_dB = r ? test_dev_alloc(O * r * (int64_t)sizeof(float)) : NULL;
    float *scratch = host_alloc(N * r);
    for (int mode = 0; mode < BWD_COUNT; mode++) {
        const bool want_dx = mode != BWD_NO_DX, separate = mode == BWD_SEPARATE;
        const bool want_ab = r > 0 && mode != BWD_NO_AB;
        // the increments alone first, to size the starting values like them
        float *g[4] = {NULL, NULL, NULL, NULL};  // dx, dxd, dA, dB
        const int64_t gn[4] = {N * I, N * I, r * I, O * r};
        const bool gw[4] = {want_dx, separate, want_ab, want_ab};
        for (int k = 0; k < 4; k++)
            if (gw[k]) g[k] = calloc((size_t)(gn[k] > 0 ? gn[k] : 1), sizeof(float));
        ag_lora_linear_backward(g[0], separate ? g[1] : g[0], g[2], g[3], dy, r ? xd : NULL, xa_ref, Wref, A, B,
                                scale, N, I, O, r, scratch);
        float *init[4] = {NULL, NULL, NULL, NULL}, *ref[4] = {NULL, NULL, NULL, NULL};
        for (int k = 0; k < 4; k++) {
            if (!gw[k]) continue;
            const double sd = rms(g[k], gn[k]);
            init[k] = host_normal(gn[k], sd > 0 ? (float)sd : 1.0f, rng);
            ref[k] = host_copy(init[k], gn[k]);
        }
        ag_lora_linear_backward(ref[0], separate ? ref[1] : ref[0], ref[2], ref[3], dy, r ? xd : NULL, xa_ref, Wref,
                                A, B, scale, N, I, O, r, scratch);

        float *const d_g[4] = {d_dx, d_dxd, d_dA, d_dB};
        static const char *const what[4] = {"backward dx", "backward dxd", "backward dA", "backward dB"};
        char blabel[260];
        snprintf(blabel, sizeof blabel, "%s, %s", label, bwd_names[mode]);
        ag_linear bl = lin;
        bl.dA = want_ab ? d_dA : NULL;
        bl.dB = want_ab ? d_dB : NULL;
        for (int p = 0; p < N_PREC; p++) {
            for (int k = 0; k < 4; k++)
                if (gw[k]) OK(ag_cuda_copy(d_g[k], init[k], gn[k] * (int64_t)sizeof(float), NULL, &err_));
            float *dx = want_dx ? d_dx : NULL, *dxd = separate ? d_dxd : dx;
            OK(ag_cuda_linear_backward(ctx[p], dx, dxd, d_dy, r ? d_xd : NULL, d_xa_ref, &bl, N, &err_));
            OK(ag_cuda_ctx_sync(ctx[p], &err_));
            for (int k = 0; k < 4; k++) {
                if (!gw[k]) continue;
                test_dev_get(got, d_g[k], gn[k]);
                expect_close(got, ref[k], gn[k], p, what[k], blabel);
            }
        }
        for (int k = 0; k < 4; k++) free(g[k]), free(init[k]), free(ref[k]);
    }

    if (!lc->dense) {
        free_view(&dview);
        nf4_tensor_free(&qt);
    }
    ag_cuda_free(d_dense), ag_cuda_free(d_x), ag_cuda_free(lc->xd_distinct ? d_xd : NULL), ag_cuda_free(d_bias);
    ag_cuda_free(d_A), ag_cuda_free(d_B), ag_cuda_free(d_dy), ag_cuda_free(d_y), ag_cuda_free(d_xa);
    ag_cuda_free(d_xa_ref), ag_cuda_free(d_dx), ag_cuda_free(d_dxd), ag_cuda_free(d_dA), ag_cuda_free(d_dB);
    free(W), free(Wref), free(x), free(lc->xd_distinct ? xd : NULL), free(bias), free(A), free(B), free(dy);
    free(y_ref), free(xa_ref), free(got), free(scratch);
}

static void test_linear(void) {
    if (!test_have_device("the CUDA GEMM and linear were")) return;
    uint64_t rng = 22;
    memset(worst, 0, sizeof worst);
    ag_cuda_ctx *ctx[N_PREC] = {NULL, NULL, NULL, NULL};
    for (int p = 0; p < N_PREC; p++) {
        OK(ag_cuda_ctx_create(&ctx[p], precs[p], &err_));
        CU_ASSERT_EQUAL(ag_cuda_ctx_precision(ctx[p]), precs[p]);
    }
    static const int64_t shapes[][2] = {{64, 96}, {160, 64}, {1000, 300}};  // I, O
    static const int64_t Ns[] = {1, 37, 256};
    static const q_dtype w_dtypes[] = {Q_DTYPE_F32, Q_DTYPE_BF16, Q_DTYPE_F16};
    for (size_t s = 0; s < 3; s++)
        for (size_t k = 0; k < 3; k++)  // every shape and every N meets every w_dtype
            for (size_t c = 0; c < sizeof lin_cases / sizeof lin_cases[0]; c++)
                linear_case(ctx, &lin_cases[c], Ns[k], shapes[s][0], shapes[s][1], w_dtypes[(s + k) % 3], &rng);
    for (int p = 0; p < N_PREC; p++) ag_cuda_ctx_free(ctx[p]);
    report_worst();
}

// ----------------------------------------------------------------------------
// bad arguments are refused

static void expect_refused(int rc, const q_err *err, const char *what) {
    const bool refused = rc == -1 && err->msg[0] != '\0';
    if (!refused) printf("\n    %s: expected an error, got rc %d ", what, rc);
    CU_ASSERT(refused);
}

static void test_bad_arguments(void) {
    if (!test_have_device("the CUDA GEMM and linear were")) return;
    ag_cuda_ctx *ctx = NULL;
    OK(ag_cuda_ctx_create(&ctx, AG_PRECISION_FP32, &err_));
    float *d = test_dev_alloc(64 * (int64_t)sizeof(float));
    q_err err;
    err.msg[0] = '\0';
    expect_refused(ag_cuda_gemm(ctx, AG_PRECISION_FP32, false, false, -1, 4, 4, 1.0f, d, 4, d, 4, 0.0f, d, 4, &err),
                   &err, "gemm M = -1");
    err.msg[0] = '\0';
    expect_refused(ag_cuda_gemm(ctx, AG_PRECISION_FP32, false, false, 4, 4, -3, 1.0f, d, 4, d, 4, 0.0f, d, 4, &err),
                   &err, "gemm K = -3");
    err.msg[0] = '\0';  // lda = 2 < K = 4: rows would overlap (cuBLAS itself refuses it in fp32)
    expect_refused(ag_cuda_gemm(ctx, AG_PRECISION_FP32, false, false, 4, 4, 4, 1.0f, d, 2, d, 4, 0.0f, d, 4, &err),
                   &err, "gemm lda < K");
    ag_linear lin;
    memset(&lin, 0, sizeof lin);
    lin.in = 4;
    lin.out = 4;
    lin.dense = d;
    err.msg[0] = '\0';
    expect_refused(ag_cuda_linear_forward(ctx, d, NULL, d, NULL, &lin, -1, &err), &err, "linear forward N = -1");
    err.msg[0] = '\0';
    expect_refused(ag_cuda_linear_backward(ctx, d, d, d, NULL, NULL, &lin, -1, &err), &err, "linear backward N = -1");
    // an NF4 view whose numel is not in * out
    lin.dense = NULL;
    lin.w.qtype = NF4_QTYPE_NF4;
    lin.w.numel = 8;
    lin.w.blocksize = 64;
    lin.w.packed = (const uint8_t *)d;
    lin.w.absmax = d;
    err.msg[0] = '\0';
    expect_refused(ag_cuda_linear_forward(ctx, d, NULL, d, NULL, &lin, 1, &err), &err, "linear w.numel != in * out");
    OK(ag_cuda_ctx_sync(ctx, &err_));  // nothing reached the stream
    ag_cuda_free(d);
    ag_cuda_ctx_free(ctx);
}

#else  // built without CUDA: the stubs say so

static void skip_no_cuda(void) {
    printf("\n    SKIPPED: built without CUDA; the CUDA GEMM and linear were not compiled ");
}
static void test_gemm(void) { skip_no_cuda(); }
static void test_linear(void) { skip_no_cuda(); }

static void expect_no_cuda(int rc, const q_err *err) {
    CU_ASSERT_EQUAL(rc, -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err->msg, "built without CUDA"));
}

static void test_bad_arguments(void) {
    q_err err;
    float f = 0.0f;
    CU_ASSERT_FALSE(ag_cuda_available());
    ag_cuda_ctx *ctx = NULL;
    expect_no_cuda(ag_cuda_ctx_create(&ctx, AG_PRECISION_BF16, &err), &err);
    CU_ASSERT_PTR_NULL(ctx);
    void *d = NULL;
    expect_no_cuda(ag_cuda_malloc(&d, 16, &err), &err);
    expect_no_cuda(ag_cuda_copy(&f, &f, sizeof f, NULL, &err), &err);
    expect_no_cuda(ag_cuda_gemm(NULL, AG_PRECISION_FP32, false, false, 1, 1, 1, 1.0f, &f, 1, &f, 1, 0.0f, &f, 1, &err),
                   &err);
    ag_linear lin;
    memset(&lin, 0, sizeof lin);
    lin.in = 1;
    lin.out = 1;
    lin.dense = &f;
    expect_no_cuda(ag_cuda_linear_forward(NULL, &f, NULL, &f, NULL, &lin, 1, &err), &err);
    expect_no_cuda(ag_cuda_linear_backward(NULL, &f, &f, &f, NULL, NULL, &lin, 1, &err), &err);
}
#endif

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_add_test(CU_add_suite("cuda_gemm", NULL, NULL),
                "every transpose, M = 1, N = 1, odd K, strided sub-matrices, alpha, beta 0/1, 4 precisions vs ag_gemm",
                test_gemm);
    CU_add_test(CU_add_suite("cuda_linear", NULL, NULL),
                "NF4 (from fp32/bf16/fp16) and dense bases, LoRA r 0/8/16, forward and backward vs CPU", test_linear);
    CU_add_test(CU_add_suite("cuda_precision", NULL, NULL), "precision names parsed and printed",
                test_precision_names);
    CU_add_test(CU_add_suite("cuda_linear_arguments", NULL, NULL), "bad arguments refused", test_bad_arguments);
    return test_main();
}
