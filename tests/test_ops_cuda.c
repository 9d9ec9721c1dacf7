// tests/test_ops_cuda.c: the CUDA kernels of autograd/ops_cuda.cu against
// their CPU references in autograd/ops.c (themselves tested against
// finite differences and naive references in test_autograd.c), on fresh
// random inputs and several shapes, odd ones included (D not a multiple of
// 32, a single row, hd/2 past the CPU's 64-wide angle blocks).
//
// Outputs that a kernel overwrites are poisoned with NaN (0xff bytes) before
// each run, so an element never written fails; gradients that a kernel
// accumulates into start from the same random values on both sides, so the
// += is checked. Comparisons are normwise, ||got - ref|| / ||ref|| < 1e-6, and
// never pass a NaN; gathers, adds and dropout (integer masks, one rounding
// per element) must match bit for bit. Without a device every suite prints
// one SKIPPED line; argument checks need no device and always run.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/autograd.h"
#include "test_util.h"

#ifdef QLORA_HAVE_CUDA
#include <cuda_runtime.h>

#define REL_TOL 1e-6
#define DEV_CHECK(call) CU_ASSERT_EQUAL_FATAL((call), cudaSuccess)
// A kernel call (its q_err is err_), then a sync so a fault is caught here.
#define RUN(call)                           \
    do {                                    \
        q_err err_;                         \
        TEST_OK(call, &err_);               \
        DEV_CHECK(cudaDeviceSynchronize()); \
    } while (0)

static float *host_random(int64_t n, float lo, float hi, uint64_t *rng) {
    float *h = malloc((size_t)(n ? n : 1) * sizeof(float));
    test_fill_uniform(h, (size_t)n, lo, hi, rng);
    return h;
}

static float *host_normal(int64_t n, float sd, uint64_t *rng) {
    float *h = malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) h[i] = sd * test_normal(rng);
    return h;
}

// The largest relative error of the running test, printed at its end.
static double worst;

static void expect_close(const float *got, const float *ref, int64_t n, const char *what) {
    const double e = test_rel_err(got, ref, n);
    if (e > worst) worst = e;
    if (!(e < REL_TOL)) printf("\n    %s (n = %lld): relative error %.3g ", what, (long long)n, e);
    CU_ASSERT(e < REL_TOL);
}

static void expect_same(const float *got, const float *ref, int64_t n, const char *what) {
    const int same = memcmp(got, ref, (size_t)n * sizeof(float)) == 0;
    if (!same) printf("\n    %s (n = %lld): not bit-identical to the CPU ", what, (long long)n);
    CU_ASSERT(same);
}

static void report_worst(void) { printf("\n    worst relative error vs CPU: %.3g ", worst); }

// ----------------------------------------------------------------------------
// embedding

static void test_embedding(void) {
    if (!test_have_device("the CUDA kernels were")) return;
    uint64_t rng = 11;
    worst = 0;
    const int64_t shapes[][3] = {{1, 1, 1}, {37, 50, 77}, {300, 50, 256}, {64, 1000, 1031}};  // N, V, D
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int64_t N = shapes[c][0], V = shapes[c][1], D = shapes[c][2];
        int32_t *ids = malloc((size_t)N * sizeof(int32_t));
        // small V with many tokens: ids repeat, the case a scatter-add gets wrong
        float u;
        for (int64_t n = 0; n < N; n++) {
            test_fill_uniform(&u, 1, 0.0f, (float)V, &rng);
            ids[n] = (int32_t)u < V ? (int32_t)u : (int32_t)(V - 1);
        }
        float *table = host_normal(V * D, 1.0f, &rng), *dout = host_normal(N * D, 1.0f, &rng);
        float *ref = malloc((size_t)(N * D) * sizeof(float)), *got = malloc((size_t)(N * D) * sizeof(float));
        int32_t *d_ids = test_dev_put_i32(ids, N);
        float *d_table = test_dev_put(table, V * D), *d_out = test_dev_poisoned(N * D), *d_dout = test_dev_put(dout, N * D);

        ag_embedding_forward(ref, ids, table, N, D);
        RUN(ag_cuda_embedding_forward(d_out, d_ids, d_table, N, D, NULL, &err_));
        test_dev_get(got, d_out, N * D);
        expect_same(got, ref, N * D, "embedding forward");
        expect_close(got, ref, N * D, "embedding forward");

        // backward into a table that already holds values (+=)
        float *dref = host_normal(V * D, 1.0f, &rng), *dgot = malloc((size_t)(V * D) * sizeof(float));
        float *d_dtable = test_dev_put(dref, V * D);
        ag_embedding_backward(dref, dout, ids, N, D);
        RUN(ag_cuda_embedding_backward(d_dtable, d_dout, d_ids, N, D, NULL, &err_));
        test_dev_get(dgot, d_dtable, V * D);
        expect_same(dgot, dref, V * D, "embedding backward (tokens in order, as the CPU)");
        expect_close(dgot, dref, V * D, "embedding backward");

        cudaFree(d_ids), cudaFree(d_table), cudaFree(d_out), cudaFree(d_dout), cudaFree(d_dtable);
        free(ids), free(table), free(dout), free(ref), free(got), free(dref), free(dgot);
    }
    report_worst();
}

// ----------------------------------------------------------------------------
// RMSNorm

static void test_rmsnorm(void) {
    if (!test_have_device("the CUDA kernels were")) return;
    uint64_t rng = 12;
    worst = 0;
    const int64_t shapes[][2] = {{1, 1}, {1, 33}, {37, 77}, {300, 1000}, {5, 4099}, {130, 64}};  // N, D
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int64_t N = shapes[c][0], D = shapes[c][1];
        const float eps = c % 2 ? 1e-5f : 1e-6f;
        float *x = host_normal(N * D, 1.5f, &rng), *w = host_random(D, 0.5f, 1.5f, &rng);
        float *dout = host_normal(N * D, 1.0f, &rng);
        float *ref = malloc((size_t)(N * D) * sizeof(float)), *got = malloc((size_t)(N * D) * sizeof(float));
        float *rstd = malloc((size_t)N * sizeof(float)), *rstd_got = malloc((size_t)N * sizeof(float));
        float *d_x = test_dev_put(x, N * D), *d_w = test_dev_put(w, D), *d_dout = test_dev_put(dout, N * D);
        float *d_out = test_dev_poisoned(N * D), *d_rstd = test_dev_poisoned(N);

        ag_rmsnorm_forward(ref, rstd, x, w, N, D, eps);
        RUN(ag_cuda_rmsnorm_forward(d_out, d_rstd, d_x, d_w, N, D, eps, NULL, &err_));
        test_dev_get(got, d_out, N * D);
        test_dev_get(rstd_got, d_rstd, N);
        expect_close(got, ref, N * D, "rmsnorm out");
        expect_close(rstd_got, rstd, N, "rmsnorm rstd");

        // backward from the CPU's rstd, into gradients that hold values;
        // then each of dx, dw alone
        for (int which = 0; which < 3; which++) {
            const bool want_dx = which != 2, want_dw = which != 1;
            float *dx = host_normal(N * D, 1.0f, &rng), *dw = host_normal(D, 1.0f, &rng);
            float *d_dx = test_dev_put(dx, N * D), *d_dw = test_dev_put(dw, D), *d_rs = test_dev_put(rstd, N);
            const int64_t ns = ag_cuda_rmsnorm_backward_scratch_floats(N, D);
            CU_ASSERT(ns >= D);
            float *d_scratch = test_dev_poisoned(ns);
            ag_rmsnorm_backward(want_dx ? dx : NULL, want_dw ? dw : NULL, dout, x, w, rstd, N, D);
            RUN(ag_cuda_rmsnorm_backward(want_dx ? d_dx : NULL, want_dw ? d_dw : NULL, d_dout, d_x, d_w, d_rs, N, D,
                                         want_dw ? d_scratch : NULL, NULL, &err_));
            float *gx = malloc((size_t)(N * D) * sizeof(float)), *gw = malloc((size_t)D * sizeof(float));
            test_dev_get(gx, d_dx, N * D);
            test_dev_get(gw, d_dw, D);
            expect_close(gx, dx, N * D, want_dx ? "rmsnorm dx" : "rmsnorm dx (untouched when NULL)");
            expect_close(gw, dw, D, want_dw ? "rmsnorm dw" : "rmsnorm dw (untouched when NULL)");
            cudaFree(d_dx), cudaFree(d_dw), cudaFree(d_rs), cudaFree(d_scratch);
            free(dx), free(dw), free(gx), free(gw);
        }
        cudaFree(d_x), cudaFree(d_w), cudaFree(d_dout), cudaFree(d_out), cudaFree(d_rstd);
        free(x), free(w), free(dout), free(ref), free(got), free(rstd), free(rstd_got);
    }
    report_worst();
}

// ----------------------------------------------------------------------------
// dropout: the same counter-based mask on both sides, bit for bit

static void test_dropout(void) {
    if (!test_have_device("the CUDA kernels were")) return;
    uint64_t rng = 13;
    worst = 0;
    const int64_t lens[] = {1, 1000, 100003};
    const float ps[] = {0.0f, 0.1f, 0.5f, 0.9f};
    const uint64_t seeds[] = {0, 0xdeadbeefcafef00dull};
    for (size_t li = 0; li < 3; li++)
        for (size_t pi = 0; pi < 4; pi++)
            for (size_t si = 0; si < 2; si++) {
                const int64_t n = lens[li];
                const float p = ps[pi];
                const uint64_t seed = seeds[si];
                // |x| in [0.5, 1.5): a zero output means dropped, nothing else
                float *x = host_random(n, 0.5f, 1.5f, &rng);
                for (int64_t i = 0; i < n; i += 2) x[i] = -x[i];
                float *ref = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)n * sizeof(float));
                float *d_x = test_dev_put(x, n), *d_out = test_dev_poisoned(n);
                ag_dropout_forward(ref, x, n, p, seed);
                RUN(ag_cuda_dropout_forward(d_out, d_x, n, p, seed, NULL, &err_));
                test_dev_get(got, d_out, n);
                int64_t mask_diff = 0, kept = 0;
                for (int64_t i = 0; i < n; i++) {
                    mask_diff += (got[i] == 0.0f) != (ref[i] == 0.0f);
                    kept += ref[i] != 0.0f;
                }
                CU_ASSERT_EQUAL(mask_diff, 0);
                expect_same(got, ref, n, "dropout forward");
                if (n > 10000) {  // the CPU mask itself keeps 1 - p, within 5 sigma
                    const double mean = (1.0 - p) * (double)n, sd = sqrt((double)n * p * (1.0 - p));
                    CU_ASSERT(fabs((double)kept - mean) <= 5.0 * sd + 0.5);
                }
                // in place on the device
                if (p > 0.0f) {
                    RUN(ag_cuda_dropout_forward(d_x, d_x, n, p, seed, NULL, &err_));
                    test_dev_get(got, d_x, n);
                    expect_same(got, ref, n, "dropout forward in place");
                }
                // backward accumulates with the same mask
                float *dout = host_normal(n, 1.0f, &rng), *dx = host_normal(n, 1.0f, &rng);
                float *d_dout = test_dev_put(dout, n), *d_dx = test_dev_put(dx, n);
                ag_dropout_backward(dx, dout, n, p, seed);
                RUN(ag_cuda_dropout_backward(d_dx, d_dout, n, p, seed, NULL, &err_));
                test_dev_get(got, d_dx, n);
                expect_same(got, dx, n, "dropout backward");
                expect_close(got, dx, n, "dropout backward");
                cudaFree(d_x), cudaFree(d_out), cudaFree(d_dout), cudaFree(d_dx);
                free(x), free(ref), free(got), free(dout), free(dx);
            }
    report_worst();
}

// ----------------------------------------------------------------------------
// RoPE

static void test_rope(void) {
    if (!test_have_device("the CUDA kernels were")) return;
    uint64_t rng = 14;
    worst = 0;
    // N, H, hd; hd/2 = 80 crosses the CPU's 64-wide angle blocks
    const int64_t shapes[][3] = {{1, 1, 2}, {7, 3, 6}, {33, 4, 128}, {5, 2, 160}, {3, 5, 34}};
    const ag_rope_scaling llama3 = {8.0f, 1.0f, 4.0f, 8192};
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int64_t N = shapes[c][0], H = shapes[c][1], hd = shapes[c][2], n = N * H * hd;
        float *inv_freq = malloc((size_t)(hd / 2) * sizeof(float));
        ag_rope_inv_freq(inv_freq, hd, 500000.0, c % 2 ? &llama3 : NULL);
        int32_t *pos = malloc((size_t)N * sizeof(int32_t));
        for (int64_t i = 0; i < N; i++) {
            float u;
            test_fill_uniform(&u, 1, 0.0f, 8192.0f, &rng);
            pos[i] = (int32_t)u;
        }
        pos[N - 1] = 131071;  // a long-context position: large angles
        float *x = host_normal(n, 1.0f, &rng), *dout = host_normal(n, 1.0f, &rng);
        float *ref = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)n * sizeof(float));
        int32_t *d_pos = test_dev_put_i32(pos, N);
        float *d_inv = test_dev_put(inv_freq, hd / 2), *d_x = test_dev_put(x, n), *d_out = test_dev_poisoned(n);
        float *d_dout = test_dev_put(dout, n);

        ag_rope_forward(ref, x, pos, inv_freq, N, H, hd);
        RUN(ag_cuda_rope_forward(d_out, d_x, d_pos, d_inv, N, H, hd, NULL, &err_));
        test_dev_get(got, d_out, n);
        expect_close(got, ref, n, "rope forward");
        RUN(ag_cuda_rope_forward(d_x, d_x, d_pos, d_inv, N, H, hd, NULL, &err_));
        test_dev_get(got, d_x, n);
        expect_close(got, ref, n, "rope forward in place");

        float *dx = host_normal(n, 1.0f, &rng);
        float *d_dx = test_dev_put(dx, n);
        ag_rope_backward(dx, dout, pos, inv_freq, N, H, hd);
        RUN(ag_cuda_rope_backward(d_dx, d_dout, d_pos, d_inv, N, H, hd, NULL, &err_));
        test_dev_get(got, d_dx, n);
        expect_close(got, dx, n, "rope backward");

        cudaFree(d_pos), cudaFree(d_inv), cudaFree(d_x), cudaFree(d_out), cudaFree(d_dout), cudaFree(d_dx);
        free(inv_freq), free(pos), free(x), free(dout), free(ref), free(got), free(dx);
    }
    report_worst();
}

// ----------------------------------------------------------------------------
// SwiGLU

static void test_swiglu(void) {
    if (!test_have_device("the CUDA kernels were")) return;
    uint64_t rng = 15;
    worst = 0;
    const int64_t lens[] = {1, 1001, 65537};
    for (size_t li = 0; li < 3; li++) {
        const int64_t n = lens[li];
        float *gate = host_normal(n, 3.0f, &rng), *up = host_normal(n, 1.0f, &rng);
        float *dout = host_normal(n, 1.0f, &rng);
        float *ref = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)n * sizeof(float));
        float *d_gate = test_dev_put(gate, n), *d_up = test_dev_put(up, n), *d_dout = test_dev_put(dout, n);
        float *d_out = test_dev_poisoned(n);
        ag_swiglu_forward(ref, gate, up, n);
        RUN(ag_cuda_swiglu_forward(d_out, d_gate, d_up, n, NULL, &err_));
        test_dev_get(got, d_out, n);
        expect_close(got, ref, n, "swiglu forward");
        for (int which = 0; which < 3; which++) {  // both gradients, then each alone
            const bool want_g = which != 2, want_u = which != 1;
            float *dg = host_normal(n, 1.0f, &rng), *du = host_normal(n, 1.0f, &rng);
            float *d_dg = test_dev_put(dg, n), *d_du = test_dev_put(du, n);
            ag_swiglu_backward(want_g ? dg : NULL, want_u ? du : NULL, dout, gate, up, n);
            RUN(ag_cuda_swiglu_backward(want_g ? d_dg : NULL, want_u ? d_du : NULL, d_dout, d_gate, d_up, n, NULL,
                                        &err_));
            test_dev_get(got, d_dg, n);
            expect_close(got, dg, n, "swiglu dgate");
            test_dev_get(got, d_du, n);
            expect_close(got, du, n, "swiglu dup");
            cudaFree(d_dg), cudaFree(d_du);
            free(dg), free(du);
        }
        cudaFree(d_gate), cudaFree(d_up), cudaFree(d_dout), cudaFree(d_out);
        free(gate), free(up), free(dout), free(ref), free(got);
    }
    report_worst();
}

// ----------------------------------------------------------------------------
// residual add: against the plain C loop (the tape's), bit for bit

static void test_add(void) {
    if (!test_have_device("the CUDA kernels were")) return;
    uint64_t rng = 16;
    const int64_t lens[] = {1, 1001, 65537};
    for (size_t li = 0; li < 3; li++) {
        const int64_t n = lens[li];
        float *a = host_normal(n, 1.0f, &rng), *b = host_normal(n, 1.0f, &rng), *dout = host_normal(n, 1.0f, &rng);
        float *ref = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; i++) ref[i] = a[i] + b[i];
        float *d_a = test_dev_put(a, n), *d_b = test_dev_put(b, n), *d_out = test_dev_poisoned(n), *d_dout = test_dev_put(dout, n);
        RUN(ag_cuda_add_forward(d_out, d_a, d_b, n, NULL, &err_));
        test_dev_get(got, d_out, n);
        expect_same(got, ref, n, "add forward");
        RUN(ag_cuda_add_forward(d_a, d_a, d_b, n, NULL, &err_));  // in place, as a residual stream does
        test_dev_get(got, d_a, n);
        expect_same(got, ref, n, "add forward in place");

        // da += dout, db += dout; then x + x: one gradient array gets dout twice
        float *da = host_normal(n, 1.0f, &rng), *db = host_normal(n, 1.0f, &rng);
        float *d_da = test_dev_put(da, n), *d_db = test_dev_put(db, n);
        RUN(ag_cuda_add_backward(d_da, d_db, d_dout, n, NULL, &err_));
        for (int64_t i = 0; i < n; i++) da[i] += dout[i], db[i] += dout[i];
        test_dev_get(got, d_da, n);
        expect_same(got, da, n, "add backward da");
        test_dev_get(got, d_db, n);
        expect_same(got, db, n, "add backward db");
        RUN(ag_cuda_add_backward(d_da, d_da, d_dout, n, NULL, &err_));
        for (int64_t i = 0; i < n; i++) da[i] = (da[i] + dout[i]) + dout[i];
        test_dev_get(got, d_da, n);
        expect_same(got, da, n, "add backward, da aliasing db");
        RUN(ag_cuda_add_backward(NULL, d_db, d_dout, n, NULL, &err_));
        for (int64_t i = 0; i < n; i++) db[i] += dout[i];
        test_dev_get(got, d_db, n);
        expect_same(got, db, n, "add backward, da NULL");

        cudaFree(d_a), cudaFree(d_b), cudaFree(d_out), cudaFree(d_dout), cudaFree(d_da), cudaFree(d_db);
        free(a), free(b), free(dout), free(ref), free(got), free(da), free(db);
    }
}

// ----------------------------------------------------------------------------
// bad arguments are refused before anything reaches the device

static void expect_refused(int rc, const q_err *err, const char *needle) {
    CU_ASSERT_EQUAL(rc, -1);
    const bool found = rc == -1 && strstr(err->msg, needle) != NULL;
    if (!found) printf("\n    expected an error naming \"%s\", got \"%s\" ", needle, rc == -1 ? err->msg : "(none)");
    CU_ASSERT(found);
}

static void test_bad_arguments(void) {
    q_err err;
    float f = 0.0f;
    int32_t id = 0;
    expect_refused(ag_cuda_rope_forward(&f, &f, &id, &f, 1, 1, 5, NULL, &err), &err, "hd = 5 is odd");
    expect_refused(ag_cuda_rope_backward(&f, &f, &id, &f, -1, 1, 4, NULL, &err), &err, "N = -1 is negative");
    expect_refused(ag_cuda_dropout_forward(&f, &f, 1, 1.5f, 0, NULL, &err), &err, "p = 1.5 is not in [0, 1]");
    expect_refused(ag_cuda_dropout_backward(&f, &f, 1, NAN, 0, NULL, &err), &err, "is not in [0, 1]");
    expect_refused(ag_cuda_rmsnorm_backward(NULL, &f, &f, &f, &f, &f, 4, 8, NULL, NULL, &err), &err, "no scratch");
    expect_refused(ag_cuda_rmsnorm_forward(&f, NULL, &f, &f, 4, 0, 1e-5f, NULL, &err), &err, "D = 0");
    expect_refused(ag_cuda_embedding_forward(&f, &id, &f, 1, -3, NULL, &err), &err, "D = -3 is negative");
    expect_refused(ag_cuda_swiglu_forward(&f, &f, &f, -2, NULL, &err), &err, "n = -2 is negative");
    // empty inputs are fine and touch nothing (host pointers: never dereferenced)
    CU_ASSERT_EQUAL(ag_cuda_swiglu_forward(&f, &f, &f, 0, NULL, &err), 0);
    CU_ASSERT_EQUAL(ag_cuda_add_backward(&f, &f, &f, 0, NULL, &err), 0);
}

#else  // built without CUDA: the stubs say so

static void skip_no_cuda(void) { printf("\n    SKIPPED: built without CUDA; the CUDA kernels were not compiled "); }
static void test_embedding(void) { skip_no_cuda(); }
static void test_rmsnorm(void) { skip_no_cuda(); }
static void test_dropout(void) { skip_no_cuda(); }
static void test_rope(void) { skip_no_cuda(); }
static void test_swiglu(void) { skip_no_cuda(); }
static void test_add(void) { skip_no_cuda(); }

static void test_bad_arguments(void) {
    q_err err;
    float f = 0.0f;
    CU_ASSERT_FALSE(ag_cuda_available());
    CU_ASSERT_EQUAL(ag_cuda_swiglu_forward(&f, &f, &f, 1, NULL, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "built without CUDA"));
    CU_ASSERT_EQUAL(ag_cuda_rmsnorm_forward(&f, NULL, &f, &f, 1, 1, 1e-5f, NULL, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "built without CUDA"));
}
#endif

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_add_test(CU_add_suite("cuda_embedding", NULL, NULL), "gather and ordered scatter-add vs CPU", test_embedding);
    CU_add_test(CU_add_suite("cuda_rmsnorm", NULL, NULL), "forward, dx and two-pass dw vs CPU", test_rmsnorm);
    CU_add_test(CU_add_suite("cuda_dropout", NULL, NULL), "masks bit-identical to the CPU", test_dropout);
    CU_add_test(CU_add_suite("cuda_rope", NULL, NULL), "forward, in place, backward vs CPU", test_rope);
    CU_add_test(CU_add_suite("cuda_swiglu", NULL, NULL), "forward and backward vs CPU", test_swiglu);
    CU_add_test(CU_add_suite("cuda_add", NULL, NULL), "residual add and its backward", test_add);
    CU_add_test(CU_add_suite("cuda_arguments", NULL, NULL), "bad arguments refused", test_bad_arguments);
    return test_main();
}
