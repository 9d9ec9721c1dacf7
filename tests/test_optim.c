// tests/test_optim.c: AdamW, clipping and schedules against PyTorch
// (tests/fixtures/optim/adamw.safetensors, made by
// scripts/fixtures/make_optim_fixtures.py: torch.optim.AdamW's reference loop
// and clip_grad_norm_ over 12 steps, a third of them clipped).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "optim/optim.h"
#include "test_util.h"

static const float *f32(const q_st_file *f, const char *name, int64_t numel) {
    const q_st_tensor *t = q_st_find(f, name);
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT_EQUAL_FATAL(t->dtype, Q_DTYPE_F32);
    CU_ASSERT_EQUAL_FATAL(t->numel, numel);
    return t->data;  // safetensors data of this file is 4-byte aligned (8-aligned data start, F32 only)
}

// Tolerance: both sides do the same float32 operations in the same order
// (lerp, addcmul, sqrt / sqrt(bc2) + eps, addcdiv), but torch computes the
// bias corrections and the step size in double and rounds once; qlora rounds
// them to float: a few ulp per step, ~7e-7 relative after 12 steps; held to 2e-6.
static void test_adamw_vs_torch(void) {
    q_err err;
    q_st_file f;
    TEST_OK(q_st_open(&f, test_fixture("optim/adamw.safetensors"), &err), &err);
    const int64_t n = 1000, steps = 12;
    const float *w0 = f32(&f, "w0", n), *grads = f32(&f, "grads", steps * n), *after = f32(&f, "after", steps * n);
    const float *lrs = f32(&f, "lr", steps), *norms = f32(&f, "norms", steps);
    uint16_t *w16 = malloc((size_t)n * 2);
    float *w32 = malloc((size_t)n * 4), *g = malloc((size_t)n * 4);
    for (int64_t k = 0; k < n; k++) w16[k] = q_f32_to_f16(w0[k]);
    optim_param p = {w16, w32, g, n};
    optim_adamw o;
    TEST_OK(optim_adamw_init(&o, &p, 1, 0.9, 0.999, 1e-8, 0.01, &err), &err);
    const optim_sched s = {OPTIM_SCHED_COSINE, 2e-3, 3, steps, 0.1};
    double worst = 0, worst_lr = 0, worst_norm = 0;
    for (int64_t t = 0; t < steps; t++) {
        memcpy(g, grads + t * n, (size_t)n * 4);
        const double norm = optim_grad_norm(&p, 1), lr = optim_sched_lr(&s, t);
        worst_norm = fmax(worst_norm, fabs(norm - norms[t]) / norms[t]);
        worst_lr = fmax(worst_lr, fabs(lr - lrs[t]) / lrs[t]);
        optim_adamw_step(&o, &p, 1, lr, optim_clip_factor(norm, 1.0));
        double num = 0, den = 0;
        for (int64_t k = 0; k < n; k++) {
            const double d = (double)o.master[k] - after[t * n + k];
            num += d * d;
            den += (double)after[t * n + k] * after[t * n + k];
            // the fp16 weight and its fp32 copy follow the master
            CU_ASSERT_EQUAL(w16[k], q_f32_to_f16(o.master[k]));
            CU_ASSERT_EQUAL(w32[k], q_f16_to_f32(w16[k]));
        }
        worst = fmax(worst, sqrt(num / den));
    }
    CU_ASSERT(worst < 2e-6);
    CU_ASSERT(worst_lr < 1e-6);
    CU_ASSERT(worst_norm < 1e-6);
    CU_ASSERT_EQUAL(o.t, steps);
    printf("\n    12 AdamW steps vs torch: weights rel %.1e, lr rel %.1e, grad norm rel %.1e ", worst, worst_lr,
           worst_norm);
    optim_adamw_free(&o);
    free(w16), free(w32), free(g);
    q_st_close(&f);
}

static void test_schedules(void) {
    const optim_sched c = {OPTIM_SCHED_CONSTANT, 1.0, 4, 100, 0.0}, l = {OPTIM_SCHED_LINEAR, 1.0, 0, 11, 0.0},
                      cos = {OPTIM_SCHED_COSINE, 2.0, 2, 12, 0.5};
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&c, 0), 0.25, 1e-15);  // warmup starts above zero
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&c, 3), 1.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&c, 99), 1.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&l, 0), 1.0, 1e-15);  // linear: 1.0 ... 0.0 over 11 steps
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&l, 5), 0.5, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&l, 10), 0.0, 1e-15);
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&cos, 2), 2.0, 1e-15);  // cosine from the peak to final_frac * lr
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&cos, 11), 1.0, 1e-12);
    CU_ASSERT_DOUBLE_EQUAL(optim_sched_lr(&cos, 50), 1.0, 1e-12);  // past the end: stays at the floor
    q_err err;
    optim_sched_kind k;
    CU_ASSERT_EQUAL(optim_sched_from_name("cosine", &k, &err), 0);
    CU_ASSERT_EQUAL(k, OPTIM_SCHED_COSINE);
    CU_ASSERT_EQUAL(optim_sched_from_name("wsd", &k, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "wsd"));
}

static void test_clip(void) {
    CU_ASSERT_EQUAL(optim_clip_factor(0.5, 1.0), 1.0f);
    CU_ASSERT_EQUAL(optim_clip_factor(5.0, 0.0), 1.0f);  // disabled
    CU_ASSERT_DOUBLE_EQUAL(optim_clip_factor(4.0, 1.0), 0.25, 1e-6);
    CU_ASSERT_EQUAL(optim_clip_factor(NAN, 1.0), 1.0f);  // a NaN norm is the trainer's to report, not to scale
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("optim", NULL, NULL);
    CU_add_test(s, "AdamW + clipping + cosine schedule vs torch", test_adamw_vs_torch);
    CU_add_test(s, "schedules", test_schedules);
    CU_add_test(s, "clipping factor", test_clip);
    return test_main();
}
