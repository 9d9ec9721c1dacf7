// train/trainer.c: the training loop. One recipe in; a run folder out:
//
//   RUN/recipe.yaml          the resolved recipe
//   RUN/metrics.jsonl        one line per step and per evaluation
//   RUN/checkpoints/step-N.safetensors   optimizer state + data position (resumable)
//   RUN/adapter/             the trained adapter, PEFT format
//   RUN/loss.svg             train and validation loss curves
//   RUN/manifest.json        what was trained on what, and how it ended
//
// A step takes gradient_accumulation_steps micro-batches; every token's
// gradient is scaled by 1 / (target tokens of the whole step), so the
// result equals one big batch however it is split.
#define _GNU_SOURCE
#include "train.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "optim/optim.h"

// ----------------------------------------------------------------------------
// small helpers

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double rss_mb(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        fclose(f);
    }
    return (double)resident * (double)sysconf(_SC_PAGESIZE) / 1048576.0;
}

static double peak_rss_mb(void) {
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? (double)ru.ru_maxrss / 1024.0 : 0.0;
}

static void format_duration(double s, char *out, size_t size) {
    if (!isfinite(s) || s < 0) s = 0;
    const long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(out, size, "%ldh%02ldm", t / 3600, t / 60 % 60);
    else snprintf(out, size, "%ldm%02lds", t / 60, t % 60);
}

// The trained tensors as the optimizer sees them: A then B of every module.
static int64_t lora_params(const lora *l, optim_param *p) {
    int64_t n = 0;
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        lora_module *a = &l->mods[i];
        if (!a->r) continue;
        if (p) {
            p[n] = (optim_param){a->A16, a->A, a->dA, a->r * a->in};
            p[n + 1] = (optim_param){a->B16, a->B, a->dB, a->out * a->r};
        }
        n += 2;
    }
    return n;
}

// ----------------------------------------------------------------------------
// the run's state

typedef struct trainer {
    const recipe *r;
    model m;
    lora l;
    model_cuda dev;          // the model on the GPU when train.device is cuda
    bool cuda;
    tok_tokenizer *tok;
    data_set data;
    data_loader loader;
    optim_param *params;
    int64_t n_params;
    optim_adamw opt;
    optim_sched sched;
    int64_t step;            // updates done
    int64_t total_steps;
    int64_t tokens_seen;     // target tokens trained on
    FILE *metrics;
    // loss history for the picture
    double *train_loss, *val_loss;
    int64_t *val_step;
    int64_t n_val_points;
    int64_t *ids, *labels, *docs;  // [accum][B*T] the micro-batches of one step
} trainer;

static void trainer_free(trainer *t) {
    if (t->metrics) fclose(t->metrics);
    free(t->params);
    optim_adamw_free(&t->opt);
    data_loader_free(&t->loader);
    data_free(&t->data);
    if (t->tok) tok_free(t->tok);
    model_cuda_free(&t->dev);
    lora_free(&t->l);
    model_free(&t->m);
    free(t->train_loss), free(t->val_loss), free(t->val_step);
    free(t->ids), free(t->labels), free(t->docs);
}

static int path_join(char *out, size_t size, const char *a, const char *b, q_err *err) {
    if ((size_t)snprintf(out, size, "%s/%s", a, b) >= size) return q_err_set(err, "path too long: %s/%s", a, b);
    return 0;
}

// tokenizer: the recipe's, else tokenizer.json beside the model, else the GGUF's own
static int load_tokenizer(trainer *t, q_err *err) {
    const recipe *r = t->r;
    char path[4200];
    if (r->tokenizer_path[0]) return tok_load_json(&t->tok, r->tokenizer_path, err);
    const size_t len = strlen(r->model_path);
    if (len > 5 && strcmp(r->model_path + len - 5, ".gguf") == 0) {
        q_gguf g;
        if (q_gguf_open(&g, r->model_path, err)) return -1;
        int rc = tok_load_gguf(&t->tok, &g, err);
        q_gguf_close(&g);
        return rc;
    }
    if (path_join(path, sizeof path, r->model_path, "tokenizer.json", err)) return -1;
    if (!q_path_exists(path))
        return q_err_set(err, "no tokenizer: %s does not exist; set model.tokenizer in the recipe", path);
    return tok_load_json(&t->tok, path, err);
}

// ----------------------------------------------------------------------------
// memory plan: printed before training, and a refusal when it cannot fit

static int memory_plan(const trainer *t, q_err *err) {
    const model_config *c = &t->m.cfg;
    const recipe *r = t->r;
    double weights = (double)(c->vocab * c->hidden * (c->tie_embeddings ? 1 : 2) + c->hidden) * 4;
    for (int64_t i = 0; i < c->n_layers; i++) {
        weights += 2.0 * (double)c->hidden * 4;
        for (int id = 0; id < LIN_COUNT; id++) weights += (double)nf4_tensor_bytes(&t->m.layers[i].w[id]);
    }
    const double n_lora = (double)t->opt.n;
    const double adapters = n_lora * (2 + 4 + 4);  // fp16 weight, fp32 copy, fp32 gradient
    const double optimizer = n_lora * 12;          // master, m, v
    const double N = (double)(r->train_micro_batch_size * r->data_seq_len), D = (double)c->hidden;
    const double F = (double)c->intermediate, qkv = (double)((c->n_heads + 2 * c->n_kv_heads) * c->head_dim);
    // what one layer keeps for its backward, and the same again for gradients
    const double layer = 2 * 4 * N * (5 * D + 2 * qkv + (double)(c->n_heads * c->head_dim) + 3 * F);
    const double acts = r->train_recompute ? (double)c->n_layers * N * D * 4 + layer : (double)c->n_layers * layer;
    const double workspace = (double)model_max_linear_numel(c) * 4 + 256.0 * (double)c->vocab * 4 * 2;
    if (t->cuda) {
        // on the device: weights, A/B values and gradients (fp32), activations, the
        // dequantization workspace and the loss head's logits; the optimizer stays on the host
        char name[256];
        int64_t free_b, total_b;
        if (ag_cuda_device_info(name, sizeof name, &free_b, &total_b, err)) return -1;
        const double dev = weights + n_lora * 8 + acts + workspace;
        fprintf(stderr, "device plan: %s: weights %.0f MB, adapters %.1f MB, activations %.0f MB (%s), workspace %.0f "
                "MB; total %.0f MB of %.0f MB free (the host keeps the optimizer: %.1f MB)\n", name, weights / 1e6,
                n_lora * 8 / 1e6, acts / 1e6, r->train_recompute ? "recompute: all" : "no recompute", workspace / 1e6,
                dev / 1e6, (double)free_b / 1e6, (adapters + optimizer) / 1e6);
        if (dev > 0.9 * (double)free_b)
            return q_err_set(err, "the run needs about %.1f GB of GPU memory but %s has %.1f GB free: lower "
                             "train.micro_batch_size or data.seq_len, or set train.recompute: all", dev / 1e9, name,
                             (double)free_b / 1e9);
        return 0;
    }
    const double total = weights + adapters + optimizer + acts + workspace;
    const double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    fprintf(stderr,
            "memory plan: weights %.0f MB (NF4 + fp32 embeddings/norms), adapters %.1f MB, optimizer %.1f MB, "
            "activations %.0f MB (%s), workspace %.0f MB; total %.0f MB of %.0f MB RAM\n",
            weights / 1e6, adapters / 1e6, optimizer / 1e6, acts / 1e6,
            r->train_recompute ? "recompute: all" : "no recompute", workspace / 1e6, total / 1e6, ram / 1e6);
    if (total > 0.9 * ram)
        return q_err_set(err, "the run needs about %.1f GB but the machine has %.1f GB: lower train.micro_batch_size "
                         "or data.seq_len, or set train.recompute: all", total / 1e9, ram / 1e9);
    return 0;
}

// ----------------------------------------------------------------------------
// checkpoints: one safetensors file per kept step, written atomically

static int ckpt_dir(const trainer *t, char *out, size_t size, q_err *err) {
    return path_join(out, size, t->r->run_dir, "checkpoints", err);
}

static int ckpt_save(trainer *t, q_err *err) {
    char dir[4200], path[4300], meta_v[6][32];
    if (ckpt_dir(t, dir, sizeof dir, err) || q_mkdir_p(dir, err)) return -1;
    snprintf(path, sizeof path, "%s/step-%08lld.safetensors", dir, (long long)t->step);
    const int64_t n = t->opt.n;
    q_st_entry e[3] = {
        {.name = "master", .dtype = Q_DTYPE_F32, .ndim = 1, .shape = {n}, .data = t->opt.master},
        {.name = "adam_m", .dtype = Q_DTYPE_F32, .ndim = 1, .shape = {n}, .data = t->opt.m},
        {.name = "adam_v", .dtype = Q_DTYPE_F32, .ndim = 1, .shape = {n}, .data = t->opt.v},
    };
    const char *keys[6] = {"step", "adam_t", "epoch", "cursor", "tokens_seen", "seed"};
    const long long vals[6] = {t->step, t->opt.t, t->loader.epoch, t->loader.cursor, t->tokens_seen,
                               (long long)t->r->seed};
    const char *values[6];
    for (int i = 0; i < 6; i++) {
        snprintf(meta_v[i], sizeof meta_v[i], "%lld", vals[i]);
        values[i] = meta_v[i];
    }
    if (q_st_write(path, e, 3, keys, values, 6, err)) return -1;
    // keep the newest ckpt.keep files
    DIR *d = opendir(dir);
    if (!d) return 0;
    long long steps[4096];
    int count = 0;
    for (struct dirent *de; (de = readdir(d)) && count < 4096;) {
        long long s;
        char tail[8];
        if (sscanf(de->d_name, "step-%lld.safetenso%7s", &s, tail) == 2 && strcmp(tail, "rs") == 0)
            steps[count++] = s;
    }
    closedir(d);
    for (int i = 0; i < count; i++) {
        int newer = 0;
        for (int k = 0; k < count; k++) newer += steps[k] > steps[i];
        if (newer >= t->r->ckpt_keep) {
            snprintf(path, sizeof path, "%s/step-%08lld.safetensors", dir, steps[i]);
            unlink(path);
        }
    }
    return 0;
}

static int meta_int(const q_st_file *f, const char *key, long long *v, q_err *err) {
    const char *s = q_st_meta(f, key);
    char *end;
    if (!s) return q_err_set(err, "%s: checkpoint metadata lacks \"%s\"", f->path, key);
    *v = strtoll(s, &end, 10);
    if (*end) return q_err_set(err, "%s: checkpoint metadata \"%s\" is not an integer", f->path, key);
    return 0;
}

// Finds the newest checkpoint that loads; a torn or foreign file is skipped
// with a warning, never trusted. Returns 1 when none exists.
static int ckpt_restore(trainer *t, q_err *err) {
    char dir[4200], path[4300];
    if (ckpt_dir(t, dir, sizeof dir, err)) return -1;
    DIR *d = opendir(dir);
    if (!d) return 1;
    long long best[64];
    int count = 0;
    for (struct dirent *de; (de = readdir(d));) {
        long long s;
        char tail[8];
        if (sscanf(de->d_name, "step-%lld.safetenso%7s", &s, tail) == 2 && strcmp(tail, "rs") == 0 && count < 64)
            best[count++] = s;
    }
    closedir(d);
    while (count > 0) {
        int k = 0;
        for (int i = 1; i < count; i++)
            if (best[i] > best[k]) k = i;
        snprintf(path, sizeof path, "%s/step-%08lld.safetensors", dir, best[k]);
        best[k] = best[--count];
        q_st_file f;
        q_err e2;
        if (q_st_open(&f, path, &e2)) {
            fprintf(stderr, "warning: skipping unreadable checkpoint: %s\n", e2.msg);
            continue;
        }
        const q_st_tensor *ms = q_st_find(&f, "master"), *mm = q_st_find(&f, "adam_m"), *mv = q_st_find(&f, "adam_v");
        long long step = 0, adam_t = 0, epoch = 0, cursor = 0, tokens = 0, seed = 0;
        int rc = -1;
        if (!ms || !mm || !mv || ms->dtype != Q_DTYPE_F32 || ms->numel != t->opt.n || mm->numel != t->opt.n ||
            mv->numel != t->opt.n) {
            q_err_set(err, "%s: does not hold optimizer state for this adapter (%lld parameters)", path,
                      (long long)t->opt.n);
        } else if (!meta_int(&f, "step", &step, err) && !meta_int(&f, "adam_t", &adam_t, err) &&
                   !meta_int(&f, "epoch", &epoch, err) && !meta_int(&f, "cursor", &cursor, err) &&
                   !meta_int(&f, "tokens_seen", &tokens, err) && !meta_int(&f, "seed", &seed, err)) {
            if ((uint64_t)seed != t->r->seed) {
                q_err_set(err, "%s: written with seed %lld, the recipe says %llu", path, seed,
                          (unsigned long long)t->r->seed);
            } else {
                memcpy(t->opt.master, ms->data, (size_t)t->opt.n * 4);
                memcpy(t->opt.m, mm->data, (size_t)t->opt.n * 4);
                memcpy(t->opt.v, mv->data, (size_t)t->opt.n * 4);
                t->opt.t = adam_t;
                t->step = step;
                t->tokens_seen = tokens;
                data_loader_seek(&t->loader, epoch, cursor);
                // the adapter is the master rounded to fp16, as every update leaves it
                int64_t off = 0;
                for (int64_t i = 0; i < t->n_params; off += t->params[i].n, i++)
                    q_convert_from_f32(t->opt.master + off, t->params[i].w16, Q_DTYPE_F16, (size_t)t->params[i].n);
                lora_sync(&t->l);
                fprintf(stderr, "resumed from %s (step %lld)\n", path, step);
                rc = 0;
            }
        }
        q_st_close(&f);
        return rc;
    }
    return 1;
}

// ----------------------------------------------------------------------------
// evaluation, samples, the loss picture

static int evaluate(trainer *t, double *loss, q_err *err) {
    const recipe *r = t->r;
    *loss = NAN;
    if (!t->data.n_val) return 0;
    data_loader vl;
    const int64_t B = r->train_micro_batch_size, T = r->data_seq_len;
    if (data_loader_init(&vl, t->data.val, t->data.n_val, B, T, r->data_packing, 0, r->seed ^ 0xe7a1u, err))
        return -1;
    int64_t batches = data_loader_batches_per_epoch(&vl);
    if (r->eval_max_batches > 0 && batches > r->eval_max_batches) batches = r->eval_max_batches;
    double sum = 0;
    int64_t count = 0;
    int rc = 0;
    for (int64_t i = 0; i < batches && !rc; i++) {
        data_loader_next(&vl, t->ids, t->labels, t->docs);
        model_batch b;
        model_step_result res;
        rc = model_batch_init(&b, B, T, t->ids, t->labels, t->docs, t->m.cfg.vocab, err);
        if (!rc) rc = t->cuda ? model_cuda_forward(&t->dev, &t->l, &b, &res, err)
                              : model_forward(&t->m, &t->l, &b, NULL, &res, err);
        model_batch_free(&b);
        if (!rc) sum += res.loss_sum, count += res.n_valid;
    }
    data_loader_free(&vl);
    if (!rc && count) *loss = sum / (double)count;
    return rc;
}

// Generations for the first sample.count validation prompts: the prompt is
// the example's leading non-target tokens, the reference its targets.
static int print_samples(trainer *t, const char *when, q_err *err) {
    const recipe *r = t->r;
    const data_set *d = &t->data;
    const data_example *pool = d->n_val ? d->val : d->train;
    const int64_t n_pool = d->n_val ? d->n_val : d->n_train;
    int32_t stop = tok_token_id(t->tok, r->data_template == DATA_TEMPLATE_LLAMA3 ? "<|eot_id|>" : "<|im_end|>");
    if (r->data_template != DATA_TEMPLATE_CHATML && r->data_template != DATA_TEMPLATE_LLAMA3) stop = -1;
    if (stop < 0) stop = tok_eos_id(t->tok);
    for (int64_t s = 0; s < r->sample_count && s < n_pool; s++) {
        const data_example *ex = &pool[s];
        int64_t np = 0;
        while (np < ex->n && !ex->target[np]) np++;
        if (np == 0 || np == ex->n) continue;
        gen_opts o = {.max_new_tokens = r->sample_max_new_tokens, .temperature = 0, .top_p = 1,
                      .seed = r->seed, .stop_id = stop};
        int32_t *out = NULL;
        int64_t n_out = 0;
        char *prompt = NULL, *text = NULL;
        size_t len;
        int rc = gen_generate(&t->m, &t->l, ex->ids, np, &o, &out, &n_out, err);
        if (!rc) rc = tok_decode(t->tok, ex->ids, np, &prompt, &len, err);
        if (!rc) rc = tok_decode(t->tok, out, n_out, &text, &len, err);
        if (!rc) fprintf(stderr, "--- sample %lld, %s ---\n%s\033[1m%s\033[0m\n", (long long)s + 1, when, prompt, text);
        free(out), free(prompt), free(text);
        if (rc) return -1;
    }
    return 0;
}

// loss.svg: train loss per step (thin), validation loss at evaluations (dots)
static void write_loss_svg(const trainer *t) {
    char path[4200];
    q_err err;
    if (path_join(path, sizeof path, t->r->run_dir, "loss.svg", &err)) return;
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < t->step; i++)
        if (isfinite(t->train_loss[i])) lo = fmin(lo, t->train_loss[i]), hi = fmax(hi, t->train_loss[i]);
    for (int64_t i = 0; i < t->n_val_points; i++)
        if (isfinite(t->val_loss[i])) lo = fmin(lo, t->val_loss[i]), hi = fmax(hi, t->val_loss[i]);
    if (!isfinite(lo)) return;
    if (hi - lo < 1e-6) hi = lo + 1;
    const double W = 720, H = 410, x0 = 60, y0 = 30, pw = W - 80, ph = H - 80;
    const double xmax = t->total_steps > 1 ? (double)t->total_steps : 2;
#define SX(s) (x0 + pw * (double)(s) / xmax)
#define SY(v) (y0 + ph * (1 - ((v) - lo) / (hi - lo)))
    q_buf b = {0};
    q_buf_printf(&b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
                     "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    q_buf_printf(&b, "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#888\"/>\n", x0, y0,
                 pw, ph);
    for (int k = 0; k <= 4; k++) {
        const double v = lo + (hi - lo) * k / 4.0;
        q_buf_printf(&b, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.3f</text>\n", x0 - 5, SY(v) + 4, v);
        const double s = xmax * k / 4.0;
        q_buf_printf(&b, "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%.0f</text>\n", SX(s), y0 + ph + 16, s);
    }
    q_buf_printf(&b, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">step</text>\n", x0 + pw / 2, H - 12);
    q_buf_printf(&b, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.2\" points=\"");
    for (int64_t i = 0; i < t->step; i++)
        if (isfinite(t->train_loss[i])) q_buf_printf(&b, "%.1f,%.1f ", SX(i + 1), SY(t->train_loss[i]));
    q_buf_printf(&b, "\"/>\n");
    for (int64_t i = 0; i < t->n_val_points; i++)
        if (isfinite(t->val_loss[i]))
            q_buf_printf(&b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"#d62728\"/>\n", SX(t->val_step[i]),
                         SY(t->val_loss[i]));
    q_buf_printf(&b, "<text x=\"%.0f\" y=\"%.0f\" fill=\"#1f77b4\">train loss</text>"
                     "<text x=\"%.0f\" y=\"%.0f\" fill=\"#d62728\">validation loss</text>\n</svg>\n",
                 x0, y0 - 10, x0 + 90, y0 - 10);
#undef SX
#undef SY
    if (b.data) q_file_write_atomic(path, b.data, b.len, &err);
    q_buf_free(&b);
}

static void record_eval(trainer *t, double loss, double seconds) {
    t->val_loss[t->n_val_points] = loss;
    t->val_step[t->n_val_points++] = t->step;
    fprintf(stderr, "eval  step %lld | val loss %.4f | ppl %.2f | %.1fs\n", (long long)t->step, loss, exp(loss),
            seconds);
    if (t->metrics) {
        fprintf(t->metrics, "{\"step\": %lld, \"val_loss\": %.6f, \"val_ppl\": %.4f}\n", (long long)t->step, loss,
                exp(loss));
        fflush(t->metrics);
    }
    write_loss_svg(t);
}

// ----------------------------------------------------------------------------
// one update

static int train_step(trainer *t, double *loss, double *grad_norm, int64_t *tokens, q_err *err) {
    const recipe *r = t->r;
    const int64_t B = r->train_micro_batch_size, T = r->data_seq_len, accum = r->train_gradient_accumulation_steps;
    int64_t targets = 0;
    for (int64_t k = 0; k < accum; k++)
        targets += data_loader_next(&t->loader, t->ids + k * B * T, t->labels + k * B * T, t->docs + k * B * T);
    double loss_sum = 0;
    int64_t valid = 0;
    for (int64_t k = 0; k < accum; k++) {
        model_batch b;
        model_step_result res;
        model_step_opts o = {.checkpoint = r->train_recompute,
                             .grad_scale = targets ? 1.0f / (float)targets : 0.0f,
                             .step = (uint64_t)(t->step * accum + k)};
        if (model_batch_init(&b, B, T, t->ids + k * B * T, t->labels + k * B * T, t->docs + k * B * T,
                             t->m.cfg.vocab, err))
            return -1;
        int rc = t->cuda ? model_cuda_step(&t->dev, &t->l, &b, &o, &res, err)
                         : model_step(&t->m, &t->l, &b, &o, &res, err);
        model_batch_free(&b);
        if (rc) return q_err_wrap(err, "step %lld", (long long)t->step + 1);
        loss_sum += res.loss_sum;
        valid += res.n_valid;
    }
    *loss = valid ? loss_sum / (double)valid : NAN;
    *tokens = valid;
    *grad_norm = optim_grad_norm(t->params, t->n_params);
    if (!isfinite(*grad_norm))
        return q_err_set(err, "step %lld: the gradient norm is not finite; the adapter was not updated (the last "
                         "checkpoint is intact): lower optim.lr or check the data", (long long)t->step + 1);
    const double lr = optim_sched_lr(&t->sched, t->step);
    optim_adamw_step(&t->opt, t->params, t->n_params, lr, optim_clip_factor(*grad_norm, r->optim_max_grad_norm));
    lora_zero_grad(&t->l);
    t->step++;
    t->tokens_seen += valid;
    return 0;
}

// ----------------------------------------------------------------------------
// the run

static int write_manifest(const trainer *t, double val_before, double val_after, double seconds, q_err *err) {
    char path[4200];
    if (path_join(path, sizeof path, t->r->run_dir, "manifest.json", err)) return -1;
    q_buf b = {0};
    q_buf_printf(&b, "{\n  \"qlora_version\": \"%s\",\n  \"model\": ", QLORA_VERSION_STRING);
    q_buf_json_string(&b, t->r->model_path);
    q_buf_printf(&b, ",\n  \"quantization\": {\"base\": \"nf4\", \"double_quant\": true, \"block_size\": %lld, "
                     "\"prequantized\": %s},\n  \"data\": {\"path\": ",
                 (long long)t->r->quant_block_size, t->m.prequantized ? "true" : "false");
    q_buf_json_string(&b, t->r->data_path);
    q_buf_printf(&b, ", \"lines\": %lld, \"skipped\": %lld, \"truncated\": %lld, \"train_examples\": %lld, "
                     "\"val_examples\": %lld},\n  \"steps\": %lld,\n  \"target_tokens\": %lld,\n  \"seconds\": %.1f,\n"
                     "  \"val_loss_before\": %.6f,\n  \"val_loss_after\": %.6f,\n  \"gemm\": \"%s\"\n}\n",
                 (long long)t->data.n_lines, (long long)t->data.n_skipped, (long long)t->data.n_truncated,
                 (long long)t->data.n_train, (long long)t->data.n_val, (long long)t->step,
                 (long long)t->tokens_seen, seconds, isfinite(val_before) ? val_before : -1.0,
                 isfinite(val_after) ? val_after : -1.0, ag_gemm_backend());
    int rc = b.data ? q_file_write_atomic(path, b.data, b.len, err) : q_err_set(err, "out of memory");
    q_buf_free(&b);
    return rc;
}

static int setup(trainer *t, bool resume, q_err *err) {
    const recipe *r = t->r;
    char path[4200];
    ag_set_threads((int)r->train_threads);
    if (q_mkdir_p(r->run_dir, err)) return -1;
    if (ckpt_dir(t, path, sizeof path, err)) return -1;
    if (!resume && q_path_exists(path)) {
        DIR *d = opendir(path);
        int found = 0;
        for (struct dirent *de; d && (de = readdir(d));) found += strncmp(de->d_name, "step-", 5) == 0;
        if (d) closedir(d);
        if (found)
            return q_err_set(err, "%s already holds checkpoints: pass --resume to continue that run, or set run.dir "
                             "to a new folder", path);
    }
    // the resolved recipe, before anything long starts
    q_buf y = {0};
    if (recipe_write_yaml(r, &y) || path_join(path, sizeof path, r->run_dir, "recipe.yaml", err) ||
        q_file_write_atomic(path, y.data, y.len, err)) {
        q_buf_free(&y);
        return q_err_set(err, "could not write the resolved recipe into %s", r->run_dir);
    }
    q_buf_free(&y);

    double t0 = now_s();
    if (model_load(&t->m, r->model_path, r->quant_block_size, err)) return -1;
    fprintf(stderr, "model: %s (%lld layers, hidden %lld, vocab %lld) loaded in %.1fs\n", r->model_path,
            (long long)t->m.cfg.n_layers, (long long)t->m.cfg.hidden, (long long)t->m.cfg.vocab, now_s() - t0);
    if (load_tokenizer(t, err)) return -1;
    if (tok_vocab_size(t->tok) > t->m.cfg.vocab)
        return q_err_set(err, "the tokenizer has %lld tokens but the model only %lld", (long long)tok_vocab_size(t->tok),
                         (long long)t->m.cfg.vocab);
    data_config dc = {.path = r->data_path, .format = r->data_format, .template = r->data_template,
                      .prompt_field = r->data_prompt_field, .response_field = r->data_response_field,
                      .text_field = r->data_text_field,
                      .system_prompt = r->data_system_prompt[0] ? r->data_system_prompt : NULL,
                      .train_on_inputs = r->data_train_on_inputs, .skip_bad_lines = r->data_skip_bad_lines,
                      .seq_len = r->data_seq_len, .max_examples = r->data_max_examples, .val_fraction = r->eval_split,
                      .val_max = r->eval_max_examples, .seed = r->seed};
    t0 = now_s();
    if (data_load(&t->data, &dc, t->tok, err)) return -1;
    fprintf(stderr, "data: %s: %lld examples (%lld train, %lld validation), %lld tokens, %lld targets, %lld skipped, "
            "%lld truncated (%.1fs)\n", r->data_path, (long long)(t->data.n_train + t->data.n_val),
            (long long)t->data.n_train, (long long)t->data.n_val, (long long)t->data.n_tokens,
            (long long)t->data.n_target_tokens, (long long)t->data.n_skipped, (long long)t->data.n_truncated,
            now_s() - t0);
    if (!t->data.n_train) return q_err_set(err, "%s: no training examples", r->data_path);
    int32_t pad = tok_eos_id(t->tok);
    if (data_loader_init(&t->loader, t->data.train, t->data.n_train, r->train_micro_batch_size, r->data_seq_len,
                         r->data_packing, pad < 0 ? 0 : pad, r->seed, err))
        return -1;

    lora_config lc = {.r = r->lora_r, .alpha = (float)r->lora_alpha, .dropout = (float)r->lora_dropout,
                      .rslora = r->lora_rslora, .targets = r->lora_targets, .seed = r->seed};
    if (lora_init(&t->l, &t->m, &lc, err)) return -1;
    if (strcmp(r->train_device, "cuda") == 0) {
        ag_precision prec;
        if (ag_precision_parse(r->train_precision, &prec, err)) return -1;
        t0 = now_s();
        if (model_cuda_upload(&t->dev, &t->m, &t->l, prec, err)) return q_err_wrap(err, "train.device: cuda");
        t->cuda = true;
        fprintf(stderr, "device: cuda, %s GEMMs; %.0f MB of weights copied in %.1fs\n", ag_precision_name(prec),
                (double)t->dev.weight_bytes / 1e6, now_s() - t0);
    }
    t->n_params = lora_params(&t->l, NULL);
    t->params = malloc((size_t)t->n_params * sizeof *t->params);
    if (!t->params) return q_err_set(err, "out of memory");
    lora_params(&t->l, t->params);
    if (optim_adamw_init(&t->opt, t->params, t->n_params, r->optim_beta1, r->optim_beta2, r->optim_eps,
                         r->optim_weight_decay, err))
        return -1;

    const int64_t per_epoch = (data_loader_batches_per_epoch(&t->loader) + r->train_gradient_accumulation_steps - 1) /
                              r->train_gradient_accumulation_steps;
    t->total_steps = r->train_max_steps > 0 ? r->train_max_steps : r->train_epochs * (per_epoch ? per_epoch : 1);
    t->sched = (optim_sched){.lr = r->optim_lr, .total = t->total_steps, .final_frac = r->sched_final_lr_frac,
                             .warmup = r->sched_warmup_steps};
    if (r->sched_warmup_ratio > 0) t->sched.warmup = (int64_t)ceil(r->sched_warmup_ratio * (double)t->total_steps);
    if (optim_sched_from_name(r->sched_name, &t->sched.kind, err)) return -1;

    const int64_t BT = r->train_micro_batch_size * r->data_seq_len * r->train_gradient_accumulation_steps;
    t->ids = malloc((size_t)BT * 8), t->labels = malloc((size_t)BT * 8), t->docs = malloc((size_t)BT * 8);
    t->train_loss = malloc((size_t)(t->total_steps + 1) * sizeof(double));
    const int64_t max_evals = t->total_steps / (r->eval_every_n_steps > 0 ? r->eval_every_n_steps : 1) + 3;
    t->val_loss = malloc((size_t)max_evals * sizeof(double));
    t->val_step = malloc((size_t)max_evals * sizeof(int64_t));
    if (!t->ids || !t->labels || !t->docs || !t->train_loss || !t->val_loss || !t->val_step)
        return q_err_set(err, "out of memory");
    for (int64_t i = 0; i <= t->total_steps; i++) t->train_loss[i] = NAN;
    fprintf(stderr, "lora: r %lld, alpha %g, %lld trainable parameters; %lld steps (%lld per epoch) of %lld x %lld "
            "tokens x %lld accumulation; gemm %s\n", (long long)r->lora_r, r->lora_alpha, (long long)t->opt.n,
            (long long)t->total_steps, (long long)per_epoch, (long long)r->train_micro_batch_size,
            (long long)r->data_seq_len, (long long)r->train_gradient_accumulation_steps, ag_gemm_backend());
    if (memory_plan(t, err)) return -1;
    if (resume) {
        int rc = ckpt_restore(t, err);
        if (rc < 0) return -1;
        if (rc > 0) fprintf(stderr, "--resume: no checkpoint in %s yet, starting fresh\n", r->run_dir);
    }
    if (path_join(path, sizeof path, r->run_dir, "metrics.jsonl", err)) return -1;
    t->metrics = fopen(path, resume ? "a" : "w");
    if (!t->metrics) return q_err_set(err, "%s: cannot open for writing", path);
    return 0;
}

int train_run(const recipe *r, bool resume, int64_t stop_after, q_err *err) {
    trainer t;
    memset(&t, 0, sizeof t);
    t.r = r;
    int rc = -1;
    double val_before = NAN, val_after = NAN, loss = NAN;
    const double t_start = now_s();
    if (setup(&t, resume, err)) goto done;

    const bool fresh = t.step == 0;
    double e0 = now_s();
    if (evaluate(&t, &val_before, err)) goto done;
    if (t.data.n_val) record_eval(&t, val_before, now_s() - e0);
    if (fresh && print_samples(&t, "before training", err)) goto done;

    const double t_loop = now_s();
    const int64_t first = t.step;
    const int64_t stop = stop_after > 0 && stop_after < t.total_steps ? stop_after : t.total_steps;
    while (t.step < stop) {
        double gnorm = 0;
        int64_t tokens = 0;
        if (train_step(&t, &loss, &gnorm, &tokens, err)) goto done;
        t.train_loss[t.step - 1] = loss;
        const double el = now_s() - t_loop, per_step = el / (double)(t.step - first);
        const double tps = (double)(t.step - first) * (double)(r->train_micro_batch_size * r->data_seq_len *
                                                                r->train_gradient_accumulation_steps) / el;
        const double lr = optim_sched_lr(&t.sched, t.step - 1);
        fprintf(t.metrics, "{\"step\": %lld, \"loss\": %.17g, \"lr\": %.6g, \"grad_norm\": %.6f, \"tokens\": %lld, "
                "\"tokens_per_s\": %.1f, \"elapsed_s\": %.2f}\n", (long long)t.step, loss, lr, gnorm,
                (long long)tokens, tps, el);
        fflush(t.metrics);
        if (t.step % (r->train_log_every > 0 ? r->train_log_every : 1) == 0 || t.step == t.total_steps) {
            char eta[32];
            format_duration(per_step * (double)(t.total_steps - t.step), eta, sizeof eta);
            fprintf(stderr, "step %lld/%lld | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | ETA %s | mem %.0f MB, peak %.0f MB\n",
                    (long long)t.step, (long long)t.total_steps, loss, lr, gnorm, tps, eta, rss_mb(), peak_rss_mb());
        }
        if (r->eval_every_n_steps > 0 && t.step % r->eval_every_n_steps == 0 && t.step < t.total_steps &&
            t.data.n_val) {
            e0 = now_s();
            double vl;
            if (evaluate(&t, &vl, err)) goto done;
            record_eval(&t, vl, now_s() - e0);
        }
        if (r->ckpt_every_n_steps > 0 && t.step % r->ckpt_every_n_steps == 0 && ckpt_save(&t, err)) goto done;
    }
    if (t.step > first && ckpt_save(&t, err)) goto done;
    if (t.step < t.total_steps) {  // paused by --stop-after: the checkpoint is the result
        fprintf(stderr, "stopped after step %lld of %lld; continue with --resume\n", (long long)t.step,
                (long long)t.total_steps);
        rc = 0;
        goto done;
    }
    e0 = now_s();
    if (evaluate(&t, &val_after, err)) goto done;
    if (t.data.n_val) record_eval(&t, val_after, now_s() - e0);
    if (print_samples(&t, "after training", err)) goto done;
    char path[4200];
    if (path_join(path, sizeof path, r->run_dir, "adapter", err) || lora_save_peft(&t.l, path, r->model_path, err))
        goto done;
    write_loss_svg(&t);
    if (write_manifest(&t, val_before, val_after, now_s() - t_start, err)) goto done;
    fprintf(stderr, "done: %lld steps in %.1fs; validation loss %.4f -> %.4f; adapter in %s, curves in %s/loss.svg\n",
            (long long)t.step, now_s() - t_start, val_before, val_after, path, r->run_dir);
    rc = 0;
done:
    trainer_free(&t);
    return rc;
}
