// train/lora.c: LoRA adapters. Weights are kept in fp16 (what is trained
// and saved), with fp32 copies the CPU computes with and fp32 gradients.
// Reads PEFT adapter folders (formats.md section 7).
#define _GNU_SOURCE
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

// ----------------------------------------------------------------------------
// target modules

int lora_targets_parse(const char *name, uint32_t *bits, q_err *err) {
    // PEFT matches by suffix and writes "all-linear" out as full module paths
    // ("model.layers.0.self_attn.q_proj"): the last component names the module
    const char *dot = strrchr(name, '.');
    if (dot && strncmp(name, "model.", 6) == 0) name = dot + 1;
    if (strcmp(name, "all-linear") == 0 || strcmp(name, "all") == 0) {
        *bits |= (1u << LIN_COUNT) - 1;
        return 0;
    }
    static const char *const short_names[LIN_COUNT] = {"q", "k", "v", "o", "gate", "up", "down"};
    for (int i = 0; i < LIN_COUNT; i++)
        if (strcmp(name, model_linear_names[i]) == 0 || strcmp(name, short_names[i]) == 0) {
            *bits |= 1u << i;
            return 0;
        }
    return q_err_set(err, "unknown LoRA target module \"%s\" (use q_proj, k_proj, v_proj, o_proj, gate_proj, "
                     "up_proj, down_proj, their short names q, k, v, o, gate, up, down, or all-linear)", name);
}

void lora_peft_name(char *out, size_t size, int64_t layer, model_linear_id id, char which) {
    snprintf(out, size, "base_model.model.model.layers.%lld.%s.%s.lora_%c.weight", (long long)layer,
             model_linear_parents[id], model_linear_names[id], which);
}

// ----------------------------------------------------------------------------
// allocation and init

static int lora_alloc(lora *l, const model *m, const lora_config *c, q_err *err) {
    memset(l, 0, sizeof *l);
    if (c->r <= 0 || c->r > 4096) return q_err_set(err, "LoRA rank r must be in [1, 4096], got %lld", (long long)c->r);
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f))
        return q_err_set(err, "LoRA dropout must be in [0, 1), got %g", c->dropout);
    if (!c->targets) return q_err_set(err, "LoRA: no target modules");
    l->cfg = *c;
    l->scale = c->rslora ? c->alpha / sqrtf((float)c->r) : c->alpha / (float)c->r;
    l->n_layers = m->cfg.n_layers;
    l->mods = calloc((size_t)(l->n_layers * LIN_COUNT), sizeof *l->mods);
    if (!l->mods) return q_err_set(err, "LoRA: out of memory");
    for (int64_t i = 0; i < l->n_layers; i++)
        for (int id = 0; id < LIN_COUNT; id++) {
            if (!(c->targets & (1u << id))) continue;
            lora_module *a = lora_mod(l, i, (model_linear_id)id);
            a->r = c->r;
            model_linear_shape(&m->cfg, (model_linear_id)id, &a->out, &a->in);
            const size_t na = (size_t)(a->r * a->in), nb = (size_t)(a->out * a->r);
            a->A16 = calloc(na, 2), a->B16 = calloc(nb, 2);
            a->A = calloc(na, 4), a->B = calloc(nb, 4), a->dA = calloc(na, 4), a->dB = calloc(nb, 4);
            if (!a->A16 || !a->B16 || !a->A || !a->B || !a->dA || !a->dB) {
                lora_free(l);
                return q_err_set(err, "LoRA: out of memory");
            }
        }
    return 0;
}

void lora_sync(lora *l) {
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        lora_module *a = &l->mods[i];
        if (!a->r) continue;
        q_convert_to_f32(a->A16, Q_DTYPE_F16, a->A, (size_t)(a->r * a->in));
        q_convert_to_f32(a->B16, Q_DTYPE_F16, a->B, (size_t)(a->out * a->r));
    }
}

void lora_zero_grad(lora *l) {
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        lora_module *a = &l->mods[i];
        if (!a->r) continue;
        memset(a->dA, 0, (size_t)(a->r * a->in) * sizeof(float));
        memset(a->dB, 0, (size_t)(a->out * a->r) * sizeof(float));
    }
}

int lora_init(lora *l, const model *m, const lora_config *c, q_err *err) {
    if (lora_alloc(l, m, c, err)) return -1;
    // kaiming_uniform_(A, a=sqrt(5)) on an [r, in] weight is U(-1/sqrt(in), 1/sqrt(in)); B starts at zero,
    // so the adapted model equals the base model at step 0
    uint64_t counter = 0;
    for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
        lora_module *a = &l->mods[i];
        if (!a->r) continue;
        const float bound = 1.0f / sqrtf((float)a->in);
        for (int64_t k = 0; k < a->r * a->in; k++)
            a->A16[k] = q_f32_to_f16(bound * (2.0f * ag_rng_uniform(c->seed, counter++) - 1.0f));
    }
    lora_sync(l);
    return 0;
}

void lora_free(lora *l) {
    if (l->mods)
        for (int64_t i = 0; i < l->n_layers * LIN_COUNT; i++) {
            lora_module *a = &l->mods[i];
            free(a->A16), free(a->B16), free(a->A), free(a->B), free(a->dA), free(a->dB);
        }
    free(l->mods);
    memset(l, 0, sizeof *l);
}

// ----------------------------------------------------------------------------
// PEFT folders

// adapter_config.json -> lora_config. Options qlora does not implement are
// refused rather than silently ignored.
static int peft_config(lora_config *c, const char *text, size_t len, const char *path, q_err *err) {
    q_json *j;
    if (q_json_parse(text, len, &j, err)) return q_err_wrap(err, "%s", path);
    int rc = -1;
    memset(c, 0, sizeof *c);
    c->r = 8;
    c->alpha = 8;
    const q_json *v;
    if ((v = q_json_get(j, "peft_type")) && (v->type != Q_JSON_STRING || strcmp(v->string, "LORA") != 0)) {
        q_err_set(err, "%s: peft_type must be \"LORA\"", path);
        goto done;
    }
    if ((v = q_json_get(j, "r")) && v->type == Q_JSON_NUMBER) c->r = (int64_t)v->number;
    if ((v = q_json_get(j, "lora_alpha")) && v->type == Q_JSON_NUMBER) c->alpha = (float)v->number;
    if ((v = q_json_get(j, "lora_dropout")) && v->type == Q_JSON_NUMBER) c->dropout = (float)v->number;
    if ((v = q_json_get(j, "use_rslora")) && v->type == Q_JSON_BOOL) c->rslora = v->boolean;
    static const char *const unsupported_true[] = {"use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"};
    for (size_t i = 0; i < sizeof unsupported_true / sizeof *unsupported_true; i++)
        if ((v = q_json_get(j, unsupported_true[i])) && v->type == Q_JSON_BOOL && v->boolean) {
            q_err_set(err, "%s: %s is not supported by qlora", path, unsupported_true[i]);
            goto done;
        }
    static const char *const unsupported_set[] = {"rank_pattern", "alpha_pattern", "layers_to_transform",
                                                  "modules_to_save", "layer_replication"};
    for (size_t i = 0; i < sizeof unsupported_set / sizeof *unsupported_set; i++)
        if ((v = q_json_get(j, unsupported_set[i])) && v->type != Q_JSON_NULL &&
            !((v->type == Q_JSON_OBJECT || v->type == Q_JSON_ARRAY) && v->count == 0)) {
            q_err_set(err, "%s: %s is not supported by qlora", path, unsupported_set[i]);
            goto done;
        }
    if ((v = q_json_get(j, "bias")) && v->type == Q_JSON_STRING && strcmp(v->string, "none") != 0) {
        q_err_set(err, "%s: bias \"%s\" is not supported (only \"none\")", path, v->string);
        goto done;
    }
    v = q_json_get(j, "target_modules");
    if (v && v->type == Q_JSON_STRING) {
        if (lora_targets_parse(v->string, &c->targets, err)) goto wrap;
    } else if (v && v->type == Q_JSON_ARRAY) {
        for (size_t i = 0; i < v->count; i++) {
            if (v->items[i].type != Q_JSON_STRING) {
                q_err_set(err, "%s: target_modules must hold strings", path);
                goto done;
            }
            if (lora_targets_parse(v->items[i].string, &c->targets, err)) goto wrap;
        }
    } else {
        c->targets = (1u << LIN_Q) | (1u << LIN_V);  // PEFT's default for Llama
    }
    rc = 0;
    goto done;
wrap:
    q_err_wrap(err, "%s", path);
done:
    q_json_free(j);
    return rc;
}

static int load_matrix(const q_st_file *f, const char *name, int64_t d0, int64_t d1, uint16_t *dst, q_err *err) {
    const q_st_tensor *t = q_st_find(f, name);
    if (!t) return q_err_set(err, "%s: missing %s", f->path, name);
    if (!q_dtype_is_float(t->dtype) || t->ndim != 2 || t->shape[0] != d0 || t->shape[1] != d1)
        return q_err_set(err, "%s: %s must be a float tensor of shape [%lld, %lld]", f->path, name, (long long)d0,
                         (long long)d1);
    float *tmp = malloc((size_t)(d0 * d1) * sizeof *tmp);
    if (!tmp) return q_err_set(err, "out of memory");
    q_convert_to_f32(t->data, t->dtype, tmp, (size_t)(d0 * d1));
    int rc = 0;
    for (int64_t i = 0; i < d0 * d1 && !rc; i++)
        if (!isfinite(tmp[i]) || fabsf(tmp[i]) > 65504.0f)
            rc = q_err_set(err, "%s: %s element %lld (%g) is not finite in fp16", f->path, name, (long long)i,
                           tmp[i]);
    if (!rc) q_convert_from_f32(tmp, dst, Q_DTYPE_F16, (size_t)(d0 * d1));
    free(tmp);
    return rc;
}

int lora_load_peft(lora *l, const model *m, const char *dir, q_err *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    char *text;
    size_t len;
    if (q_file_read(path, &text, &len, err)) return -1;
    lora_config c;
    int rc = peft_config(&c, text, len, path, err);
    free(text);
    if (rc || lora_alloc(l, m, &c, err)) return -1;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    q_st_file f;
    if (q_st_open(&f, path, err)) {
        lora_free(l);
        return -1;
    }
    size_t used = 0;
    char name[256];
    for (int64_t i = 0; i < l->n_layers && !rc; i++)
        for (int id = 0; id < LIN_COUNT && !rc; id++) {
            lora_module *a = lora_mod(l, i, (model_linear_id)id);
            if (!a->r) continue;
            lora_peft_name(name, sizeof name, i, (model_linear_id)id, 'A');
            rc = load_matrix(&f, name, a->r, a->in, a->A16, err);
            lora_peft_name(name, sizeof name, i, (model_linear_id)id, 'B');
            if (!rc) rc = load_matrix(&f, name, a->out, a->r, a->B16, err);
            used += 2;
        }
    if (!rc && used != f.n_tensors)
        rc = q_err_set(err, "%s: holds %zu tensors but the config's targets name %zu (other modules or an "
                       "unsupported layout)", path, f.n_tensors, used);
    q_st_close(&f);
    if (rc) {
        lora_free(l);
        return -1;
    }
    lora_sync(l);
    return 0;
}

// ----------------------------------------------------------------------------
// writing a PEFT folder: what PeftModel.save_pretrained writes, so PEFT,
// vLLM and transformers load it (formats.md 7.1-7.3). Weights are fp16, as
// trained.

int lora_save_peft(const lora *l, const char *dir, const char *base_model, q_err *err) {
    if (q_mkdir_p(dir, err)) return -1;
    const lora_config *c = &l->cfg;
    q_buf j = {0};
    char alpha[64], dropout[64];
    q_format_float_repr(c->alpha, alpha, sizeof alpha);
    q_format_float_repr(c->dropout, dropout, sizeof dropout);
    // json.dumps(config, indent=2, sort_keys=True): keys in sorted order
    int rc = q_buf_printf(&j, "{\n  \"alpha_pattern\": {},\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\": ");
    rc |= q_buf_json_string(&j, base_model ? base_model : "");
    rc |= q_buf_printf(&j, ",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n  \"inference_mode\": true,\n"
                           "  \"init_lora_weights\": true,\n  \"layers_pattern\": null,\n  \"layers_to_transform\": null,\n"
                           "  \"lora_alpha\": %s,\n  \"lora_dropout\": %s,\n  \"modules_to_save\": null,\n"
                           "  \"peft_type\": \"LORA\",\n  \"r\": %lld,\n  \"rank_pattern\": {},\n  \"revision\": null,\n"
                           "  \"target_modules\": [",
                       alpha, dropout, (long long)c->r);
    bool first = true;
    for (int id = 0; id < LIN_COUNT; id++)
        if (c->targets & (1u << id)) {
            rc |= q_buf_printf(&j, "%s\n    \"%s\"", first ? "" : ",", model_linear_names[id]);
            first = false;
        }
    rc |= q_buf_printf(&j, "\n  ],\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": false,\n  \"use_rslora\": %s\n}",
                       c->rslora ? "true" : "false");
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    if (rc || q_file_write_atomic(path, j.data, j.len, err)) {
        q_buf_free(&j);
        return rc ? q_err_set(err, "out of memory") : -1;
    }
    q_buf_free(&j);

    const int64_t n_max = 2 * l->n_layers * LIN_COUNT;
    q_st_entry *e = calloc((size_t)(n_max ? n_max : 1), sizeof *e);
    char (*names)[256] = calloc((size_t)(n_max ? n_max : 1), sizeof *names);
    if (!e || !names) {
        free(e), free(names);
        return q_err_set(err, "out of memory");
    }
    size_t n = 0;
    for (int64_t i = 0; i < l->n_layers; i++)
        for (int id = 0; id < LIN_COUNT; id++) {
            const lora_module *a = lora_mod(l, i, (model_linear_id)id);
            if (!a->r) continue;
            lora_peft_name(names[n], sizeof names[n], i, (model_linear_id)id, 'A');
            e[n] = (q_st_entry){.name = names[n], .dtype = Q_DTYPE_F16, .ndim = 2, .shape = {a->r, a->in},
                                .data = a->A16};
            n++;
            lora_peft_name(names[n], sizeof names[n], i, (model_linear_id)id, 'B');
            e[n] = (q_st_entry){.name = names[n], .dtype = Q_DTYPE_F16, .ndim = 2, .shape = {a->out, a->r},
                                .data = a->B16};
            n++;
        }
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    const char *mk[] = {"format"}, *mv[] = {"pt"};
    rc = q_st_write(path, e, n, mk, mv, 1, err);
    free(e), free(names);
    return rc;
}
