// train/cmd_step.c: `qlora step`, one forward and backward on a given batch,
// for users who want to check qlora against their own PyTorch + PEFT run.
//
//   qlora step MODEL_DIR --batch BATCH.safetensors --out OUT.safetensors
//              [--adapter PEFT_DIR | --lora-r R] [--checkpoint] [--logits] [--repeat N]
//              [--device cpu|cuda] [--precision fp32|tf32|bf16|fp16]
//
// BATCH holds input_ids [B,T], optional labels [B,T] (HF convention:
// unshifted, -100 masked; default = input_ids) and optional doc_ids [B,T]
// (packed documents). OUT gets `loss` [1] and every LoRA gradient under its
// PEFT name; with --logits also `logits` [B,T,V].
#define _GNU_SOURCE
#include "train.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

static int write_result(const char *path, const lora *l, double loss, const float *logits, const model_batch *b,
                        int64_t V, q_err *err) {
    const int64_t n_max = 2 + 2 * l->n_layers * LIN_COUNT;
    q_st_entry *e = calloc((size_t)n_max, sizeof *e);
    char (*names)[256] = calloc((size_t)n_max, sizeof *names);
    if (!e || !names) {
        free(e), free(names);
        return q_err_set(err, "out of memory");
    }
    float loss32 = (float)loss;
    size_t n = 0;
    e[n++] = (q_st_entry){.name = "loss", .dtype = Q_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &loss32};
    if (logits)
        e[n++] = (q_st_entry){.name = "logits", .dtype = Q_DTYPE_F32, .ndim = 3, .shape = {b->B, b->T, V},
                              .data = logits};
    for (int64_t i = 0; i < l->n_layers; i++)
        for (int id = 0; id < LIN_COUNT; id++) {
            const lora_module *a = lora_mod(l, i, (model_linear_id)id);
            if (!a->r) continue;
            lora_peft_name(names[n], sizeof names[n], i, (model_linear_id)id, 'A');
            e[n] = (q_st_entry){.name = names[n], .dtype = Q_DTYPE_F32, .ndim = 2, .shape = {a->r, a->in},
                                .data = a->dA};
            n++;
            lora_peft_name(names[n], sizeof names[n], i, (model_linear_id)id, 'B');
            e[n] = (q_st_entry){.name = names[n], .dtype = Q_DTYPE_F32, .ndim = 2, .shape = {a->out, a->r},
                                .data = a->dB};
            n++;
        }
    const char *mk[] = {"format"}, *mv[] = {"pt"};
    int rc = q_st_write(path, e, n, mk, mv, 1, err);
    free(e), free(names);
    return rc;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int usage(void) {
    fprintf(stderr,
            "usage: qlora step MODEL_DIR --batch BATCH.safetensors --out OUT.safetensors\n"
            "                  [--adapter PEFT_DIR | --lora-r R] [--checkpoint] [--logits] [--repeat N]\n"
            "                  [--blocksize 64] [--device cpu|cuda] [--precision fp32|tf32|bf16|fp16]\n"
            "One forward + backward. MODEL_DIR: HF safetensors folder (quantized to NF4 + double quant at load)\n"
            "or bnb-4bit checkpoint. BATCH: input_ids [B,T], optional labels (HF convention, -100 masked) and\n"
            "doc_ids (packed documents). OUT: loss and every LoRA gradient under its PEFT name.\n"
            "Without --adapter a fresh all-linear adapter of rank R (default 16) is made, as PEFT inits it.\n"
            "--repeat N times N steps and prints tokens/s and peak memory.\n"
            "--device cuda runs the step on the GPU (the base and LM-head GEMMs in --precision, default bf16;\n"
            "fp32 is the reference that matches the CPU to ~1e-6). --logits needs the CPU.\n");
    return 2;
}

int cmd_step(int argc, char **argv) {
    const char *model_dir = NULL, *batch_path = NULL, *out_path = NULL, *adapter = NULL;
    int64_t lora_r = 16, repeat = 0, blocksize = NF4_DEFAULT_BLOCKSIZE;
    bool checkpoint = false, want_logits = false, cuda = false;
    ag_precision precision = AG_PRECISION_BF16;
    q_err err;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const bool has = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return usage(), 0;
        else if (strcmp(a, "--batch") == 0 && has) batch_path = argv[++i];
        else if (strcmp(a, "--out") == 0 && has) out_path = argv[++i];
        else if (strcmp(a, "--adapter") == 0 && has) adapter = argv[++i];
        else if (strcmp(a, "--lora-r") == 0 && has) lora_r = atoll(argv[++i]);
        else if (strcmp(a, "--repeat") == 0 && has) repeat = atoll(argv[++i]);
        else if (strcmp(a, "--blocksize") == 0 && has) blocksize = atoll(argv[++i]);
        else if (strcmp(a, "--checkpoint") == 0) checkpoint = true;
        else if (strcmp(a, "--logits") == 0) want_logits = true;
        else if (strcmp(a, "--device") == 0 && has && (!strcmp(argv[i + 1], "cpu") || !strcmp(argv[i + 1], "cuda")))
            cuda = strcmp(argv[++i], "cuda") == 0;
        else if (strcmp(a, "--precision") == 0 && has) {
            if (ag_precision_parse(argv[++i], &precision, &err)) {
                fprintf(stderr, "error: qlora step: %s\n", err.msg);
                return 2;
            }
        }
        else if (a[0] != '-' && !model_dir) model_dir = a;
        else {
            fprintf(stderr, "error: qlora step: unexpected argument '%s'\n", a);
            return usage();
        }
    }
    if (!model_dir || !batch_path || (!out_path && !repeat)) return usage();
    if (cuda && want_logits) {
        fprintf(stderr, "error: qlora step: --logits is computed on the CPU only; drop --device cuda\n");
        return 2;
    }

    model m;
    model_cuda dev;
    memset(&dev, 0, sizeof dev);
    lora l;
    model_batch b;
    memset(&b, 0, sizeof b);
    memset(&l, 0, sizeof l);
    float *logits = NULL;
    int status = 1;
    double t0 = now_s();
    if (model_load(&m, model_dir, blocksize, &err)) goto fail_model;
    const double t_load = now_s() - t0;
    if (adapter) {
        if (lora_load_peft(&l, &m, adapter, &err)) goto fail;
    } else {
        lora_config c = {.r = lora_r, .alpha = 2.0f * (float)lora_r, .targets = (1u << LIN_COUNT) - 1, .seed = 0};
        if (lora_init(&l, &m, &c, &err)) goto fail;
    }
    if (model_batch_load(&b, batch_path, m.cfg.vocab, &err)) goto fail;
    if (cuda && model_cuda_upload(&dev, &m, &l, precision, &err)) goto fail;

    model_step_opts o = {.checkpoint = checkpoint};
    model_step_result r;
#define STEP() (cuda ? model_cuda_step(&dev, &l, &b, &o, &r, &err) : model_step(&m, &l, &b, &o, &r, &err))
    if (repeat > 0) {
        // warm-up step, then the timed ones (a device step returns after its stream has finished)
        if (STEP()) goto fail;
        t0 = now_s();
        for (int64_t i = 0; i < repeat; i++) {
            lora_zero_grad(&l);
            if (STEP()) goto fail;
        }
        const double dt = (now_s() - t0) / (double)repeat;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        printf("{\"tokens\": %lld, \"step_s\": %.6f, \"tokens_per_s\": %.1f, \"peak_rss_mb\": %.1f, "
               "\"activation_peak_mb\": %.1f, \"load_s\": %.3f, \"loss\": %.6f, \"gemm\": \"%s\", "
               "\"checkpoint\": %s, \"device\": \"%s\"}\n",
               (long long)b.N, dt, (double)b.N / dt, (double)ru.ru_maxrss / 1024.0, (double)r.peak_bytes / 1048576.0,
               t_load, r.loss, cuda ? ag_precision_name(precision) : ag_gemm_backend(), checkpoint ? "true" : "false",
               cuda ? "cuda" : "cpu");
    }
    lora_zero_grad(&l);
    if (STEP()) goto fail;
#undef STEP
    if (want_logits) {
        logits = malloc((size_t)(b.N * m.cfg.vocab) * sizeof *logits);
        model_step_result rf;
        if (!logits) {
            q_err_set(&err, "out of memory for logits");
            goto fail;
        }
        if (model_forward(&m, &l, &b, logits, &rf, &err)) goto fail;
    }
    if (out_path) {
        if (write_result(out_path, &l, r.loss, logits, &b, m.cfg.vocab, &err)) goto fail;
        fprintf(stderr, "loss %.6f over %lld target tokens; gradients written to %s\n", r.loss, (long long)r.n_valid,
                out_path);
    }
    status = 0;
fail:
    model_cuda_free(&dev);
    free(logits);
    model_batch_free(&b);
    lora_free(&l);
    model_free(&m);
fail_model:
    if (status) fprintf(stderr, "error: %s\n", err.msg);
    return status;
}
