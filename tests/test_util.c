// tests/test_util.c: helpers shared by the CUnit suites.
#define _GNU_SOURCE
#include "test_util.h"

#include "autograd/autograd.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

const char *test_fixture(const char *name) {
    static char path[4096];
    const char *dir = getenv("QLORA_FIXTURES");
    snprintf(path, sizeof path, "%s/%s", dir ? dir : "tests/fixtures", name);
    return path;
}

char *test_tmpdir(void) {
    char tmpl[] = "/tmp/qlora-test-XXXXXX";
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

void test_rmtree(const char *path) {
    char cmd[4200];
    if (!path || strncmp(path, "/tmp/qlora-test-", 16) != 0) return;  // never anything else
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", path);
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s ? *s : 0x9e3779b97f4a7c15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static float uniform01(uint64_t *s) { return (float)(xorshift(s) >> 40) / 16777216.0f; }

void test_fill_uniform(float *x, size_t n, float lo, float hi, uint64_t *state) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * uniform01(state);
}

float test_normal(uint64_t *state) {
    float u1 = uniform01(state), u2 = uniform01(state);
    if (u1 < 1e-7f) u1 = 1e-7f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

double test_rel_err(const float *x, const float *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(x[i])) return INFINITY;
        const double d = (double)x[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * (double)ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

int test_main(void) {
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned failed = CU_get_number_of_failures() + CU_get_number_of_tests_failed();
    int cu_err = CU_get_error();
    CU_cleanup_registry();
    return (failed || cu_err) ? 1 : 0;
}

// ----------------------------------------------------------------------------
// device buffers

bool test_have_device(const char *what) {
    if (ag_cuda_available()) return true;
    printf("\n    SKIPPED: no CUDA device present; %s not run ", what);
    return false;
}

void *test_dev_alloc(int64_t bytes) {
    void *d = NULL;
    q_err err;
    TEST_OK(ag_cuda_malloc(&d, bytes > 0 ? bytes : 4, &err), &err);
    return d;
}

void *test_dev_put_bytes(const void *h, int64_t bytes) {
    void *d = test_dev_alloc(bytes);
    q_err err;
    if (bytes > 0) TEST_OK(ag_cuda_copy(d, h, bytes, NULL, &err), &err);
    return d;
}

float *test_dev_put(const float *h, int64_t n) { return test_dev_put_bytes(h, n * (int64_t)sizeof(float)); }
int32_t *test_dev_put_i32(const int32_t *h, int64_t n) { return test_dev_put_bytes(h, n * (int64_t)sizeof(int32_t)); }

float *test_dev_poisoned(int64_t n) {
    const size_t bytes = (size_t)(n > 0 ? n : 1) * sizeof(float);
    void *nan = malloc(bytes);
    CU_ASSERT_PTR_NOT_NULL_FATAL(nan);
    memset(nan, 0xff, bytes);
    float *d = test_dev_put_bytes(nan, (int64_t)bytes);
    free(nan);
    return d;
}

void test_dev_get(float *h, const float *d, int64_t n) {
    q_err err;
    if (n > 0) TEST_OK(ag_cuda_copy(h, d, n * (int64_t)sizeof(float), NULL, &err), &err);
}
