// tests/test_attention_cuda.c: the CUDA attention of autograd/attention_cuda.cu
// against the CPU ag_attention_forward/backward in autograd/ops.c (itself
// tested against finite differences and a naive reference in
// test_autograd.c), on fresh random inputs and several shapes: a single
// token, one document, packed documents whose boundaries fall inside the
// kernels' 16-row and 32-key tiles, H == Hkv, head sizes that are not a
// multiple of 32 (80, and odd 33), and hd = 128 / 256, where the kernels need
// more than 48 KiB of shared memory.
//
// Outputs are poisoned with NaN (0xff bytes) before each run, so an element
// never written fails; dq, dk, dv start from the same random values on both
// sides, so the += is checked. Comparisons are normwise, ||got - ref|| /
// ||ref|| < 1e-5: the GPU sums in a different order than the CPU (an online
// softmax over 32-key tiles against the CPU's GEMMs and double sums), and
// never passes a NaN. The GPU has no atomics, so a second run must give the
// same bits. Without a device every suite prints one SKIPPED line; argument
// checks need no device and always run.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/autograd.h"
#include "test_util.h"

#ifdef QLORA_HAVE_CUDA
#include <cuda_runtime.h>

#define REL_TOL 1e-5
#define DEV_CHECK(call) CU_ASSERT_EQUAL_FATAL((call), cudaSuccess)
// A kernel call (its q_err is err_), then a sync so a fault is caught here.
#define RUN(call)                           \
    do {                                    \
        q_err err_;                         \
        TEST_OK(call, &err_);               \
        DEV_CHECK(cudaDeviceSynchronize()); \
    } while (0)

static float *host_normal(int64_t n, float sd, uint64_t *rng) {
    float *h = malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) h[i] = sd * test_normal(rng);
    return h;
}

static float *host_alloc(int64_t n) { return malloc((size_t)(n ? n : 1) * sizeof(float)); }

// The largest relative error of the running test, printed at its end.
static double worst;

static void expect_close(const float *got, const float *ref, int64_t n, const char *what, const char *shape) {
    const double e = test_rel_err(got, ref, n);
    if (e > worst) worst = e;
    if (!(e < REL_TOL)) printf("\n    %s, %s (n = %lld): relative error %.3g ", what, shape, (long long)n, e);
    CU_ASSERT(e < REL_TOL);
}

static void expect_same(const float *got, const float *ref, int64_t n, const char *what, const char *shape) {
    const int same = memcmp(got, ref, (size_t)n * sizeof(float)) == 0;
    if (!same) printf("\n    %s, %s (n = %lld): a second run gave other bits ", what, shape, (long long)n);
    CU_ASSERT(same);
}

static void report_worst(void) { printf("\n    worst relative error vs CPU: %.3g ", worst); }

// ----------------------------------------------------------------------------
// attention vs the CPU

typedef struct attn_case {
    const char *name;
    int64_t H, Hkv, hd;
    int ndocs;
    int64_t docs[6];  // document lengths, packed in order
} attn_case;

static const attn_case cases[] = {
    {"single token", 2, 1, 16, 1, {1}},
    {"one document", 4, 2, 16, 1, {37}},
    {"packed documents", 4, 2, 64, 5, {1, 5, 64, 100, 3}},
    {"H = Hkv", 8, 8, 64, 2, {50, 77}},
    {"hd = 80", 6, 2, 80, 3, {40, 9, 30}},
    {"odd hd = 33", 3, 3, 33, 4, {20, 2, 1, 17}},
    {"hd = 128, N = 300", 4, 1, 128, 1, {300}},
    {"hd = 256 (over 48 KiB of shared memory)", 2, 1, 256, 3, {7, 33, 2}},
};

static void run_case(const attn_case *c, uint64_t *rng) {
    const int64_t H = c->H, Hkv = c->Hkv, hd = c->hd;
    int64_t N = 0;
    for (int i = 0; i < c->ndocs; i++) N += c->docs[i];
    int32_t *start = malloc((size_t)N * sizeof(int32_t));  // contiguous runs
    for (int i = 0, n = 0; i < c->ndocs; n += (int)c->docs[i], i++)
        for (int64_t t = 0; t < c->docs[i]; t++) start[n + t] = n;
    const int64_t nq = N * H * hd, nkv = N * Hkv * hd, nl = N * H;

    float *q = host_normal(nq, 1.0f, rng), *k = host_normal(nkv, 1.0f, rng), *v = host_normal(nkv, 1.0f, rng);
    float *dout = host_normal(nq, 1.0f, rng);
    float *out = host_alloc(nq), *lse = host_alloc(nl), *got = host_alloc(nq), *got_l = host_alloc(nl);
    int32_t *d_start = test_dev_put_i32(start, N);
    float *d_q = test_dev_put(q, nq), *d_k = test_dev_put(k, nkv), *d_v = test_dev_put(v, nkv), *d_dout = test_dev_put(dout, nq);
    float *d_out = test_dev_poisoned(nq), *d_lse = test_dev_poisoned(nl);

    ag_attention_forward(out, lse, q, k, v, start, N, H, Hkv, hd);
    RUN(ag_cuda_attention_forward(d_out, d_lse, d_q, d_k, d_v, d_start, N, H, Hkv, hd, NULL, &err_));
    test_dev_get(got, d_out, nq);
    test_dev_get(got_l, d_lse, nl);
    expect_close(got, out, nq, "attention out", c->name);
    expect_close(got_l, lse, nl, "attention lse", c->name);

    // backward from the CPU's out and lse, into gradients that hold values
    float *dq = host_normal(nq, 1.0f, rng), *dk = host_normal(nkv, 1.0f, rng), *dv = host_normal(nkv, 1.0f, rng);
    float *d_out_ref = test_dev_put(out, nq), *d_lse_ref = test_dev_put(lse, nl);
    const int64_t ns = ag_cuda_attention_backward_scratch_floats(N, H);
    CU_ASSERT(ns >= N * H);
    float *d_scratch = test_dev_poisoned(ns);
    float *gq[2], *gk[2], *gv[2];  // two GPU runs from the same start
    for (int run = 0; run < 2; run++) {
        float *d_dq = test_dev_put(dq, nq), *d_dk = test_dev_put(dk, nkv), *d_dv = test_dev_put(dv, nkv);
        RUN(ag_cuda_attention_backward(d_dq, d_dk, d_dv, d_dout, d_q, d_k, d_v, d_out_ref, d_lse_ref, d_start, N, H,
                                       Hkv, hd, d_scratch, NULL, &err_));
        gq[run] = host_alloc(nq), gk[run] = host_alloc(nkv), gv[run] = host_alloc(nkv);
        test_dev_get(gq[run], d_dq, nq);
        test_dev_get(gk[run], d_dk, nkv);
        test_dev_get(gv[run], d_dv, nkv);
        cudaFree(d_dq), cudaFree(d_dk), cudaFree(d_dv);
    }
    ag_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, start, N, H, Hkv, hd);
    expect_close(gq[0], dq, nq, "attention dq", c->name);
    expect_close(gk[0], dk, nkv, "attention dk", c->name);
    expect_close(gv[0], dv, nkv, "attention dv", c->name);
    expect_same(gq[1], gq[0], nq, "attention dq", c->name);
    expect_same(gk[1], gk[0], nkv, "attention dk", c->name);
    expect_same(gv[1], gv[0], nkv, "attention dv", c->name);

    cudaFree(d_start), cudaFree(d_q), cudaFree(d_k), cudaFree(d_v), cudaFree(d_dout), cudaFree(d_out);
    cudaFree(d_lse), cudaFree(d_out_ref), cudaFree(d_lse_ref), cudaFree(d_scratch);
    for (int run = 0; run < 2; run++) free(gq[run]), free(gk[run]), free(gv[run]);
    free(start), free(q), free(k), free(v), free(dout), free(out), free(lse), free(got), free(got_l);
    free(dq), free(dk), free(dv);
}

static void test_attention(void) {
    if (!test_have_device("the CUDA kernels were")) return;
    uint64_t rng = 21;
    worst = 0;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) run_case(&cases[c], &rng);
    report_worst();
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
    expect_refused(ag_cuda_attention_forward(&f, &f, &f, &f, &f, &id, 1, 1, 1, 258, NULL, &err), &err,
                   "hd = 258 is larger than 256");
    expect_refused(ag_cuda_attention_backward(&f, &f, &f, &f, &f, &f, &f, &f, &f, &id, 1, 1, 1, 258, &f, NULL, &err),
                   &err, "hd = 258 is larger than 256");
    expect_refused(ag_cuda_attention_forward(&f, &f, &f, &f, &f, &id, -1, 1, 1, 16, NULL, &err), &err,
                   "N = -1 is negative");
    expect_refused(ag_cuda_attention_backward(&f, &f, &f, &f, &f, &f, &f, &f, &f, &id, -1, 1, 1, 16, &f, NULL, &err),
                   &err, "N = -1 is negative");
    expect_refused(ag_cuda_attention_forward(&f, &f, &f, &f, &f, &id, 4, 3, 2, 16, NULL, &err), &err,
                   "H = 3 is not a multiple of Hkv = 2");
    expect_refused(ag_cuda_attention_backward(&f, &f, &f, &f, &f, &f, &f, &f, &f, &id, 4, 2, 1, 16, NULL, NULL, &err),
                   &err, "no scratch");
    CU_ASSERT_EQUAL(ag_cuda_attention_backward_scratch_floats(5, 3), 15);
    // empty inputs are fine and touch nothing (host pointers: never dereferenced)
    CU_ASSERT_EQUAL(ag_cuda_attention_forward(&f, &f, &f, &f, &f, &id, 0, 4, 2, 16, NULL, &err), 0);
    CU_ASSERT_EQUAL(
        ag_cuda_attention_backward(&f, &f, &f, &f, &f, &f, &f, &f, &f, &id, 0, 4, 2, 16, NULL, NULL, &err), 0);
}

#else  // built without CUDA: the stubs say so

static void skip_no_cuda(void) { printf("\n    SKIPPED: built without CUDA; the CUDA kernels were not compiled "); }
static void test_attention(void) { skip_no_cuda(); }

static void test_bad_arguments(void) {
    q_err err;
    float f = 0.0f;
    int32_t id = 0;
    CU_ASSERT_FALSE(ag_cuda_available());
    CU_ASSERT_EQUAL(ag_cuda_attention_forward(&f, &f, &f, &f, &f, &id, 1, 1, 1, 16, NULL, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "built without CUDA"));
    CU_ASSERT_EQUAL(ag_cuda_attention_backward(&f, &f, &f, &f, &f, &f, &f, &f, &f, &id, 1, 1, 1, 16, &f, NULL, &err),
                    -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "built without CUDA"));
}
#endif

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_add_test(CU_add_suite("cuda_attention", NULL, NULL), "forward and backward vs CPU, deterministic",
                test_attention);
    CU_add_test(CU_add_suite("cuda_attention_arguments", NULL, NULL), "bad arguments refused", test_bad_arguments);
    return test_main();
}
