// bench/bench_step_cuda.c: one training step (forward + backward, LoRA r16
// on every linear, NF4 + double-quant base) on the GPU beside the same step
// on the CPU, in one run, on random models of Llama shapes built in memory
// (no download: the GPU machine reaches no network). Prints one JSON line
// per (model, device, precision): tokens/s, the GPU/CPU speed ratio, the
// device's weight bytes and the tape's activation peak, and the loss (the
// same model and batch on every line, so losses must agree).
//
//   bench_step_cuda [--cpu-steps N] [--gpu-steps N]
//
// Exits 0 with a notice when there is no GPU.
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "train/train.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float uniform(void) {  // [-1, 1)
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)(rng >> 40) / 8388608.0f - 1.0f;
}

static float *filled(int64_t n, float scale, float base) {
    float *x = malloc((size_t)n * sizeof *x);
    for (int64_t i = 0; i < n && x; i++) x[i] = base + scale * uniform();
    return x;
}

// A Llama-architecture model with random bf16 weights, tied embeddings.
static int model_random(model *m, int64_t V, int64_t D, int64_t F, int64_t L, int64_t H, int64_t Hkv, q_err *err) {
    memset(m, 0, sizeof *m);
    model_config *c = &m->cfg;
    *c = (model_config){.arch = MODEL_ARCH_LLAMA, .vocab = V, .hidden = D, .intermediate = F, .n_layers = L,
                        .n_heads = H, .n_kv_heads = Hkv, .head_dim = D / H, .max_position = 8192,
                        .rms_eps = 1e-5f, .rope_theta = 500000.0, .tie_embeddings = true, .dtype = Q_DTYPE_BF16};
    m->embed = filled(V * D, 0.03f, 0.0f);
    m->lm_head = m->embed;
    m->final_norm = filled(D, 0.0f, 1.0f);
    m->inv_freq = malloc((size_t)(c->head_dim / 2) * sizeof(float));
    m->layers = calloc((size_t)L, sizeof *m->layers);
    if (!m->embed || !m->final_norm || !m->inv_freq || !m->layers) return q_err_set(err, "out of memory");
    ag_rope_inv_freq(m->inv_freq, c->head_dim, c->rope_theta, NULL);
    uint16_t *w16 = malloc((size_t)model_max_linear_numel(c) * sizeof *w16);
    if (!w16) return q_err_set(err, "out of memory");
    for (int64_t i = 0; i < L; i++) {
        model_layer *ly = &m->layers[i];
        ly->attn_norm = filled(D, 0.1f, 1.0f);
        ly->mlp_norm = filled(D, 0.1f, 1.0f);
        for (int id = 0; id < LIN_COUNT; id++) {
            int64_t shape[2];
            model_linear_shape(c, (model_linear_id)id, &shape[0], &shape[1]);
            const float sd = 1.0f / sqrtf((float)shape[1]);
            for (int64_t k = 0; k < shape[0] * shape[1]; k++) w16[k] = q_f32_to_bf16(sd * uniform());
            if (nf4_tensor_quantize(&ly->w[id], w16, Q_DTYPE_BF16, 2, shape, NF4_QTYPE_NF4, 64, true, err)) {
                free(w16);
                return -1;
            }
        }
    }
    free(w16);
    return 0;
}

typedef struct shape {
    const char *name;
    int64_t V, D, F, L, H, Hkv, B, T;
    bool cpu;  // small enough to time on the CPU too
} shape;

static void print_line(const shape *s, const char *device, const char *prec, double tok_s, double ratio,
                       const model_step_result *r, const model_cuda *d) {
    char vs[32] = "null";
    if (ratio > 0) snprintf(vs, sizeof vs, "%.2f", ratio);
    printf("{\"model\": \"%s\", \"tokens\": %lld, \"device\": \"%s\", \"precision\": \"%s\", \"tokens_per_s\": %.1f, "
           "\"vs_cpu\": %s, \"weights_mb\": %.1f, \"activation_peak_mb\": %.1f, \"loss\": %.6f}\n",
           s->name, (long long)(s->B * s->T), device, prec, tok_s, vs, d ? (double)d->weight_bytes / 1048576.0 : 0.0,
           (double)r->peak_bytes / 1048576.0, r->loss);
}

static int run_shape(const shape *s, int cpu_steps, int gpu_steps, q_err *err) {
    model m;
    lora l;
    model_batch b;
    memset(&l, 0, sizeof l);
    memset(&b, 0, sizeof b);
    int rc = -1;
    if (model_random(&m, s->V, s->D, s->F, s->L, s->H, s->Hkv, err)) goto done;
    const lora_config lc = {.r = 16, .alpha = 32.0f, .targets = (1u << LIN_COUNT) - 1, .seed = 1};
    if (lora_init(&l, &m, &lc, err)) goto done;
    for (int64_t i = 0; i < l.n_layers * LIN_COUNT; i++)  // non-zero B, so every gradient path carries signal
        for (int64_t k = 0; k < l.mods[i].out * l.mods[i].r; k++) l.mods[i].B[k] = 0.01f * uniform();
    const int64_t N = s->B * s->T;
    int64_t *ids = malloc((size_t)N * sizeof *ids);
    for (int64_t i = 0; i < N; i++) ids[i] = (int64_t)((uniform() + 1.0f) * 0.5f * (float)(s->V - 1));
    rc = model_batch_init(&b, s->B, s->T, ids, ids, NULL, s->V, err);
    free(ids);
    if (rc) goto done;
    rc = -1;

    model_step_opts o = {.checkpoint = true};
    model_step_result r;
    double cpu_tok_s = 0;
    if (s->cpu && cpu_steps > 0) {
        double t0 = now_s();
        for (int i = 0; i < cpu_steps; i++) {
            lora_zero_grad(&l);
            if (model_step(&m, &l, &b, &o, &r, err)) goto done;
        }
        cpu_tok_s = (double)N * cpu_steps / (now_s() - t0);
        print_line(s, "cpu", ag_gemm_backend(), cpu_tok_s, 0, &r, NULL);
        fflush(stdout);
    }
    const ag_precision precs[] = {AG_PRECISION_FP32, AG_PRECISION_TF32, AG_PRECISION_BF16};
    for (size_t p = 0; p < sizeof precs / sizeof precs[0]; p++) {
        model_cuda d;
        if (model_cuda_upload(&d, &m, &l, precs[p], err)) goto done;
        lora_zero_grad(&l);
        int ok = model_cuda_step(&d, &l, &b, &o, &r, err) == 0;  // warm-up: pools, cuBLAS heuristics
        const double t0 = now_s();
        for (int i = 0; ok && i < gpu_steps; i++) {
            lora_zero_grad(&l);
            ok = model_cuda_step(&d, &l, &b, &o, &r, err) == 0;
        }
        const double tok_s = (double)N * gpu_steps / (now_s() - t0);
        if (ok) print_line(s, "cuda", ag_precision_name(precs[p]), tok_s, cpu_tok_s > 0 ? tok_s / cpu_tok_s : 0, &r, &d);
        model_cuda_free(&d);
        fflush(stdout);
        if (!ok) goto done;
    }
    rc = 0;
done:
    model_batch_free(&b);
    lora_free(&l);
    model_free(&m);
    return rc;
}

int main(int argc, char **argv) {
    int cpu_steps = 1, gpu_steps = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--cpu-steps") == 0) cpu_steps = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--gpu-steps") == 0) gpu_steps = atoi(argv[i + 1]);
    }
    ag_threads_init();
    if (!ag_cuda_available()) {
        printf("bench_step_cuda: no CUDA device, skipped\n");
        return 0;
    }
    const shape shapes[] = {
        // SmolLM2-135M's shape, 1 x 512 tokens: the CPU benchmark's (bench/bench_step.py)
        {"smollm2-135m-shape", 49152, 576, 1536, 30, 9, 3, 1, 512, true},
        // Llama-3.2-1B's shape, 2 x 2048 tokens: GPU only
        {"llama-3.2-1b-shape", 128256, 2048, 8192, 16, 32, 8, 2, 2048, false},
    };
    q_err err;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        if (run_shape(&shapes[i], cpu_steps, gpu_steps, &err)) {
            fprintf(stderr, "bench_step_cuda: %s: %s\n", shapes[i].name, err.msg);
            return 1;
        }
    return 0;
}
