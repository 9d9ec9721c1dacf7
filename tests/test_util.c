// tests/test_util.c: helpers shared by the CUnit suites.
#define _GNU_SOURCE
#include "test_util.h"

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
