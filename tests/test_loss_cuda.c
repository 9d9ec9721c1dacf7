// tests/test_loss_cuda.c: the device loss head, ag_cuda_cross_entropy
// (autograd/loss_cuda.cu), against the CPU ag_cross_entropy (itself tested
// against finite differences in test_autograd.c), in each GEMM precision, on
// random h (sd 1) and Wlm (sd 0.1), several shapes and chunk configurations:
// the whole problem in one chunk (logits kept between the passes), small
// chunks that split rows and vocabulary unevenly, and one row at a time.
//
// Checked: the loss sum (relative), the count of valid targets (exact), dh
// (normwise relative; it starts from the same random values on both sides, so
// the += is checked), the rows of ignored targets left bit-identical, a run
// without dh giving the same loss bit for bit (pass 1 is the same work), and
// a rerun giving the same dh bit for bit (no atomics). The h rows of the
// leading run of ignored targets are NaN (0xff bytes): an ignored row must
// leak into neither the loss nor dh. The loss outputs are poisoned (NaN, -1)
// before each call, so an output never written fails. NaN never passes.
//
// Tolerances, set by the precision of the GEMMs (the softmax is fp32 and the
// row losses double in every mode):
//   FP32 1e-5: fp32 products on both sides, only the summation order differs;
//   TF32 5e-3: tensor-core products of operands rounded to a 10-bit mantissa
//              (2^-11 relative each): ~3e-4 expected, the rest is margin;
//   BF16 2e-2: operands (h, Wlm, and the dlogits of the dh GEMM) rounded to
//              an 8-bit mantissa (2^-9 each): ~5e-3 expected.
// (Estimates, not yet measured on a device; the printed worst errors tell.)
// Without a device every suite prints one SKIPPED line.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/autograd.h"
#include "test_util.h"

#ifdef QLORA_HAVE_CUDA
#include <cuda_runtime.h>

#define DEV_CHECK(call) CU_ASSERT_EQUAL_FATAL((call), cudaSuccess)

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

static int32_t uniform_id(int64_t V, uint64_t *rng) {
    float u;
    test_fill_uniform(&u, 1, 0.0f, (float)V, rng);
    return (int32_t)u < V ? (int32_t)u : (int32_t)(V - 1);
}

static double tolerance(ag_precision p) {
    return p == AG_PRECISION_FP32 ? 1e-5 : p == AG_PRECISION_TF32 ? 5e-3 : 2e-2;
}

// The largest relative errors of the running suite, printed at its end.
static double worst_loss, worst_dh;

// ----------------------------------------------------------------------------
// one (shape, chunks) case on a context; inputs on both sides

typedef struct ce_case {
    int64_t N, D, V;
    const float *h, *W, *dh0;    // host
    const int32_t *targets;      // host
    const float *d_h, *d_W;      // device
    const int32_t *d_targets;    // device
    float grad_scale;
} ce_case;

static void run_case(ag_cuda_ctx *ctx, ag_precision prec, const ce_case *c, int64_t tc, int64_t vc) {
    const int64_t N = c->N, D = c->D, V = c->V;
    const double tol = tolerance(prec);
    char what[160];
    snprintf(what, sizeof what, "%s N=%lld D=%lld V=%lld chunks (%lld, %lld)", ag_precision_name(prec),
             (long long)N, (long long)D, (long long)V, (long long)tc, (long long)vc);

    // CPU reference
    float *scratch = malloc((size_t)ag_cross_entropy_scratch_floats(D, V, tc, vc) * sizeof(float));
    float *dref = host_copy(c->dh0, N * D);
    double loss_ref = NAN;
    int64_t nv_ref = -1;
    ag_cross_entropy(&loss_ref, &nv_ref, dref, c->h, c->W, c->targets, N, D, V, c->grad_scale, tc, vc, scratch);

    // device, with dh
    float *d_dh = test_dev_put(c->dh0, N * D);
    DEV_CHECK(cudaDeviceSynchronize());  // the uploads are done before the context's stream reads them
    double loss = NAN;
    int64_t nv = -1;
    q_err err;
    TEST_OK(ag_cuda_cross_entropy(ctx, &loss, &nv, d_dh, c->d_h, c->d_W, c->d_targets, N, D, V, c->grad_scale, tc,
                                  vc, &err),
            &err);
    float *got = host_alloc(N * D);
    test_dev_get(got, d_dh, N * D);

    CU_ASSERT_EQUAL(nv, nv_ref);
    const double le = loss_ref != 0.0 ? fabs(loss - loss_ref) / fabs(loss_ref) : fabs(loss);
    if (!(le < tol)) printf("\n    %s: loss %.9g vs CPU %.9g (relative error %.3g) ", what, loss, loss_ref, le);
    CU_ASSERT(le < tol);  // false for NaN
    if (le > worst_loss) worst_loss = le;

    const double de = test_rel_err(got, dref, N * D);
    if (!(de < tol)) printf("\n    %s: dh relative error %.3g ", what, de);
    CU_ASSERT(de < tol);
    if (de > worst_dh) worst_dh = de;

    int64_t touched = 0;  // ignored rows whose dh changed
    for (int64_t n = 0; n < N; n++)
        if (c->targets[n] == AG_IGNORE_INDEX &&
            memcmp(got + n * D, c->dh0 + n * D, (size_t)D * sizeof(float)) != 0)
            touched++;
    if (touched) printf("\n    %s: dh of %lld ignored rows changed ", what, (long long)touched);
    CU_ASSERT_EQUAL(touched, 0);

    // a rerun from the same start gives the same bits
    float *again = host_alloc(N * D);
    DEV_CHECK(cudaMemcpy(d_dh, c->dh0, (size_t)(N * D) * sizeof(float), cudaMemcpyHostToDevice));
    DEV_CHECK(cudaDeviceSynchronize());
    double loss2 = NAN;
    int64_t nv2 = -1;
    TEST_OK(ag_cuda_cross_entropy(ctx, &loss2, &nv2, d_dh, c->d_h, c->d_W, c->d_targets, N, D, V, c->grad_scale,
                                  tc, vc, &err),
            &err);
    test_dev_get(again, d_dh, N * D);
    const bool same = memcmp(&loss2, &loss, sizeof loss) == 0 && nv2 == nv &&
                      memcmp(again, got, (size_t)(N * D) * sizeof(float)) == 0;
    if (!same) printf("\n    %s: a rerun is not bit-identical ", what);
    CU_ASSERT(same);

    // without dh: the loss alone, the same pass 1
    double loss3 = NAN;
    int64_t nv3 = -1;
    TEST_OK(ag_cuda_cross_entropy(ctx, &loss3, &nv3, NULL, c->d_h, c->d_W, c->d_targets, N, D, V, c->grad_scale, tc,
                                  vc, &err),
            &err);
    const bool same_loss = memcmp(&loss3, &loss, sizeof loss) == 0 && nv3 == nv;
    if (!same_loss) printf("\n    %s: loss without dh %.9g differs from %.9g ", what, loss3, loss);
    CU_ASSERT(same_loss);

    cudaFree(d_dh);
    free(scratch), free(dref), free(got), free(again);
}

// Shapes: a tiny one (V < 32 threads' worth of columns), a middling one, and
// one with a third of the targets ignored, runs at both ends included.
static void check_precision(ag_precision prec, uint64_t seed) {
    if (!test_have_device("the CUDA loss head was")) return;
    ag_cuda_ctx *ctx = NULL;
    q_err err;
    if (ag_cuda_ctx_create(&ctx, prec, &err)) {
        if (prec == AG_PRECISION_BF16) {  // a pre-Ampere device: bf16 GEMMs are refused
            printf("\n    SKIPPED: %s ", err.msg);
            return;
        }
        TEST_OK(-1, &err);
    }
    uint64_t rng = seed;
    worst_loss = worst_dh = 0;
    const int64_t shapes[][3] = {{1, 8, 5}, {37, 64, 1000}, {300, 96, 5003}};  // N, D, V
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int64_t N = shapes[s][0], D = shapes[s][1], V = shapes[s][2];
        int32_t *targets = malloc((size_t)N * sizeof(int32_t));
        for (int64_t n = 0; n < N; n++) targets[n] = uniform_id(V, &rng);
        int64_t lead = 0;  // the leading run of ignored rows
        if (s == 1)
            for (int64_t n = 3; n < N; n += 4) targets[n] = AG_IGNORE_INDEX;
        if (s == 2) {
            lead = 10;
            for (int64_t n = 0; n < N; n++) {
                float u;
                test_fill_uniform(&u, 1, 0.0f, 1.0f, &rng);
                if (n < lead || n >= N - 10 || u < 0.28f) targets[n] = AG_IGNORE_INDEX;
            }
        }
        // the first and the last column: the ends of the first and the last
        // (possibly short) vocabulary chunk
        targets[lead] = (int32_t)(V - 1);
        if (N > 1) targets[N / 2] = 0;
        float *h = host_normal(N * D, 1.0f, &rng), *W = host_normal(V * D, 0.1f, &rng);
        // dh starts at the size of its increments (grad_scale 0.75 times rows
        // of Wlm), so both the += and the increment show in the error
        float *dh0 = host_normal(N * D, 0.05f, &rng);
        memset(h, 0xff, (size_t)(lead * D) * sizeof(float));  // NaN: ignored rows must not leak

        float *d_h = test_dev_put(h, N * D), *d_W = test_dev_put(W, V * D);
        int32_t *d_t = test_dev_put_i32(targets, N);
        // grad_scale is 1 / valid tokens in training; any value will do here, and
        // one that is not 1 checks that it is applied
        const ce_case c = {N, D, V, h, W, dh0, targets, d_h, d_W, d_t, 0.75f};

        // (N, V): one chunk, logits kept; (7, 64) and (64, 1000): uneven
        // splits; (1, 3): a row and three columns at a time, on the shapes
        // where that is not a million kernel launches (the large one takes
        // single rows against 701-column chunks instead)
        const int64_t tiny_vc = N * V <= 100000 ? 3 : 701;
        const int64_t chunks[][2] = {{N, V}, {7, 64}, {64, 1000}, {1, tiny_vc}};
        for (size_t k = 0; k < sizeof chunks / sizeof chunks[0]; k++)
            run_case(ctx, prec, &c, chunks[k][0], chunks[k][1]);

        cudaFree(d_h), cudaFree(d_W), cudaFree(d_t);
        free(targets), free(h), free(W), free(dh0);
    }
    printf("\n    worst relative error vs CPU: loss %.3g, dh %.3g ", worst_loss, worst_dh);
    ag_cuda_ctx_free(ctx);
}

static void test_fp32(void) { check_precision(AG_PRECISION_FP32, 21); }
static void test_tf32(void) { check_precision(AG_PRECISION_TF32, 22); }
static void test_bf16(void) { check_precision(AG_PRECISION_BF16, 23); }

// Edge cases: no rows, and rows that are all ignored (loss 0, count 0, dh
// untouched).
static void test_edges(void) {
    if (!test_have_device("the CUDA loss head was")) return;
    ag_cuda_ctx *ctx = NULL;
    q_err err;
    TEST_OK(ag_cuda_ctx_create(&ctx, AG_PRECISION_FP32, &err), &err);
    uint64_t rng = 24;
    const int64_t N = 5, D = 16, V = 40;
    float *h = host_normal(N * D, 1.0f, &rng), *W = host_normal(V * D, 0.1f, &rng);
    float *dh0 = host_normal(N * D, 1.0f, &rng);
    int32_t targets[5] = {AG_IGNORE_INDEX, AG_IGNORE_INDEX, AG_IGNORE_INDEX, AG_IGNORE_INDEX, AG_IGNORE_INDEX};
    float *d_h = test_dev_put(h, N * D), *d_W = test_dev_put(W, V * D), *d_dh = test_dev_put(dh0, N * D);
    int32_t *d_t = test_dev_put_i32(targets, N);
    DEV_CHECK(cudaDeviceSynchronize());

    double loss = NAN;
    int64_t nv = -1;
    TEST_OK(ag_cuda_cross_entropy(ctx, &loss, &nv, d_dh, d_h, d_W, d_t, N, D, V, 0.5f, 2, 7, &err), &err);
    CU_ASSERT(loss == 0.0);
    CU_ASSERT_EQUAL(nv, 0);
    float *got = host_alloc(N * D);
    test_dev_get(got, d_dh, N * D);
    CU_ASSERT(memcmp(got, dh0, (size_t)(N * D) * sizeof(float)) == 0);

    loss = NAN, nv = -1;
    TEST_OK(ag_cuda_cross_entropy(ctx, &loss, &nv, d_dh, d_h, d_W, d_t, 0, D, V, 0.5f, 2, 7, &err), &err);
    CU_ASSERT(loss == 0.0);
    CU_ASSERT_EQUAL(nv, 0);

    cudaFree(d_h), cudaFree(d_W), cudaFree(d_dh), cudaFree(d_t);
    free(h), free(W), free(dh0), free(got);
    ag_cuda_ctx_free(ctx);
}

// ----------------------------------------------------------------------------
// bad arguments are refused before anything reaches the device (host
// pointers: never dereferenced); only the context needs a device

static void expect_refused(int rc, const q_err *err, const char *needle) {
    CU_ASSERT_EQUAL(rc, -1);
    const bool found = rc == -1 && strstr(err->msg, needle) != NULL;
    if (!found) printf("\n    expected an error naming \"%s\", got \"%s\" ", needle, rc == -1 ? err->msg : "(none)");
    CU_ASSERT(found);
}

static void test_bad_arguments(void) {
    ag_cuda_ctx *ctx = NULL;
    q_err err;
    if (ag_cuda_ctx_create(&ctx, AG_PRECISION_FP32, &err)) {
        printf("\n    SKIPPED: no CUDA context (%s) ", err.msg);
        return;
    }
    float f = 0.0f;
    int32_t id = 0;
    double loss = 0.0;
    int64_t nv = 0;
    expect_refused(ag_cuda_cross_entropy(ctx, &loss, &nv, &f, &f, &f, &id, 1, 1, 1, 1.0f, 0, 1, &err), &err,
                   "token_chunk = 0 is not positive");
    expect_refused(ag_cuda_cross_entropy(ctx, &loss, &nv, &f, &f, &f, &id, 1, 1, 1, 1.0f, 1, -2, &err), &err,
                   "vocab_chunk = -2 is not positive");
    expect_refused(ag_cuda_cross_entropy(ctx, &loss, &nv, &f, &f, &f, &id, -1, 1, 1, 1.0f, 1, 1, &err), &err,
                   "N = -1 is negative");
    expect_refused(ag_cuda_cross_entropy(ctx, &loss, &nv, &f, &f, &f, &id, 1, -4, 1, 1.0f, 1, 1, &err), &err,
                   "D = -4 is negative");
    expect_refused(ag_cuda_cross_entropy(ctx, &loss, &nv, &f, &f, &f, &id, 1, 1, 0, 1.0f, 1, 1, &err), &err,
                   "V = 0");
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "autograd/loss_cuda.cu: cross_entropy"));
    ag_cuda_ctx_free(ctx);
}

#else  // built without CUDA: the stubs say so

static void skip_no_cuda(void) { printf("\n    SKIPPED: built without CUDA; the CUDA loss head was not compiled "); }
static void test_fp32(void) { skip_no_cuda(); }
static void test_tf32(void) { skip_no_cuda(); }
static void test_bf16(void) { skip_no_cuda(); }
static void test_edges(void) { skip_no_cuda(); }

static void test_bad_arguments(void) {
    q_err err;
    float f = 0.0f;
    int32_t id = 0;
    double loss = 0.0;
    int64_t nv = 0;
    ag_cuda_ctx *ctx = NULL;
    CU_ASSERT_FALSE(ag_cuda_available());
    CU_ASSERT_EQUAL(ag_cuda_ctx_create(&ctx, AG_PRECISION_FP32, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "built without CUDA"));
    CU_ASSERT_EQUAL(ag_cuda_cross_entropy(ctx, &loss, &nv, &f, &f, &f, &id, 1, 1, 1, 1.0f, 1, 1, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "built without CUDA"));
}
#endif

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_add_test(CU_add_suite("cuda_loss_fp32", NULL, NULL), "loss, count and dh vs CPU, fp32 GEMMs", test_fp32);
    CU_add_test(CU_add_suite("cuda_loss_tf32", NULL, NULL), "loss, count and dh vs CPU, tf32 GEMMs", test_tf32);
    CU_add_test(CU_add_suite("cuda_loss_bf16", NULL, NULL), "loss, count and dh vs CPU, bf16 GEMMs", test_bf16);
    CU_add_test(CU_add_suite("cuda_loss_edges", NULL, NULL), "no rows, every row ignored", test_edges);
    CU_add_test(CU_add_suite("cuda_loss_arguments", NULL, NULL), "bad arguments refused", test_bad_arguments);
    return test_main();
}
