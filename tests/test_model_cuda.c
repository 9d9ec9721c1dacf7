// tests/test_model_cuda.c: a whole training step on the GPU against the same
// step on the CPU (itself golden-tested against PyTorch + PEFT + bitsandbytes
// in test_model.c), on the fixture models: GQA with llama3 rope, Qwen2 with
// q/k/v biases and rsLoRA, a tied bf16 model. Loss and every LoRA gradient
// are compared, with LoRA dropout off and on (the masks are the same
// counter-based hash on both sides), with and without recompute.
//
// Tolerances, normwise relative (loss; worst gradient tensor):
//   fp32  1e-5; 1e-4   same products, other summation orders (cuBLAS vs
//                      OpenBLAS, block-tree reductions vs 16 lanes) and
//                      device expf/sincosf (<= 2 ulp); the CPU-vs-PyTorch
//                      golden tests use the same bounds
//   tf32  2e-3; 2e-2   the base and LM-head GEMMs multiply 10-bit mantissas
//   bf16  1e-2; 5e-2   activations rounded to 8-bit mantissas before the
//                      base and LM-head GEMMs (weights of the bf16 model are
//                      exactly bf16); LoRA GEMMs stay fp32
// These bounds are the expected error sizes, not yet measured on a GPU.
// Without a device every test prints one SKIPPED line; the refusal when no
// device is present is checked everywhere.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "test_util.h"
#include "train/train.h"

static const char *model_path(const char *name, const char *sub) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/models/%s%s%s", test_fixture(""), name, sub ? "/" : "", sub ? sub : "");
    return path;
}

typedef struct fixture {
    model m;
    lora l;
    model_batch b;
} fixture;

static void fixture_load(fixture *f, const char *name) {
    q_err err;
    TEST_OK(model_load(&f->m, model_path(name, NULL), 64, &err), &err);
    TEST_OK(lora_load_peft(&f->l, &f->m, model_path(name, "adapter"), &err), &err);
    TEST_OK(model_batch_load(&f->b, model_path(name, "batch.safetensors"), f->m.cfg.vocab, &err), &err);
}

static void fixture_free(fixture *f) {
    model_batch_free(&f->b);
    lora_free(&f->l);
    model_free(&f->m);
}

#ifdef QLORA_HAVE_CUDA

// Copies of every dA and dB of l, in module order (malloc'd; NULL-free).
static float *grads_copy(const lora *l, int64_t *n) {
    int64_t total = 0;
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) total += l->mods[i].r * (l->mods[i].in + l->mods[i].out);
    float *g = malloc((size_t)(total ? total : 1) * sizeof *g), *p = g;
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        const lora_module *a = &l->mods[i];
        if (!a->r) continue;
        memcpy(p, a->dA, (size_t)(a->r * a->in) * sizeof *p);
        p += a->r * a->in;
        memcpy(p, a->dB, (size_t)(a->r * a->out) * sizeof *p);
        p += a->r * a->out;
    }
    *n = total;
    return g;
}

// The worst normwise error over the gradient tensors of l against ref (as
// grads_copy lays them out).
static double grads_worst(const lora *l, const float *ref) {
    double worst = 0;
    const float *p = ref;
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        const lora_module *a = &l->mods[i];
        if (!a->r) continue;
        const double ea = test_rel_err(a->dA, p, a->r * a->in);
        p += a->r * a->in;
        const double eb = test_rel_err(a->dB, p, a->r * a->out);
        p += a->r * a->out;
        if (!(ea <= worst)) worst = ea;  // NaN sticks
        if (!(eb <= worst)) worst = eb;
    }
    return worst;
}



static void check_step(const char *name, ag_precision prec, float dropout, bool recompute, double loss_tol,
                       double grad_tol) {
    q_err err;
    fixture f;
    fixture_load(&f, name);
    f.l.cfg.dropout = dropout;
    model_step_opts o = {.checkpoint = recompute, .step = 3};
    model_step_result cpu, gpu;
    lora_zero_grad(&f.l);
    TEST_OK(model_step(&f.m, &f.l, &f.b, &o, &cpu, &err), &err);
    int64_t n;
    float *ref = grads_copy(&f.l, &n);

    model_cuda d;
    TEST_OK(model_cuda_upload(&d, &f.m, &f.l, prec, &err), &err);
    lora_zero_grad(&f.l);
    TEST_OK(model_cuda_step(&d, &f.l, &f.b, &o, &gpu, &err), &err);
    const double e_loss = fabs(gpu.loss - cpu.loss) / fabs(cpu.loss);
    const double e_grad = grads_worst(&f.l, ref);
    CU_ASSERT(e_loss < loss_tol);
    CU_ASSERT(e_grad < grad_tol);
    CU_ASSERT_EQUAL(gpu.n_valid, cpu.n_valid);
    printf("\n    %-10s %s dropout %.2f%s: loss %.7f vs CPU %.7f (rel %.1e), %lld grads worst rel %.1e ", name,
           ag_precision_name(prec), (double)dropout, recompute ? " recompute" : "", gpu.loss, cpu.loss, e_loss,
           (long long)n, e_grad);

    // a second step accumulates into the host gradients (+=), as gradient
    // accumulation over micro-batches needs
    TEST_OK(model_cuda_step(&d, &f.l, &f.b, &o, &gpu, &err), &err);
    for (int64_t i = 0; i < n; i++) ref[i] *= 2.0f;
    CU_ASSERT(grads_worst(&f.l, ref) < grad_tol);

    // evaluation: forward only, no dropout, same loss as the CPU's
    model_step_result fc, fg;
    TEST_OK(model_forward(&f.m, &f.l, &f.b, NULL, &fc, &err), &err);
    TEST_OK(model_cuda_forward(&d, &f.l, &f.b, &fg, &err), &err);
    CU_ASSERT(fabs(fg.loss - fc.loss) / fabs(fc.loss) < loss_tol);

    model_cuda_free(&d);
    free(ref);
    fixture_free(&f);
}

static void test_step_fp32(void) {
    if (!test_have_device("the GPU step was")) return;
    check_step("llama_gqa", AG_PRECISION_FP32, 0.0f, false, 1e-5, 1e-4);
    check_step("qwen2_bias", AG_PRECISION_FP32, 0.0f, false, 1e-5, 1e-4);
    check_step("llama_tied", AG_PRECISION_FP32, 0.0f, false, 1e-5, 1e-4);
}

static void test_step_dropout_recompute(void) {
    if (!test_have_device("the GPU step was")) return;
    check_step("llama_gqa", AG_PRECISION_FP32, 0.1f, false, 1e-5, 1e-4);
    check_step("llama_gqa", AG_PRECISION_FP32, 0.1f, true, 1e-5, 1e-4);
    check_step("qwen2_bias", AG_PRECISION_FP32, 0.05f, true, 1e-5, 1e-4);
}

static void test_step_reduced_precision(void) {
    if (!test_have_device("the GPU step was")) return;
    check_step("llama_gqa", AG_PRECISION_TF32, 0.0f, false, 2e-3, 2e-2);
    check_step("llama_tied", AG_PRECISION_BF16, 0.0f, false, 1e-2, 5e-2);
    check_step("qwen2_bias", AG_PRECISION_BF16, 0.1f, true, 1e-2, 5e-2);
}

// Device steps are deterministic: the same step twice gives the same bits
// (no atomics in any kernel; cuBLAS with one stream and fixed shapes).
static void test_step_deterministic(void) {
    if (!test_have_device("the GPU step was")) return;
    q_err err;
    fixture f;
    fixture_load(&f, "llama_gqa");
    model_cuda d;
    TEST_OK(model_cuda_upload(&d, &f.m, &f.l, AG_PRECISION_BF16, &err), &err);
    model_step_opts o = {.checkpoint = true};
    model_step_result r1, r2;
    int64_t n;
    lora_zero_grad(&f.l);
    TEST_OK(model_cuda_step(&d, &f.l, &f.b, &o, &r1, &err), &err);
    float *g1 = grads_copy(&f.l, &n);
    lora_zero_grad(&f.l);
    TEST_OK(model_cuda_step(&d, &f.l, &f.b, &o, &r2, &err), &err);
    float *g2 = grads_copy(&f.l, &n);
    CU_ASSERT_EQUAL(memcmp(&r1.loss, &r2.loss, sizeof r1.loss), 0);
    CU_ASSERT_EQUAL(memcmp(g1, g2, (size_t)n * sizeof *g1), 0);
    free(g1), free(g2);
    model_cuda_free(&d);
    fixture_free(&f);
}

#else
static void skip_no_cuda(void) { printf("\n    SKIPPED: built without CUDA; the GPU step was not compiled "); }
static void test_step_fp32(void) { skip_no_cuda(); }
static void test_step_dropout_recompute(void) { skip_no_cuda(); }
static void test_step_reduced_precision(void) { skip_no_cuda(); }
static void test_step_deterministic(void) { skip_no_cuda(); }
#endif

// Without a device (or without CUDA) the upload says why and leaves nothing
// behind; a batch whose documents are not contiguous runs is refused.
static void test_refusals(void) {
    q_err err;
    fixture f;
    fixture_load(&f, "llama_gqa");
    model_cuda d;
    if (!test_have_device("the GPU step was")) {
        CU_ASSERT_EQUAL(model_cuda_upload(&d, &f.m, &f.l, AG_PRECISION_FP32, &err), -1);
        const bool says = strstr(err.msg, "no CUDA device") || strstr(err.msg, "built without CUDA");
        if (!says) printf("\n    unexpected message: %s ", err.msg);
        CU_ASSERT(says);
        fixture_free(&f);
        return;
    }
    TEST_OK(model_cuda_upload(&d, &f.m, &f.l, AG_PRECISION_FP32, &err), &err);
    model_step_opts o = {0};
    model_step_result r;
    CU_ASSERT_FATAL(f.b.N >= 3);
    for (int64_t n = 0; n < f.b.N; n++) f.b.start[n] = 0;
    f.b.start[1] = 1;  // token 2 would belong to a document that started before token 1's
    CU_ASSERT_EQUAL(model_cuda_step(&d, &f.l, &f.b, &o, &r, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "contiguous"));
    model_cuda_free(&d);
    fixture_free(&f);
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("model_cuda", NULL, NULL);
    CU_add_test(s, "GPU step vs CPU step, fp32 GEMMs, three models", test_step_fp32);
    CU_add_test(s, "GPU step vs CPU step with LoRA dropout and recompute", test_step_dropout_recompute);
    CU_add_test(s, "GPU step vs CPU step, tf32 and bf16 GEMMs", test_step_reduced_precision);
    CU_add_test(s, "GPU steps are deterministic", test_step_deterministic);
    CU_add_test(s, "refusals: no device, non-contiguous documents", test_refusals);
    return test_main();
}
