// tests/test_util.h: small helpers shared by the CUnit suites.
#ifndef QLORA_TEST_UTIL_H
#define QLORA_TEST_UTIL_H

#include <CUnit/Basic.h>
#include <stddef.h>

#include "core/core.h"

// Path of a file under tests/fixtures (QLORA_FIXTURES overrides the folder).
// Returns a static buffer, valid until the next call.
const char *test_fixture(const char *name);
// A fresh temporary folder (mkdtemp), malloc'd; removed by test_rmtree.
char *test_tmpdir(void);
void test_rmtree(const char *path);
// Fills x with n uniform values in [lo, hi) from a seeded xorshift generator.
void test_fill_uniform(float *x, size_t n, float lo, float hi, uint64_t *state);
// A standard normal sample (Box-Muller) from the same generator.
float test_normal(uint64_t *state);

// Normwise relative error ||x - ref|| / ||ref|| in double (absolute when ref
// is zero); any non-finite x gives infinity, so NaN never passes.
double test_rel_err(const float *x, const float *ref, int64_t n);

// Device buffers for the CUDA suites, through autograd's public ag_cuda_*
// calls (every buffer holds at least one element; copies have finished on
// return; a failure is a fatal assertion). Free with ag_cuda_free.
// test_have_device prints one SKIPPED line naming what did not run when
// there is no device.
bool test_have_device(const char *what);
void *test_dev_alloc(int64_t bytes);
void *test_dev_put_bytes(const void *h, int64_t bytes);
float *test_dev_put(const float *h, int64_t n);
int32_t *test_dev_put_i32(const int32_t *h, int64_t n);
float *test_dev_poisoned(int64_t n);  // every element NaN (0xff bytes)
void test_dev_get(float *h, const float *d, int64_t n);

// Runs the registered suites in verbose mode; returns the process exit code
// (non-zero when any assertion failed or CUnit itself failed).
int test_main(void);

// Asserts rc == 0 and prints err->msg when it is not.
#define TEST_OK(rc, err)                                                     \
    do {                                                                     \
        int rc_ = (rc);                                                      \
        if (rc_ != 0) fprintf(stderr, "\n  unexpected error: %s\n", (err)->msg); \
        CU_ASSERT_EQUAL_FATAL(rc_, 0);                                       \
    } while (0)

#endif
