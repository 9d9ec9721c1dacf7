// train/gguf_model.c: a llama-architecture GGUF file as a model (gguf.md 3.4,
// 3.7-3.9). Hyperparameters come from the llama.* keys; every tensor is
// dequantized to fp32 by its own ggml type (never by general.file_type); the
// Q/K row permutation of convert_hf_to_gguf is undone, because our RoPE is
// HF's rotate-half; then the block linears are quantized to NF4 + double
// quant exactly as model_load does with a safetensors folder. The result is
// the same `model` as model_load's, so training, PEFT export and generation
// need not know where it came from.
//
// Llama 3 rope scaling is not a key in GGUF: convert_hf_to_gguf writes a
// rope_freqs.weight tensor [head_dim/2] of per-frequency divisors, and
// llama.cpp divides theta_base's frequencies by it (ggml rope: theta / ff).
// We do the same to inv_freq; the scaling record in the config stays empty.
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

// ----------------------------------------------------------------------------
// hyperparameters

// Element i of an integer array value (the array's type was checked at open).
static bool array_int(const q_gguf_kv *kv, uint64_t i, int64_t *v) {
    const uint8_t *p = kv->data;
    switch (kv->elem_type) {
    case Q_GGUF_U8: *v = p[i]; return true;
    case Q_GGUF_I8: *v = (int8_t)p[i]; return true;
    case Q_GGUF_U16: { uint16_t x; memcpy(&x, p + 2 * i, 2); *v = x; return true; }
    case Q_GGUF_I16: { int16_t x; memcpy(&x, p + 2 * i, 2); *v = x; return true; }
    case Q_GGUF_U32: { uint32_t x; memcpy(&x, p + 4 * i, 4); *v = x; return true; }
    case Q_GGUF_I32: { int32_t x; memcpy(&x, p + 4 * i, 4); *v = x; return true; }
    case Q_GGUF_I64: memcpy(v, p + 8 * i, 8); return true;
    case Q_GGUF_U64: { uint64_t x; memcpy(&x, p + 8 * i, 8); *v = (int64_t)x; return x <= (uint64_t)INT64_MAX; }
    default: return false;
    }
}

// A positive integer key (any integer type); absent keys keep *v unless required.
// A per-layer array (head counts in some files) is accepted when all its
// elements agree, since the model has one value for every layer.
static int key_count(const q_gguf *g, const char *key, int64_t *v, bool required, q_err *err) {
    const q_gguf_kv *kv = q_gguf_find_kv(g, key);
    if (!kv) return required ? q_err_set(err, "%s: missing key \"%s\"", g->path, key) : 0;
    if (kv->type == Q_GGUF_ARRAY) {
        int64_t first = 0, x;
        for (uint64_t i = 0; i < kv->count; i++) {
            if (!array_int(kv, i, &x))
                return q_err_set(err, "%s: key \"%s\" must be an integer or an array of integers", g->path, key);
            if (i == 0) first = x;
            if (x != first)
                return q_err_set(err, "%s: key \"%s\" differs between layers (%lld and %lld): not supported", g->path,
                                 key, (long long)first, (long long)x);
        }
        if (kv->count == 0) return q_err_set(err, "%s: key \"%s\" is an empty array", g->path, key);
        *v = first;
    } else if (q_gguf_get_int(g, key, v, err)) {
        return -1;
    }
    // positive, and small enough that products of two stay far from overflow
    if (*v <= 0 || *v > INT32_MAX)
        return q_err_set(err, "%s: key \"%s\" = %lld is out of range", g->path, key, (long long)*v);
    return 0;
}

int model_config_from_gguf(model_config *c, const q_gguf *g, q_err *err) {
    memset(c, 0, sizeof *c);
    const char *arch;
    size_t alen;
    if (q_gguf_get_string(g, "general.architecture", &arch, &alen, err)) return -1;
    if (alen != 5 || memcmp(arch, "llama", 5) != 0)
        return q_err_set(err, "%s: architecture \"%.*s\" is not supported (supported GGUF architectures: llama)",
                         g->path, (int)(alen < 64 ? alen : 64), arch);
    c->arch = MODEL_ARCH_LLAMA;
    c->max_position = 2048;
    if (key_count(g, "llama.embedding_length", &c->hidden, true, err) ||
        key_count(g, "llama.block_count", &c->n_layers, true, err) ||
        key_count(g, "llama.feed_forward_length", &c->intermediate, true, err) ||
        key_count(g, "llama.attention.head_count", &c->n_heads, true, err) ||
        key_count(g, "llama.attention.head_count_kv", &c->n_kv_heads, false, err) ||
        key_count(g, "llama.context_length", &c->max_position, false, err) ||
        key_count(g, "llama.vocab_size", &c->vocab, false, err))
        return -1;
    if (!c->n_kv_heads) c->n_kv_heads = c->n_heads;
    if (!c->vocab) {  // older files: the length of the token list
        const q_gguf_kv *tok = q_gguf_find_kv(g, "tokenizer.ggml.tokens");
        if (!tok || tok->type != Q_GGUF_ARRAY || tok->count == 0 || tok->count > INT32_MAX)
            return q_err_set(err, "%s: neither llama.vocab_size nor a tokenizer.ggml.tokens list gives the vocabulary "
                             "size", g->path);
        c->vocab = (int64_t)tok->count;
    }

    // head_dim: key_length, else the rotary dimension, else hidden / heads
    int64_t key_len = 0, value_len = 0, rope_dim = 0;
    if (key_count(g, "llama.attention.key_length", &key_len, false, err) ||
        key_count(g, "llama.attention.value_length", &value_len, false, err) ||
        key_count(g, "llama.rope.dimension_count", &rope_dim, false, err))
        return -1;
    c->head_dim = key_len ? key_len : rope_dim ? rope_dim : c->hidden / c->n_heads;
    if (value_len && value_len != c->head_dim)
        return q_err_set(err, "%s: value_length %lld differs from key_length %lld: not supported", g->path,
                         (long long)value_len, (long long)c->head_dim);
    if (rope_dim && rope_dim != c->head_dim)
        return q_err_set(err, "%s: llama.rope.dimension_count %lld differs from the head dimension %lld (partial "
                         "rotary): not supported", g->path, (long long)rope_dim, (long long)c->head_dim);
    if (c->n_heads % c->n_kv_heads || c->head_dim % 2 || c->head_dim == 0)
        return q_err_set(err, "%s: head_count (%lld) must be a multiple of head_count_kv (%lld) and the head "
                         "dimension (%lld) even", g->path, (long long)c->n_heads, (long long)c->n_kv_heads,
                         (long long)c->head_dim);

    double eps, theta = 10000.0;
    if (q_gguf_get_float(g, "llama.attention.layer_norm_rms_epsilon", &eps, err)) return -1;
    if (q_gguf_find_kv(g, "llama.rope.freq_base") && q_gguf_get_float(g, "llama.rope.freq_base", &theta, err))
        return -1;
    if (!(eps > 0 && eps < 1) || !(theta > 1 && isfinite(theta)))
        return q_err_set(err, "%s: layer_norm_rms_epsilon %g or rope.freq_base %g is out of range", g->path, eps,
                         theta);
    c->rms_eps = (float)eps;
    c->rope_theta = theta;
    const char *scaling;
    size_t slen;
    if (q_gguf_find_kv(g, "llama.rope.scaling.type")) {
        if (q_gguf_get_string(g, "llama.rope.scaling.type", &scaling, &slen, err)) return -1;
        if (!(slen == 4 && memcmp(scaling, "none", 4) == 0))
            return q_err_set(err, "%s: rope scaling type \"%.*s\" is not supported (supported: none, or Llama 3 "
                             "scaling as a rope_freqs.weight tensor)", g->path, (int)(slen < 64 ? slen : 64), scaling);
    }
    c->tie_embeddings = q_gguf_find_tensor(g, "output.weight") == NULL;
    c->dtype = Q_DTYPE_F32;  // the dequantized values are what the file holds
    return 0;
}

// ----------------------------------------------------------------------------
// tensors

// The tensor `name` with ne = {in, out} (out 0: a vector of `in`), of a type
// we can dequantize; NULL with an error otherwise.
static const q_gguf_tensor *tensor_get(const q_gguf *g, const char *name, int64_t in, int64_t out, q_err *err) {
    const q_gguf_tensor *t = q_gguf_find_tensor(g, name);
    if (!t) return q_err_set(err, "%s: missing tensor %s", g->path, name), NULL;
    const int64_t want[4] = {in, out ? out : 1, 1, 1};
    bool ok = t->n_dims >= 1;  // trailing dims of 1 are harmless
    for (int i = 0; i < 4; i++) ok = ok && t->ne[i] == want[i];
    if (!ok) {
        char got[128] = "", buf[32];
        for (int i = 0; i < t->n_dims; i++) {
            snprintf(buf, sizeof buf, "%s%lld", i ? ", " : "", (long long)t->ne[i]);
            strncat(got, buf, sizeof got - strlen(got) - 1);
        }
        if (out)
            q_err_set(err, "%s: tensor %s has ne [%s], expected [%lld, %lld] (inputs, outputs) from the llama.* keys",
                      g->path, name, got, (long long)in, (long long)out);
        else
            q_err_set(err, "%s: tensor %s has ne [%s], expected [%lld] from the llama.* keys", g->path, name, got,
                      (long long)in);
        return NULL;
    }
    if (!q_gguf_type_info(t->type, NULL, NULL))
        return q_err_set(err, "%s: tensor %s has ggml type %s, which qlora cannot read (supported: F32, F16, BF16, "
                         "Q4_0, Q4_1, Q8_0)", g->path, name, q_gguf_type_name(t->type)), NULL;
    return t;
}

// Dequantizes t into out[numel] and rejects non-finite values.
static int tensor_f32(const q_gguf *g, const q_gguf_tensor *t, float *out, q_err *err) {
    if (q_gguf_dequantize(t->type, t->data, t->numel, out, err)) return q_err_wrap(err, "%s: %s", g->path, t->name);
    for (int64_t i = 0; i < t->numel; i++)
        if (!isfinite(out[i]))
            return q_err_set(err, "%s: tensor %s: element %lld is not finite", g->path, t->name, (long long)i);
    return 0;
}

// A malloc'd fp32 copy of tensor `name` (see tensor_get for the shape).
static float *load_f32(const q_gguf *g, const char *name, int64_t in, int64_t out, q_err *err) {
    const q_gguf_tensor *t = tensor_get(g, name, in, out, err);
    if (!t) return NULL;
    float *x = malloc((size_t)t->numel * sizeof *x);
    if (!x) return q_err_set(err, "%s: %s: out of memory", g->path, name), NULL;
    if (tensor_f32(g, t, x, err)) return free(x), NULL;
    return x;
}

static const char *const gguf_linear_names[LIN_COUNT] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                         "ffn_gate", "ffn_up", "ffn_down"};

// gguf.md 3.8: convert_hf_to_gguf stores HF row h*hd + j*(hd/2) + i of each
// head as row h*hd + 2i + j (pairs for GPT-J-style RoPE). Put every row back.
static void unpermute_rows(float *dst, const float *src, int64_t n_heads, int64_t hd, int64_t in) {
    for (int64_t h = 0; h < n_heads; h++)
        for (int64_t i = 0; i < hd / 2; i++)
            for (int64_t j = 0; j < 2; j++)
                memcpy(dst + (h * hd + j * (hd / 2) + i) * in, src + (h * hd + 2 * i + j) * in,
                       (size_t)in * sizeof *dst);
}

// Every tensor the model needs, present with the right shape and a readable
// type, before anything is allocated: a file that lies fails cheaply.
static int check_tensors(const q_gguf *g, const model_config *c, q_err *err) {
    char name[96];
    if (!tensor_get(g, "token_embd.weight", c->hidden, c->vocab, err) ||
        !tensor_get(g, "output_norm.weight", c->hidden, 0, err) ||
        (!c->tie_embeddings && !tensor_get(g, "output.weight", c->hidden, c->vocab, err)))
        return -1;
    for (int64_t i = 0; i < c->n_layers; i++) {
        snprintf(name, sizeof name, "blk.%lld.attn_norm.weight", (long long)i);
        if (!tensor_get(g, name, c->hidden, 0, err)) return -1;
        snprintf(name, sizeof name, "blk.%lld.ffn_norm.weight", (long long)i);
        if (!tensor_get(g, name, c->hidden, 0, err)) return -1;
        for (int id = 0; id < LIN_COUNT; id++) {
            int64_t out, in;
            model_linear_shape(c, (model_linear_id)id, &out, &in);
            snprintf(name, sizeof name, "blk.%lld.%s.weight", (long long)i, gguf_linear_names[id]);
            if (!tensor_get(g, name, in, out, err)) return -1;
        }
    }
    // biases exist in some llama-architecture files; this loader has no place for them
    for (size_t i = 0; i < g->n_tensors; i++) {
        const char *n = g->tensors[i].name;
        const size_t len = strlen(n);
        if (len > 5 && strcmp(n + len - 5, ".bias") == 0)
            return q_err_set(err, "%s: tensor %s: biases in llama GGUF files are not supported", g->path, n);
    }
    return 0;
}

// inv_freq of theta, divided element-wise by rope_freqs.weight when present.
static int load_rope(model *m, const q_gguf *g, q_err *err) {
    const model_config *c = &m->cfg;
    const int64_t half = c->head_dim / 2;
    ag_rope_inv_freq(m->inv_freq, c->head_dim, c->rope_theta, NULL);
    if (!q_gguf_find_tensor(g, "rope_freqs.weight")) return 0;
    float *f = load_f32(g, "rope_freqs.weight", half, 0, err);
    if (!f) return -1;
    for (int64_t i = 0; i < half; i++) {
        if (!(f[i] > 0.0f)) {
            q_err_set(err, "%s: rope_freqs.weight[%lld] = %g must be positive", g->path, (long long)i, (double)f[i]);
            free(f);
            return -1;
        }
        m->inv_freq[i] = m->inv_freq[i] / f[i];
    }
    free(f);
    return 0;
}

// Block linear `id` of `layer`: dequantized into ws, Q/K rows put back in HF
// order (through ws2), quantized to NF4 + double quant.
static int load_linear(model *m, const q_gguf *g, int64_t layer, model_linear_id id, int64_t blocksize, float *ws,
                       float *ws2, q_err *err) {
    const model_config *c = &m->cfg;
    char name[96];
    snprintf(name, sizeof name, "blk.%lld.%s.weight", (long long)layer, gguf_linear_names[id]);
    int64_t out, in;
    model_linear_shape(c, id, &out, &in);
    const q_gguf_tensor *t = tensor_get(g, name, in, out, err);
    if (!t || tensor_f32(g, t, ws, err)) return -1;
    const float *w = ws;
    if (id == LIN_Q || id == LIN_K) {
        unpermute_rows(ws2, ws, id == LIN_Q ? c->n_heads : c->n_kv_heads, c->head_dim, in);
        w = ws2;
    }
    const int64_t shape[2] = {out, in};
    if (nf4_tensor_quantize(&m->layers[layer].w[id], w, Q_DTYPE_F32, 2, shape, NF4_QTYPE_NF4, blocksize, true, err))
        return q_err_wrap(err, "%s: %s", g->path, name);
    return 0;
}

int model_load_gguf(model *m, const q_gguf *g, int64_t blocksize, q_err *err) {
    memset(m, 0, sizeof *m);
    if (model_config_from_gguf(&m->cfg, g, err) || check_tensors(g, &m->cfg, err)) return -1;
    if (nf4_blocksize_check(blocksize, err)) return q_err_wrap(err, "%s", g->path);
    const model_config *c = &m->cfg;
    const int64_t V = c->vocab, D = c->hidden, ws_numel = model_max_linear_numel(c);
    int rc = -1;
    char name[96];
    float *ws = malloc((size_t)ws_numel * sizeof *ws), *ws2 = malloc((size_t)ws_numel * sizeof *ws2);
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    m->inv_freq = malloc((size_t)(c->head_dim / 2) * sizeof(float));
    if (!ws || !ws2 || !m->layers || !m->inv_freq) {
        q_err_set(err, "%s: out of memory", g->path);
        goto done;
    }
    if (load_rope(m, g, err)) goto done;
    if (!(m->embed = load_f32(g, "token_embd.weight", D, V, err)) ||
        !(m->final_norm = load_f32(g, "output_norm.weight", D, 0, err)))
        goto done;
    if (c->tie_embeddings) {
        m->lm_head = m->embed;
    } else if (!(m->lm_head = load_f32(g, "output.weight", D, V, err))) {
        goto done;
    }
    for (int64_t i = 0; i < c->n_layers; i++) {
        model_layer *L = &m->layers[i];
        snprintf(name, sizeof name, "blk.%lld.attn_norm.weight", (long long)i);
        if (!(L->attn_norm = load_f32(g, name, D, 0, err))) goto done;
        snprintf(name, sizeof name, "blk.%lld.ffn_norm.weight", (long long)i);
        if (!(L->mlp_norm = load_f32(g, name, D, 0, err))) goto done;
        for (int id = 0; id < LIN_COUNT; id++)
            if (load_linear(m, g, i, (model_linear_id)id, blocksize, ws, ws2, err)) goto done;
    }
    rc = 0;
done:
    free(ws);
    free(ws2);
    if (rc) model_free(m);
    return rc;
}
