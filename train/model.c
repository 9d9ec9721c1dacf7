// train/model.c: the Llama-family model. config.json in, weights in (NF4 for
// the block linears, fp32 for the rest), and the forward/backward of one
// batch as a sequence of autograd ops, one checkpointable segment per layer:
//
//   x = embed(ids)
//   per layer:  x = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1)))   n1 = rmsnorm(x)
//               x = x + down(silu(gate(n2)) * up(n2))                     n2 = rmsnorm(x)
//   loss = cross_entropy(rmsnorm(x) lm_head^T, targets)
#define _GNU_SOURCE
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

const char *const model_supported_architectures = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";
const char *const model_linear_names[LIN_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj"};
const char *const model_linear_parents[LIN_COUNT] = {"self_attn", "self_attn", "self_attn", "self_attn",
                                                     "mlp", "mlp", "mlp"};

// ----------------------------------------------------------------------------
// config.json

static int cfg_int(const q_json *j, const char *key, int64_t *v, bool required, const char *name, q_err *err) {
    const q_json *x = q_json_get(j, key);
    if (!x || x->type == Q_JSON_NULL) return required ? q_err_set(err, "%s: missing \"%s\"", name, key) : 0;
    if (x->type != Q_JSON_NUMBER || !x->is_int || x->integer < 0)
        return q_err_set(err, "%s: \"%s\" must be a non-negative integer", name, key);
    *v = x->integer;
    return 0;
}

static int cfg_num(const q_json *j, const char *key, double *v, const char *name, q_err *err) {
    const q_json *x = q_json_get(j, key);
    if (!x || x->type == Q_JSON_NULL) return 0;
    if (x->type != Q_JSON_NUMBER) return q_err_set(err, "%s: \"%s\" must be a number", name, key);
    *v = x->number;
    return 0;
}

static bool cfg_bool(const q_json *j, const char *key, bool dflt) {
    const q_json *x = q_json_get(j, key);
    return x && x->type == Q_JSON_BOOL ? x->boolean : dflt;
}

static const char *cfg_str(const q_json *j, const char *key) {
    const q_json *x = q_json_get(j, key);
    return x && x->type == Q_JSON_STRING ? x->string : NULL;
}

// rope_scaling (transformers 4) or rope_parameters (5): {"rope_type"|"type", factor, ...}
static int cfg_rope(model_config *c, const q_json *j, const char *name, q_err *err) {
    const q_json *r = q_json_get(j, "rope_parameters");
    if (!r || r->type != Q_JSON_OBJECT) r = q_json_get(j, "rope_scaling");
    if (!r || r->type != Q_JSON_OBJECT) return 0;
    if (cfg_num(r, "rope_theta", &c->rope_theta, name, err)) return -1;
    const char *type = cfg_str(r, "rope_type");
    if (!type) type = cfg_str(r, "type");
    if (!type || strcmp(type, "default") == 0) return 0;
    if (strcmp(type, "llama3") != 0)
        return q_err_set(err, "%s: rope scaling type \"%s\" is not supported (supported: default, llama3)", name,
                         type);
    double factor = 0, lo = 1, hi = 4;
    int64_t orig = 8192;
    if (cfg_num(r, "factor", &factor, name, err) || cfg_num(r, "low_freq_factor", &lo, name, err) ||
        cfg_num(r, "high_freq_factor", &hi, name, err) ||
        cfg_int(r, "original_max_position_embeddings", &orig, true, name, err))
        return -1;
    if (!(factor >= 1.0) || !(hi > lo) || orig <= 0)
        return q_err_set(err, "%s: llama3 rope scaling needs factor >= 1, high_freq_factor > low_freq_factor", name);
    c->rope_scaling = (ag_rope_scaling){(float)factor, (float)lo, (float)hi, orig};
    return 0;
}

int model_config_parse(model_config *c, const char *text, size_t len, const char *name, q_err *err) {
    memset(c, 0, sizeof *c);
    q_json *j;
    if (q_json_parse(text, len, &j, err)) return q_err_wrap(err, "%s", name);
    int rc = -1;
    const q_json *archs = q_json_get(j, "architectures");
    const char *arch = archs && archs->type == Q_JSON_ARRAY && archs->count && archs->items[0].type == Q_JSON_STRING
                           ? archs->items[0].string
                           : NULL;
    const char *mtype = cfg_str(j, "model_type");
    if (arch ? strcmp(arch, "LlamaForCausalLM") == 0 : mtype && strcmp(mtype, "llama") == 0) {
        c->arch = MODEL_ARCH_LLAMA;
    } else if (arch ? strcmp(arch, "MistralForCausalLM") == 0 : mtype && strcmp(mtype, "mistral") == 0) {
        c->arch = MODEL_ARCH_MISTRAL;
    } else if (arch ? strcmp(arch, "Qwen2ForCausalLM") == 0 : mtype && strcmp(mtype, "qwen2") == 0) {
        c->arch = MODEL_ARCH_QWEN2;
    } else {
        q_err_set(err, "%s: architecture \"%s\" is not supported (supported: %s)", name,
                  arch ? arch : mtype ? mtype : "(none given)", model_supported_architectures);
        goto done;
    }
    const char *act = cfg_str(j, "hidden_act");
    if (act && strcmp(act, "silu") != 0) {
        q_err_set(err, "%s: hidden_act \"%s\" is not supported (only silu)", name, act);
        goto done;
    }
    double eps = 1e-6;
    c->rope_theta = 10000.0;
    c->max_position = 2048;
    if (cfg_int(j, "vocab_size", &c->vocab, true, name, err) ||
        cfg_int(j, "hidden_size", &c->hidden, true, name, err) ||
        cfg_int(j, "intermediate_size", &c->intermediate, true, name, err) ||
        cfg_int(j, "num_hidden_layers", &c->n_layers, true, name, err) ||
        cfg_int(j, "num_attention_heads", &c->n_heads, true, name, err) ||
        cfg_int(j, "num_key_value_heads", &c->n_kv_heads, false, name, err) ||
        cfg_int(j, "head_dim", &c->head_dim, false, name, err) ||
        cfg_int(j, "max_position_embeddings", &c->max_position, false, name, err) ||
        cfg_int(j, "sliding_window", &c->sliding_window, false, name, err) ||
        cfg_num(j, "rms_norm_eps", &eps, name, err) || cfg_num(j, "rope_theta", &c->rope_theta, name, err) ||
        cfg_rope(c, j, name, err))
        goto done;
    c->rms_eps = (float)eps;
    if (!c->n_kv_heads) c->n_kv_heads = c->n_heads;
    if (c->n_heads == 0 || c->hidden == 0 || c->vocab == 0 || c->n_layers == 0) {
        q_err_set(err, "%s: hidden_size, vocab_size, num_hidden_layers and num_attention_heads must be > 0", name);
        goto done;
    }
    if (!c->head_dim) c->head_dim = c->hidden / c->n_heads;
    if (c->n_heads % c->n_kv_heads || c->head_dim % 2 || c->head_dim == 0) {
        q_err_set(err, "%s: num_attention_heads (%lld) must be a multiple of num_key_value_heads (%lld) and "
                  "head_dim (%lld) even", name, (long long)c->n_heads, (long long)c->n_kv_heads,
                  (long long)c->head_dim);
        goto done;
    }
    c->tie_embeddings = cfg_bool(j, "tie_word_embeddings", false);
    c->attn_bias = c->arch == MODEL_ARCH_QWEN2 || cfg_bool(j, "attention_bias", false);
    c->o_bias = c->arch != MODEL_ARCH_QWEN2 && cfg_bool(j, "attention_bias", false);
    c->mlp_bias = cfg_bool(j, "mlp_bias", false);
    const char *dt = cfg_str(j, "torch_dtype");
    if (!dt) dt = cfg_str(j, "dtype");
    c->dtype = Q_DTYPE_F32;
    if (dt && q_dtype_from_torch_name(dt, &c->dtype)) c->dtype = Q_DTYPE_F32;
    rc = 0;
done:
    q_json_free(j);
    return rc;
}

int model_config_load(model_config *c, const char *dir, q_err *err) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text;
    size_t len;
    if (q_file_read(path, &text, &len, err)) return -1;
    int rc = model_config_parse(c, text, len, path, err);
    free(text);
    return rc;
}

void model_linear_shape(const model_config *c, model_linear_id id, int64_t *out, int64_t *in) {
    const int64_t D = c->hidden, F = c->intermediate, q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
    switch (id) {
    case LIN_Q: *out = q, *in = D; break;
    case LIN_K:
    case LIN_V: *out = kv, *in = D; break;
    case LIN_O: *out = D, *in = q; break;
    case LIN_GATE:
    case LIN_UP: *out = F, *in = D; break;
    default: *out = D, *in = F; break;
    }
}

int64_t model_max_linear_numel(const model_config *c) {
    int64_t best = 0;
    for (int i = 0; i < LIN_COUNT; i++) {
        int64_t o, in;
        model_linear_shape(c, (model_linear_id)i, &o, &in);
        if (o * in > best) best = o * in;
    }
    return best;
}

// ----------------------------------------------------------------------------
// weights

static float *load_float(const q_st_model *st, const char *name, int64_t d0, int64_t d1, q_err *err) {
    const q_st_tensor *t = q_st_model_find(st, name);
    if (!t) return q_err_set(err, "missing tensor %s", name), NULL;
    const int64_t want = d1 ? d0 * d1 : d0;
    if (!q_dtype_is_float(t->dtype) || t->numel != want || t->shape[0] != d0)
        return q_err_set(err, "%s: expected a float tensor of shape [%lld%s%lld], found %s with %lld elements", name,
                         (long long)d0, d1 ? ", " : "", (long long)d1, q_dtype_name(t->dtype), (long long)t->numel),
               NULL;
    float *x = malloc((size_t)want * sizeof *x);
    if (!x) return q_err_set(err, "%s: out of memory", name), NULL;
    q_convert_to_f32(t->data, t->dtype, x, (size_t)want);
    for (int64_t i = 0; i < want; i++)
        if (!isfinite(x[i])) {
            free(x);
            return q_err_set(err, "%s: element %lld is not finite", name, (long long)i), NULL;
        }
    return x;
}

static int load_linear(model *m, const q_st_model *st, int64_t layer, model_linear_id id, int64_t blocksize,
                       q_err *err) {
    char name[256];
    snprintf(name, sizeof name, "model.layers.%lld.%s.%s.weight", (long long)layer, model_linear_parents[id],
             model_linear_names[id]);
    int64_t out, in;
    model_linear_shape(&m->cfg, id, &out, &in);
    nf4_tensor *w = &m->layers[layer].w[id];
    if (bnb4_is_quantized(st, name)) {
        if (bnb4_load(st, name, w, err)) return -1;
        if (w->qtype != NF4_QTYPE_NF4 || !w->nested)
            return q_err_set(err, "%s: only NF4 with double quantization is supported for training (found %s%s)",
                             name, nf4_qtype_name(w->qtype), w->nested ? "" : ", no double quant");
        m->prequantized = true;
    } else {
        const q_st_tensor *t = q_st_model_find(st, name);
        if (!t) return q_err_set(err, "missing tensor %s", name);
        if (!q_dtype_is_float(t->dtype) || t->ndim != 2)
            return q_err_set(err, "%s: expected a 2-D float weight, found %s", name, q_dtype_name(t->dtype));
        if (nf4_tensor_quantize(w, t->data, t->dtype, 2, t->shape, NF4_QTYPE_NF4, blocksize, true, err))
            return q_err_wrap(err, "%s", name);
    }
    if (w->ndim != 2 || w->shape[0] != out || w->shape[1] != in)
        return q_err_set(err, "%s: shape [%lld, %lld] does not match config.json ([%lld, %lld])", name,
                         (long long)w->shape[0], (long long)(w->ndim > 1 ? w->shape[1] : 0), (long long)out,
                         (long long)in);
    const bool bias = (id <= LIN_V && m->cfg.attn_bias) || (id == LIN_O && m->cfg.o_bias) ||
                      (id >= LIN_GATE && m->cfg.mlp_bias);
    if (bias) {
        snprintf(name, sizeof name, "model.layers.%lld.%s.%s.bias", (long long)layer, model_linear_parents[id],
                 model_linear_names[id]);
        if (!(m->layers[layer].bias[id] = load_float(st, name, out, 0, err))) return -1;
    }
    return 0;
}

int model_load(model *m, const char *dir, int64_t blocksize, q_err *err) {
    memset(m, 0, sizeof *m);
    const size_t len = strlen(dir);
    if (len > 5 && strcmp(dir + len - 5, ".gguf") == 0) {
        q_gguf g;
        if (q_gguf_open(&g, dir, err)) return -1;
        int rc = model_load_gguf(m, &g, blocksize, err);
        q_gguf_close(&g);
        return rc;
    }
    if (model_config_load(&m->cfg, dir, err)) return -1;
    if (nf4_blocksize_check(blocksize, err)) return -1;
    q_st_model st;
    if (q_st_model_open(&st, dir, err)) return -1;
    const model_config *c = &m->cfg;
    const int64_t V = c->vocab, D = c->hidden;
    int rc = -1;
    char name[256];
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    m->inv_freq = malloc((size_t)(c->head_dim / 2) * sizeof(float));
    if (!m->layers || !m->inv_freq) {
        q_err_set(err, "%s: out of memory", dir);
        goto done;
    }
    ag_rope_inv_freq(m->inv_freq, c->head_dim, c->rope_theta, &c->rope_scaling);
    if (!(m->embed = load_float(&st, "model.embed_tokens.weight", V, D, err)) ||
        !(m->final_norm = load_float(&st, "model.norm.weight", D, 0, err)))
        goto done;
    if (c->tie_embeddings) {
        m->lm_head = m->embed;
    } else if (!(m->lm_head = load_float(&st, "lm_head.weight", V, D, err))) {
        goto done;
    }
    for (int64_t i = 0; i < c->n_layers; i++) {
        model_layer *L = &m->layers[i];
        snprintf(name, sizeof name, "model.layers.%lld.input_layernorm.weight", (long long)i);
        if (!(L->attn_norm = load_float(&st, name, D, 0, err))) goto done;
        snprintf(name, sizeof name, "model.layers.%lld.post_attention_layernorm.weight", (long long)i);
        if (!(L->mlp_norm = load_float(&st, name, D, 0, err))) goto done;
        for (int id = 0; id < LIN_COUNT; id++)
            if (load_linear(m, &st, i, (model_linear_id)id, blocksize, err)) goto done;
    }
    rc = 0;
done:
    if (rc) {
        q_err_wrap(err, "loading %s", dir);
        model_free(m);
    }
    q_st_model_close(&st);
    return rc;
}

void model_free(model *m) {
    if (m->layers)
        for (int64_t i = 0; i < m->cfg.n_layers; i++) {
            free(m->layers[i].attn_norm);
            free(m->layers[i].mlp_norm);
            for (int id = 0; id < LIN_COUNT; id++) {
                nf4_tensor_free(&m->layers[i].w[id]);
                free(m->layers[i].bias[id]);
            }
        }
    if (m->lm_head != m->embed) free(m->lm_head);
    free(m->embed);
    free(m->final_norm);
    free(m->layers);
    free(m->inv_freq);
    memset(m, 0, sizeof *m);
}

// ----------------------------------------------------------------------------
// batches

int model_batch_init(model_batch *b, int64_t B, int64_t T, const int64_t *ids, const int64_t *labels,
                     const int64_t *doc_ids, int64_t vocab, q_err *err) {
    memset(b, 0, sizeof *b);
    const int64_t N = B * T;
    if (B <= 0 || T <= 0 || N > INT32_MAX) return q_err_set(err, "batch: bad shape [%lld, %lld]", (long long)B,
                                                            (long long)T);
    b->B = B, b->T = T, b->N = N;
    b->ids = malloc((size_t)N * sizeof(int32_t));
    b->targets = malloc((size_t)N * sizeof(int32_t));
    b->pos = malloc((size_t)N * sizeof(int32_t));
    b->start = malloc((size_t)N * sizeof(int32_t));
    if (!b->ids || !b->targets || !b->pos || !b->start) {
        model_batch_free(b);
        return q_err_set(err, "batch: out of memory");
    }
    for (int64_t r = 0; r < B; r++) {
        int64_t doc_start = r * T;
        for (int64_t t = 0; t < T; t++) {
            const int64_t n = r * T + t;
            if (ids[n] < 0 || ids[n] >= vocab) {
                model_batch_free(b);
                return q_err_set(err, "batch: token id %lld at [%lld, %lld] is outside the vocabulary (%lld)",
                                 (long long)ids[n], (long long)r, (long long)t, (long long)vocab);
            }
            if (t > 0 && doc_ids && doc_ids[n] != doc_ids[n - 1]) doc_start = n;
            b->ids[n] = (int32_t)ids[n];
            b->start[n] = (int32_t)doc_start;
            b->pos[n] = (int32_t)(n - doc_start);
            // HF's shift: position t predicts labels[t+1]; the last position predicts nothing
            int64_t y = t + 1 < T && labels ? labels[n + 1] : AG_IGNORE_INDEX;
            if (y != AG_IGNORE_INDEX && (y < 0 || y >= vocab)) {
                model_batch_free(b);
                return q_err_set(err, "batch: label %lld at [%lld, %lld] is outside the vocabulary (%lld)",
                                 (long long)y, (long long)r, (long long)t + 1, (long long)vocab);
            }
            b->targets[n] = (int32_t)y;
        }
    }
    return 0;
}

static int64_t *read_i64(const q_st_file *f, const char *name, int64_t *B, int64_t *T, bool required, q_err *err) {
    const q_st_tensor *t = q_st_find(f, name);
    if (!t) return required ? (q_err_set(err, "%s: missing tensor \"%s\"", f->path, name), NULL) : NULL;
    if ((t->dtype != Q_DTYPE_I64 && t->dtype != Q_DTYPE_I32) || t->ndim != 2)
        return q_err_set(err, "%s: \"%s\" must be an I64 or I32 tensor of shape [B, T]", f->path, name), NULL;
    if (*B && (t->shape[0] != *B || t->shape[1] != *T))
        return q_err_set(err, "%s: \"%s\" has shape [%lld, %lld], input_ids [%lld, %lld]", f->path, name,
                         (long long)t->shape[0], (long long)t->shape[1], (long long)*B, (long long)*T), NULL;
    *B = t->shape[0], *T = t->shape[1];
    int64_t *x = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *x);
    if (!x) return q_err_set(err, "out of memory"), NULL;
    for (int64_t i = 0; i < t->numel; i++) {
        if (t->dtype == Q_DTYPE_I64) {
            memcpy(&x[i], (const char *)t->data + 8 * i, 8);
        } else {
            int32_t v;
            memcpy(&v, (const char *)t->data + 4 * i, 4);
            x[i] = v;
        }
    }
    return x;
}

int model_batch_load(model_batch *b, const char *path, int64_t vocab, q_err *err) {
    q_st_file f;
    if (q_st_open(&f, path, err)) return -1;
    int64_t B = 0, T = 0;
    int64_t *ids = read_i64(&f, "input_ids", &B, &T, true, err);
    int64_t *labels = ids ? read_i64(&f, "labels", &B, &T, false, err) : NULL;
    int64_t *docs = ids && (labels || !q_st_find(&f, "labels")) ? read_i64(&f, "doc_ids", &B, &T, false, err) : NULL;
    int rc = -1;
    const bool ok = ids && (labels || !q_st_find(&f, "labels")) && (docs || !q_st_find(&f, "doc_ids"));
    if (ok) rc = model_batch_init(b, B, T, ids, labels ? labels : ids, docs, vocab, err);
    if (rc && ok) q_err_wrap(err, "%s", path);
    free(ids), free(labels), free(docs);
    q_st_close(&f);
    return rc;
}

void model_batch_free(model_batch *b) {
    free(b->ids);
    free(b->targets);
    free(b->pos);
    free(b->start);
    memset(b, 0, sizeof *b);
}

// ----------------------------------------------------------------------------
// the weights a pass reads

int model_weights_host(model_weights *w, const model *m, q_err *err) {
    const model_config *c = &m->cfg;
    *w = (model_weights){c, m->embed, m->final_norm, m->lm_head, m->inv_freq, NULL};
    w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
    if (!w->layers) return q_err_set(err, "model: out of memory");
    for (int64_t i = 0; i < c->n_layers; i++) {
        const model_layer *L = &m->layers[i];
        model_layer_weights *lw = &w->layers[i];
        lw->attn_norm = L->attn_norm;
        lw->mlp_norm = L->mlp_norm;
        for (int id = 0; id < LIN_COUNT; id++) {
            lw->w[id] = nf4_tensor_view(&L->w[id]);
            lw->w_dtype[id] = L->w[id].dtype;
            lw->bias[id] = L->bias[id];
        }
    }
    return 0;
}

void model_weights_free(model_weights *w) {
    free(w->layers);
    w->layers = NULL;
}

// ----------------------------------------------------------------------------
// the forward as ops on a tape

typedef struct layer_ctx {
    const model_pass *p;
    int64_t layer;
    uint64_t step;
    bool grads;     // LoRA gradients wanted
} layer_ctx;

static ag_linear layer_linear(const layer_ctx *c, model_linear_id id) {
    const model_weights *mw = c->p->w;
    const model_layer_weights *L = &mw->layers[c->layer];
    int64_t out, in;
    model_linear_shape(mw->cfg, id, &out, &in);
    ag_linear lin = {.in = in, .out = out, .w = L->w[id], .w_dtype = L->w_dtype[id], .bias = L->bias[id]};
    const lora *l = c->p->l;
    const lora_module *a = l ? lora_mod(l, c->layer, id) : NULL;
    if (a && a->r > 0) {
        lin.r = a->r;
        lin.scale = l->scale;
        lin.dropout = c->grads ? l->cfg.dropout : 0.0f;  // evaluation runs without dropout
        lin.dropout_seed = ag_rng_hash(l->cfg.seed ^ 0xd409u, (c->step * (uint64_t)mw->cfg->n_layers +
                                                               (uint64_t)c->layer) * LIN_COUNT + id);
        lin.A = a->A;
        lin.B = a->B;
        if (c->grads) lin.dA = a->dA, lin.dB = a->dB;
    }
    return lin;
}

static ag_tensor *layer_forward(ag_tape *t, ag_tensor *x, void *p) {
    const layer_ctx *c = p;
    const model_pass *ps = c->p;
    const model_config *cfg = ps->w->cfg;
    const model_layer_weights *L = &ps->w->layers[c->layer];
    const int64_t H = cfg->n_heads, Hkv = cfg->n_kv_heads, hd = cfg->head_dim;
    ag_linear lin[LIN_COUNT];
    for (int id = 0; id < LIN_COUNT; id++) lin[id] = layer_linear(c, (model_linear_id)id);

    ag_tensor *h = ag_rmsnorm(t, x, L->attn_norm, cfg->rms_eps);
    ag_tensor *q = ag_rope(t, ag_linear_apply(t, h, &lin[LIN_Q]), ps->pos, ps->w->inv_freq, H, hd);
    ag_tensor *k = ag_rope(t, ag_linear_apply(t, h, &lin[LIN_K]), ps->pos, ps->w->inv_freq, Hkv, hd);
    ag_tensor *v = ag_linear_apply(t, h, &lin[LIN_V]);
    ag_tensor *a = ag_attention(t, q, k, v, ps->start, H, Hkv, hd);
    x = ag_add(t, x, ag_linear_apply(t, a, &lin[LIN_O]));

    h = ag_rmsnorm(t, x, L->mlp_norm, cfg->rms_eps);
    ag_tensor *g = ag_swiglu(t, ag_linear_apply(t, h, &lin[LIN_GATE]), ag_linear_apply(t, h, &lin[LIN_UP]));
    return ag_add(t, x, ag_linear_apply(t, g, &lin[LIN_DOWN]));
}

// Runs embed -> layers -> final norm on tape t; returns the normed hidden [N,D].
static ag_tensor *trunk_forward(ag_tape *t, const model_pass *p, bool grads, bool checkpoint, uint64_t step,
                                layer_ctx *ctxs) {
    const model_config *c = p->w->cfg;
    ag_tensor *x = ag_embedding(t, p->ids, p->w->embed, p->b->N, c->hidden);
    for (int64_t i = 0; i < c->n_layers; i++) {
        ctxs[i] = (layer_ctx){p, i, step, grads};
        x = checkpoint ? ag_checkpoint(t, x, layer_forward, &ctxs[i]) : layer_forward(t, x, &ctxs[i]);
    }
    return ag_rmsnorm(t, x, p->w->final_norm, c->rms_eps);
}

static int64_t count_valid(const model_batch *b) {
    int64_t n = 0;
    for (int64_t i = 0; i < b->N; i++) n += b->targets[i] != AG_IGNORE_INDEX;
    return n;
}

// Token chunk: enough rows to keep the GEMM efficient; vocabulary in one
// chunk unless the logits of a row chunk would pass ~64 MB.
static void loss_chunks(const model_config *c, const model_step_opts *o, int64_t *tc, int64_t *vc) {
    *tc = o && o->token_chunk > 0 ? o->token_chunk : 256;
    *vc = o && o->vocab_chunk > 0 ? o->vocab_chunk : c->vocab;
    if (!(o && o->vocab_chunk > 0) && *tc * *vc > (16 << 20)) *vc = ((16 << 20) / *tc + 63) / 64 * 64;
}

int model_pass_run(const model_pass *p, const model_step_opts *o, bool training, float *logits,
                   model_step_result *r, q_err *err) {
    memset(r, 0, sizeof *r);
    const model_config *c = p->w->cfg;
    const model_batch *b = p->b;
    if (logits && p->cuda) return q_err_set(err, "model: logits are only returned by CPU passes");
    // the CPU dequantizes each base weight into one fp32 workspace; the
    // device keeps its workspace in the CUDA context
    const int64_t ws_numel = p->cuda ? 0 : model_max_linear_numel(c);
    float *ws = ws_numel ? malloc((size_t)ws_numel * sizeof(float)) : NULL;
    layer_ctx *ctxs = malloc((size_t)c->n_layers * sizeof *ctxs);
    if ((ws_numel && !ws) || !ctxs) {
        free(ws), free(ctxs);
        return q_err_set(err, "model: out of memory for the dequantization workspace");
    }
    ag_mem mem = {0, 0};
    ag_tape t;
    if (p->cuda) ag_tape_init_cuda(&t, training, &mem, p->cuda);
    else ag_tape_init(&t, training, &mem, ws, ws_numel);
    const int64_t valid = count_valid(b);
    const float scale = o->grad_scale > 0 ? o->grad_scale : valid ? 1.0f / (float)valid : 0.0f;
    int64_t tc, vc;
    loss_chunks(c, o, &tc, &vc);
    ag_tensor *h = trunk_forward(&t, p, training, training && o->checkpoint, o->step, ctxs);
    if (h && logits)
        ag_gemm(false, true, b->N, c->vocab, c->hidden, 1.0f, h->data, c->hidden, p->w->lm_head, c->hidden, 0.0f,
                logits, c->vocab);
    ag_loss(&t, h, p->w->lm_head, p->targets, c->vocab, scale, tc, vc, &r->loss_sum, &r->n_valid);
    if (training && !t.failed && h) ag_tape_backward(&t);
    if (p->cuda && !t.failed && ag_cuda_ctx_sync(p->cuda, &t.err)) t.failed = true;
    const bool failed = t.failed || !h;
    q_err terr = t.err;
    ag_tape_free(&t);
    free(ws);
    free(ctxs);
    if (failed) {
        if (terr.msg[0]) {
            *err = terr;
            return q_err_wrap(err, "model: %s pass", p->cuda ? "device" : "CPU");
        }
        return q_err_set(err, "model: out of memory for activations");
    }
    r->loss = r->n_valid ? r->loss_sum / (double)r->n_valid : 0.0;
    r->peak_bytes = mem.peak;
    if (!isfinite(r->loss)) return q_err_set(err, "model: the loss is not finite (%g)", r->loss);
    return 0;
}

// One CPU pass: training turns LoRA dropout on; forward-only is evaluation.
static int model_run(const model *m, const lora *l, const model_batch *b, const model_step_opts *o, bool training,
                     float *logits, model_step_result *r, q_err *err) {
    model_weights w;
    if (model_weights_host(&w, m, err)) return -1;
    const model_pass p = {&w, l, NULL, b->ids, b->targets, b->pos, b->start, b};
    const int rc = model_pass_run(&p, o, training, logits, r, err);
    model_weights_free(&w);
    return rc;
}

int model_step(const model *m, lora *l, const model_batch *b, const model_step_opts *o, model_step_result *r,
               q_err *err) {
    return model_run(m, l, b, o, true, NULL, r, err);
}

int model_forward(const model *m, const lora *l, const model_batch *b, float *logits, model_step_result *r,
                  q_err *err) {
    const model_step_opts o = {0};
    return model_run(m, l, b, &o, false, logits, r, err);
}
