// tests/test_gguf.c: the GGUF reader (core/gguf.c) and the llama GGUF loader
// (train/gguf_model.c) against gguf-py and the safetensors path.
// scripts/fixtures/make_gguf_fixtures.py wrote tests/fixtures/gguf/ with
// gguf-py's GGUFWriter from the fp32 HF weights of models/llama_gqa/hf, the
// way convert_hf_to_gguf.py does (permuted Q/K rows, llama3 rope scaling as a
// rope_freqs tensor), plus types.gguf (every readable tensor type, every
// metadata value type) and dequant.safetensors (gguf-py's dequantization).
//
// References: gguf-py's dequantize (bit for bit); hand-built blocks (nibble
// order); model_load of the same weights from safetensors (bit for bit: the
// F32 file must give identical fp32 arrays and NF4 codes once its Q/K rows
// are un-permuted); PyTorch + PEFT logits of models/llama_gqa (the tolerance
// test_model.c uses for quantized-at-load weights, 1e-3). Corrupt files are
// made here by mutating bytes of the good ones.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "test_util.h"
#include "train/train.h"

#define LOADQ_LOGITS_RTOL 1e-3  // test_model.c: qlora-quantized NF4 vs bitsandbytes' (scale codes may differ)
// F16/Q8_0/Q4_1 files against the F32 file, all NF4-quantized at load. Their
// weights are checked bit for bit elsewhere; the logits only show what a
// second quantization does to this small random model, which is touchy: NF4
// alone moves its logits by 0.31 (normwise relative; PyTorch + PEFT on the
// fp32 hf/ weights against expected.safetensors' bitsandbytes NF4 logits, the
// single-document row, measured once in Python), and
// the 0.1% of NF4 codes that F16 rounding flips move them by 0.02. Measured:
// F16 0.025, Q8_0 0.12, Q4_1 0.43; the bounds are about twice that.
#define F16_LOGITS_RTOL 0.05
#define Q8_0_LOGITS_RTOL 0.25
#define Q4_1_LOGITS_RTOL 0.8

static const char *gguf_path(const char *name) {
    static char path[4096];
    snprintf(path, sizeof path, "%sgguf/%s", test_fixture(""), name);
    return path;
}

static const char *model_path(const char *sub) {
    static char path[4096];
    snprintf(path, sizeof path, "%smodels/llama_gqa/%s", test_fixture(""), sub);
    return path;
}

static bool contains(const char *msg, const char *want) {
    if (strstr(msg, want)) return true;
    fprintf(stderr, "\n  error \"%s\" lacks \"%s\"", msg, want);
    return false;
}

// ----------------------------------------------------------------------------
// metadata and tensor infos

static void test_metadata(void) {
    q_err err;
    q_gguf g;
    TEST_OK(q_gguf_open(&g, gguf_path("types.gguf"), &err), &err);
    CU_ASSERT_EQUAL(g.version, 3);
    CU_ASSERT_EQUAL(g.alignment, 64);
    CU_ASSERT_EQUAL(g.n_kv, 16);
    CU_ASSERT_EQUAL(g.n_tensors, 9);

    int64_t i;
    const struct { const char *key; int64_t v; } ints[] = {
        {"test.u8", 200}, {"test.i8", -100}, {"test.u16", 60000}, {"test.i16", -30000},
        {"test.u32", 4000000000ll}, {"test.i32", -2000000000ll}, {"test.i64", -(1ll << 62)}, {"general.alignment", 64},
    };
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
        TEST_OK(q_gguf_get_int(&g, ints[k].key, &i, &err), &err);
        CU_ASSERT_EQUAL(i, ints[k].v);
    }
    CU_ASSERT_EQUAL(q_gguf_get_int(&g, "test.u64", &i, &err), -1);  // 2^63 + 5
    CU_ASSERT(contains(err.msg, "does not fit"));
    CU_ASSERT_EQUAL(q_gguf_get_int(&g, "test.f32", &i, &err), -1);
    CU_ASSERT(contains(err.msg, "\"test.f32\" is a f32, expected an integer"));
    CU_ASSERT_EQUAL(q_gguf_get_int(&g, "test.u16s", &i, &err), -1);
    CU_ASSERT(contains(err.msg, "is an array of u16"));
    CU_ASSERT_EQUAL(q_gguf_get_int(&g, "test.nope", &i, &err), -1);
    CU_ASSERT(contains(err.msg, "missing key \"test.nope\""));
    CU_ASSERT(contains(err.msg, "types.gguf"));

    double d;
    TEST_OK(q_gguf_get_float(&g, "test.f32", &d, &err), &err);
    CU_ASSERT_EQUAL(d, (double)0.1f);
    TEST_OK(q_gguf_get_float(&g, "test.f64", &d, &err), &err);
    CU_ASSERT_EQUAL(d, 1e300);
    TEST_OK(q_gguf_get_float(&g, "test.i16", &d, &err), &err);
    CU_ASSERT_EQUAL(d, -30000.0);
    CU_ASSERT_EQUAL(q_gguf_get_float(&g, "test.string", &d, &err), -1);
    CU_ASSERT(contains(err.msg, "is a string, expected a number"));

    bool b = false;
    TEST_OK(q_gguf_get_bool(&g, "test.bool", &b, &err), &err);
    CU_ASSERT(b);
    CU_ASSERT_EQUAL(q_gguf_get_bool(&g, "test.u8", &b, &err), -1);
    CU_ASSERT(contains(err.msg, "is a u8, expected a bool"));

    const char *s;
    size_t len;
    TEST_OK(q_gguf_get_string(&g, "test.string", &s, &len, &err), &err);
    CU_ASSERT(len == 6 && memcmp(s, "h\xc3\xa9llo", 6) == 0);
    TEST_OK(q_gguf_get_string(&g, "general.architecture", &s, &len, &err), &err);
    CU_ASSERT(len == 4 && memcmp(s, "none", 4) == 0);

    const char *const want[] = {"a", "bc", "", "\xc3\xbc" "ber"};
    const q_gguf_kv *kv = q_gguf_find_kv(&g, "test.strings");
    CU_ASSERT_PTR_NOT_NULL_FATAL(kv);
    CU_ASSERT(kv->type == Q_GGUF_ARRAY && kv->elem_type == Q_GGUF_STRING && kv->count == 4);
    q_gguf_string_iter it;
    q_gguf_string_iter_init(&it, kv);
    size_t n = 0;
    while (q_gguf_string_iter_next(&it, &s, &len)) {
        CU_ASSERT_FATAL(n < 4);
        CU_ASSERT(len == strlen(want[n]) && memcmp(s, want[n], len) == 0);
        n++;
    }
    CU_ASSERT_EQUAL(n, 4);
    kv = q_gguf_find_kv(&g, "test.u16s");  // not strings: the iterator yields nothing
    CU_ASSERT(kv && kv->elem_type == Q_GGUF_U16 && kv->count == 3);
    q_gguf_string_iter_init(&it, kv);
    CU_ASSERT_FALSE(q_gguf_string_iter_next(&it, &s, &len));
    uint16_t u16s[3];
    memcpy(u16s, kv->data, sizeof u16s);
    CU_ASSERT(u16s[0] == 1 && u16s[1] == 2 && u16s[2] == 65535);

    // tensor infos: ne reversed from numpy's shape, data aligned to 64 within the data section
    const q_gguf_tensor *t = q_gguf_find_tensor(&g, "f32");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT(t->type == 0 && t->n_dims == 3 && t->ne[0] == 32 && t->ne[1] == 3 && t->ne[2] == 2 && t->ne[3] == 1);
    CU_ASSERT(t->numel == 192 && t->nbytes == 768);
    const q_gguf_tensor *first = &g.tensors[0];
    t = q_gguf_find_tensor(&g, "q4_1_raw");
    CU_ASSERT_PTR_NOT_NULL_FATAL(t);
    CU_ASSERT(t->type == 3 && t->n_dims == 2 && t->ne[0] == 128 && t->ne[1] == 3 && t->nbytes == 3 * 4 * 20);
    CU_ASSERT_EQUAL(((const uint8_t *)t->data - (const uint8_t *)first->data) % 64, 0);
    CU_ASSERT_EQUAL(((const uint8_t *)first->data - g.map) % 64, 0);
    CU_ASSERT_PTR_NULL(q_gguf_find_tensor(&g, "nope"));
    q_gguf_close(&g);

    // the type table (ggml-common.h block layouts)
    int64_t block, bytes;
    const struct { uint32_t type; const char *name; int64_t block, bytes; } types[] = {
        {0, "F32", 1, 4}, {1, "F16", 1, 2}, {30, "BF16", 1, 2}, {2, "Q4_0", 32, 18}, {3, "Q4_1", 32, 20},
        {8, "Q8_0", 32, 34},
    };
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        CU_ASSERT(q_gguf_type_info(types[k].type, &block, &bytes));
        CU_ASSERT(block == types[k].block && bytes == types[k].bytes);
        CU_ASSERT_STRING_EQUAL(q_gguf_type_name(types[k].type), types[k].name);
    }
    CU_ASSERT_FALSE(q_gguf_type_info(14, &block, &bytes));  // Q6_K: known, not readable
    CU_ASSERT_STRING_EQUAL(q_gguf_type_name(14), "Q6_K");
    CU_ASSERT_FALSE(q_gguf_type_info(4, &block, &bytes));   // a removed type id
    CU_ASSERT_STRING_EQUAL(q_gguf_type_name(4), "unknown");
}

// ----------------------------------------------------------------------------
// dequantization

// Hand-built blocks: the low nibble of byte j is element j, the high nibble
// element j + 16 (ggml-quants.c dequantize_row_q4_0/q4_1).
static void test_dequant_blocks(void) {
    q_err err;
    uint8_t q40[18] = {0x00, 0x3c}, q41[20] = {0x00, 0x40, 0x00, 0xbc}, q80[34] = {0x00, 0x38};  // d 1, 2; m -1; d 0.5
    for (int j = 0; j < 16; j++) {
        q40[2 + j] = (uint8_t)(j | (15 - j) << 4);
        q41[4 + j] = (uint8_t)(j | (15 - j) << 4);
    }
    for (int j = 0; j < 32; j++) q80[2 + j] = (uint8_t)(int8_t)(j * 8 - 128);
    float y[32];
    TEST_OK(q_gguf_dequantize(2, q40, 32, y, &err), &err);
    for (int j = 0; j < 16; j++) CU_ASSERT(y[j] == (float)(j - 8) && y[j + 16] == (float)(7 - j));
    TEST_OK(q_gguf_dequantize(3, q41, 32, y, &err), &err);
    for (int j = 0; j < 16; j++) CU_ASSERT(y[j] == 2.0f * j - 1.0f && y[j + 16] == 2.0f * (15 - j) - 1.0f);
    TEST_OK(q_gguf_dequantize(8, q80, 32, y, &err), &err);
    for (int j = 0; j < 32; j++) CU_ASSERT(y[j] == 0.5f * (float)(j * 8 - 128));

    CU_ASSERT_EQUAL(q_gguf_dequantize(14, q80, 256, y, &err), -1);
    CU_ASSERT(contains(err.msg, "cannot dequantize ggml type Q6_K"));
    CU_ASSERT_EQUAL(q_gguf_dequantize(8, q80, 16, y, &err), -1);
    CU_ASSERT(contains(err.msg, "not a whole number of Q8_0 blocks"));
}

// Every tensor of dequant.safetensors ("<file stem>/<tensor>") against ours, bit for bit.
static void test_dequant_vs_gguf_py(void) {
    q_err err;
    q_st_file ref;
    TEST_OK(q_st_open(&ref, gguf_path("dequant.safetensors"), &err), &err);
    int compared = 0, types_seen[64] = {0};
    int64_t values = 0;
    for (size_t k = 0; k < ref.n_tensors; k++) {
        const q_st_tensor *r = &ref.tensors[k];
        char file[256];
        const char *slash = strchr(r->name, '/');
        CU_ASSERT_PTR_NOT_NULL_FATAL(slash);
        snprintf(file, sizeof file, "%.*s.gguf", (int)(slash - r->name), r->name);
        q_gguf g;
        TEST_OK(q_gguf_open(&g, gguf_path(file), &err), &err);
        const q_gguf_tensor *t = q_gguf_find_tensor(&g, slash + 1);
        CU_ASSERT_PTR_NOT_NULL_FATAL(t);
        CU_ASSERT_EQUAL_FATAL(t->numel, r->numel);
        float *y = malloc((size_t)t->numel * sizeof *y);
        TEST_OK(q_gguf_dequantize(t->type, t->data, t->numel, y, &err), &err);
        const bool same = memcmp(y, r->data, (size_t)t->numel * 4) == 0;
        if (!same) fprintf(stderr, "\n  %s differs from gguf-py", r->name);
        CU_ASSERT(same);
        types_seen[t->type & 63]++;
        compared++;
        values += t->numel;
        free(y);
        q_gguf_close(&g);
    }
    q_st_close(&ref);
    CU_ASSERT_EQUAL(compared, 15);
    const int readable[] = {0, 1, 30, 2, 3, 8};
    for (int k = 0; k < 6; k++) CU_ASSERT(types_seen[readable[k]] > 0);
    printf("\n    %d tensors (%lld values; F32 F16 BF16 Q4_0 Q4_1 Q8_0) identical to gguf-py ", compared,
           (long long)values);
}

// ----------------------------------------------------------------------------
// the llama loader

static void test_config(void) {
    q_err err;
    q_gguf g;
    model_config c, h;
    TEST_OK(model_config_load(&h, model_path("hf"), &err), &err);
    TEST_OK(q_gguf_open(&g, gguf_path("llama_gqa_f32.gguf"), &err), &err);
    TEST_OK(model_config_from_gguf(&c, &g, &err), &err);
    q_gguf_close(&g);
    CU_ASSERT(c.arch == MODEL_ARCH_LLAMA && c.vocab == h.vocab && c.hidden == h.hidden &&
              c.intermediate == h.intermediate && c.n_layers == h.n_layers && c.n_heads == h.n_heads &&
              c.n_kv_heads == h.n_kv_heads && c.head_dim == h.head_dim && c.max_position == h.max_position);
    CU_ASSERT(c.rms_eps == h.rms_eps && c.rope_theta == h.rope_theta && c.tie_embeddings == false);
    CU_ASSERT(c.dtype == Q_DTYPE_F32 && c.rope_scaling.factor == 0.0f && !c.attn_bias && !c.mlp_bias);

    // the tied file: vocab from the token list, head_dim from rope.dimension_count,
    // u64/i64/u16 integers, a per-layer head_count array, no context_length
    TEST_OK(q_gguf_open(&g, gguf_path("llama_gqa_tied_q8_0.gguf"), &err), &err);
    TEST_OK(model_config_from_gguf(&c, &g, &err), &err);
    q_gguf_close(&g);
    CU_ASSERT(c.vocab == 320 && c.hidden == 64 && c.intermediate == 160 && c.n_layers == 2 && c.n_heads == 4 &&
              c.n_kv_heads == 2 && c.head_dim == 16 && c.max_position == 2048 && c.tie_embeddings);
}

// Loads a model and runs the fixture batch with its PEFT adapter; logits[N*V] malloc'd.
static float *forward(model *m, const char *path, model_step_result *r) {
    q_err err;
    lora l;
    model_batch b;
    TEST_OK(model_load(m, path, 64, &err), &err);
    TEST_OK(lora_load_peft(&l, m, model_path("adapter"), &err), &err);
    TEST_OK(model_batch_load(&b, model_path("batch.safetensors"), m->cfg.vocab, &err), &err);
    float *logits = malloc((size_t)(b.N * m->cfg.vocab) * sizeof *logits);
    TEST_OK(model_forward(m, &l, &b, logits, r, &err), &err);
    model_batch_free(&b);
    lora_free(&l);
    return logits;
}

static int64_t batch_tokens(void) {
    q_err err;
    model_batch b;
    TEST_OK(model_batch_load(&b, model_path("batch.safetensors"), 1 << 20, &err), &err);
    const int64_t n = b.N;
    model_batch_free(&b);
    return n;
}

static bool nf4_same(const nf4_tensor *x, const nf4_tensor *y) {
    return x->numel == y->numel && x->shape[0] == y->shape[0] && x->shape[1] == y->shape[1] &&
           x->nblocks == y->nblocks && x->nested && y->nested && x->offset == y->offset &&
           memcmp(x->packed, y->packed, (size_t)nf4_packed_bytes(x->numel)) == 0 &&
           memcmp(x->qabsmax, y->qabsmax, (size_t)x->nblocks) == 0 &&
           memcmp(x->nested_absmax, y->nested_absmax, (size_t)((x->nblocks + 255) / 256) * 4) == 0 &&
           memcmp(x->nested_map, y->nested_map, sizeof x->nested_map) == 0;
}

// The F32 GGUF and the fp32 safetensors folder hold the same weights, so once
// the Q/K rows are un-permuted and rope_freqs applied, both loads are
// identical bit for bit, and the model matches PyTorch.
static void test_f32_equals_safetensors(void) {
    q_err err;
    model g, h;
    model_step_result rg, rh;
    float *lg = forward(&g, gguf_path("llama_gqa_f32.gguf"), &rg);
    float *lh = forward(&h, model_path("hf"), &rh);
    const model_config *c = &g.cfg;
    const int64_t V = c->vocab, D = c->hidden, N = batch_tokens();
    CU_ASSERT_FALSE(g.prequantized);
    CU_ASSERT(memcmp(g.embed, h.embed, (size_t)(V * D) * 4) == 0);
    CU_ASSERT(memcmp(g.lm_head, h.lm_head, (size_t)(V * D) * 4) == 0);
    CU_ASSERT(memcmp(g.final_norm, h.final_norm, (size_t)D * 4) == 0);
    // rope_freqs.weight divides theta's frequencies: HF's llama3 inv_freq exactly
    CU_ASSERT(memcmp(g.inv_freq, h.inv_freq, (size_t)(c->head_dim / 2) * 4) == 0);
    int same = 0;
    for (int64_t i = 0; i < c->n_layers; i++) {
        CU_ASSERT(memcmp(g.layers[i].attn_norm, h.layers[i].attn_norm, (size_t)D * 4) == 0);
        CU_ASSERT(memcmp(g.layers[i].mlp_norm, h.layers[i].mlp_norm, (size_t)D * 4) == 0);
        for (int id = 0; id < LIN_COUNT; id++) same += nf4_same(&g.layers[i].w[id], &h.layers[i].w[id]);
    }
    CU_ASSERT_EQUAL(same, c->n_layers * LIN_COUNT);
    CU_ASSERT(memcmp(lg, lh, (size_t)(N * V) * 4) == 0);

    q_st_file expected;
    TEST_OK(q_st_open(&expected, model_path("expected.safetensors"), &err), &err);
    const q_st_tensor *ref = q_st_find(&expected, "logits"), *loss = q_st_find(&expected, "loss");
    CU_ASSERT_FATAL(ref && loss && ref->numel == N * V);
    float *r = malloc((size_t)(N * V) * 4), loss_ref;
    memcpy(r, ref->data, (size_t)(N * V) * 4);
    memcpy(&loss_ref, loss->data, 4);
    const double e = test_rel_err(lg, r, N * V), el = fabs(rg.loss - loss_ref) / fabs(loss_ref);
    CU_ASSERT(e < LOADQ_LOGITS_RTOL);
    CU_ASSERT(el < LOADQ_LOGITS_RTOL);
    printf("\n    F32 GGUF == safetensors load (fp32 arrays, %d NF4 linears, inv_freq, logits); vs torch: logits rel "
           "%.1e, loss %.6f (torch %.6f) ", same, e, rg.loss, (double)loss_ref);
    free(r);
    q_st_close(&expected);
    free(lg);
    free(lh);
    model_free(&g);
    model_free(&h);
}

// gguf-py's quantizers (quants.py quantize_blocks; F16 is numpy's
// astype(float16), round to nearest even), one row of n values at a time:
// the test's own reference for what the fixture files must hold.
static void ref_quantize_row(uint32_t type, const float *x, int64_t n, uint8_t *out) {
    if (type == 0) {
        memcpy(out, x, (size_t)n * 4);
        return;
    }
    if (type == 1) {
        for (int64_t i = 0; i < n; i++) {
            const uint16_t h = q_f32_to_f16(x[i]);
            memcpy(out + 2 * i, &h, 2);
        }
        return;
    }
    for (int64_t b = 0; b < n / 32; b++) {
        const float *v = x + 32 * b;
        if (type == 8) {  // Q8_0: d = amax / 127, q = round-half-away(x / d)
            uint8_t *o = out + 34 * b;
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
            const float d = amax / 127.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
            const uint16_t h = q_f32_to_f16(d);
            memcpy(o, &h, 2);
            for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)(int8_t)roundf(v[j] * id);
        } else {  // Q4_1: d = (max - min) / 15, m = min, q = trunc((x - min) / d + 0.5), nibbles j | j+16
            uint8_t *o = out + 20 * b;
            float lo = v[0], hi = v[0];
            for (int j = 1; j < 32; j++) lo = v[j] < lo ? v[j] : lo, hi = v[j] > hi ? v[j] : hi;
            const float d = (hi - lo) / 15.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
            const uint16_t hd = q_f32_to_f16(d), hm = q_f32_to_f16(lo);
            memcpy(o, &hd, 2);
            memcpy(o + 2, &hm, 2);
            uint8_t q[32];
            for (int j = 0; j < 32; j++) {
                const float t = truncf((v[j] - lo) * id + 0.5f);
                q[j] = (uint8_t)(t > 15.0f ? 15.0f : t);
            }
            for (int j = 0; j < 16; j++) o[4 + j] = (uint8_t)(q[j] | q[j + 16] << 4);
        }
    }
}

// HF row r of attn_q/attn_k is GGUF row perm_row(r) (gguf.md 3.8); other rows stay.
static int64_t perm_row(int64_t r, int64_t hd) {
    const int64_t h = r / hd, c = r % hd;
    return c < hd / 2 ? h * hd + 2 * c : h * hd + 2 * (c - hd / 2) + 1;
}

// One GGUF tensor against the HF weight it came from: every row of the file
// must be gguf-py's quantization of the matching HF row. Returns the HF
// weight round-tripped through the file's type (what the loader must see), [rows*in].
static float *check_rows(const q_gguf *g, const char *gname, const q_st_model *hf, const char *hname, int64_t hd,
                         int64_t *rows_differ) {
    q_err err;
    const q_gguf_tensor *t = q_gguf_find_tensor(g, gname);
    const q_st_tensor *w = q_st_model_find(hf, hname);
    CU_ASSERT_FATAL(t && w && w->dtype == Q_DTYPE_F32 && w->numel == t->numel && w->shape[1] == t->ne[0]);
    const int64_t rows = w->shape[0], in = w->shape[1];
    int64_t block, bytes;
    CU_ASSERT_FATAL(q_gguf_type_info(t->type, &block, &bytes));
    const size_t row_bytes = (size_t)(in / block * bytes);
    float *x = malloc((size_t)in * 4), *rt = malloc((size_t)(rows * in) * 4);
    uint8_t *q = malloc(row_bytes);
    for (int64_t r = 0; r < rows; r++) {
        memcpy(x, (const float *)w->data + r * in, (size_t)in * 4);
        ref_quantize_row(t->type, x, in, q);
        const int64_t fr = hd ? perm_row(r, hd) : r;
        *rows_differ += memcmp(q, (const uint8_t *)t->data + (size_t)fr * row_bytes, row_bytes) != 0;
        TEST_OK(q_gguf_dequantize(t->type, q, in, rt + r * in, &err), &err);
    }
    free(x);
    free(q);
    return rt;
}

// F16, Q8_0 and Q4_1 files: each holds gguf-py's quantization of the HF
// weights (checked row by row against the test's own quantizers), and the
// loaded model equals the HF weights round-tripped through that type, then
// NF4-quantized, bit for bit. The logits then differ from the F32 file's by
// what two stacked quantizations do to this random model (see the bounds above).
static void test_quantized_files(void) {
    const struct { const char *file; uint32_t linear, output; double tol; } files[] = {
        {"llama_gqa_f16.gguf", 1, 1, F16_LOGITS_RTOL},
        {"llama_gqa_q8_0.gguf", 8, 8, Q8_0_LOGITS_RTOL},
        {"llama_gqa_q4_1.gguf", 3, 8, Q4_1_LOGITS_RTOL},
    };
    q_err err;
    q_st_model hf;
    TEST_OK(q_st_model_open(&hf, model_path("hf"), &err), &err);
    model f;
    model_step_result rf;
    float *lf = forward(&f, gguf_path("llama_gqa_f32.gguf"), &rf);
    const model_config *c = &f.cfg;
    const int64_t n = batch_tokens() * c->vocab;
    const char *const hf_linear[LIN_COUNT] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
    const char *const gguf_linear[LIN_COUNT] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                "ffn_gate", "ffn_up", "ffn_down"};
    for (size_t k = 0; k < sizeof files / sizeof files[0]; k++) {
        q_gguf g;
        TEST_OK(q_gguf_open(&g, gguf_path(files[k].file), &err), &err);
        for (size_t i = 0; i < g.n_tensors; i++) {  // the types the fixture script chose
            const q_gguf_tensor *t = &g.tensors[i];
            CU_ASSERT_EQUAL(t->type, t->n_dims == 1 ? 0u : strcmp(t->name, "output.weight") ? files[k].linear
                                                                                             : files[k].output);
        }
        model m;
        model_step_result r;
        float *l = forward(&m, gguf_path(files[k].file), &r);
        int64_t rows_differ = 0;
        int same = 0, codes_kept = 0;
        float *e = check_rows(&g, "token_embd.weight", &hf, "model.embed_tokens.weight", 0, &rows_differ);
        float *o = check_rows(&g, "output.weight", &hf, "lm_head.weight", 0, &rows_differ);
        CU_ASSERT(memcmp(e, m.embed, (size_t)(c->vocab * c->hidden) * 4) == 0);
        CU_ASSERT(memcmp(o, m.lm_head, (size_t)(c->vocab * c->hidden) * 4) == 0);
        free(e);
        free(o);
        int64_t codes = 0;
        for (int64_t i = 0; i < c->n_layers; i++)
            for (int id = 0; id < LIN_COUNT; id++) {
                char gname[64], hname[96];
                snprintf(gname, sizeof gname, "blk.%lld.%s.weight", (long long)i, gguf_linear[id]);
                snprintf(hname, sizeof hname, "model.layers.%lld.%s.weight", (long long)i, hf_linear[id]);
                const int64_t hd = id == LIN_Q || id == LIN_K ? c->head_dim : 0;
                float *w = check_rows(&g, gname, &hf, hname, hd, &rows_differ);
                const nf4_tensor *got = &m.layers[i].w[id], *f32 = &f.layers[i].w[id];
                nf4_tensor want;
                TEST_OK(nf4_tensor_quantize(&want, w, Q_DTYPE_F32, 2, got->shape, NF4_QTYPE_NF4, 64, true, &err),
                        &err);
                same += nf4_same(&want, got);
                for (int64_t b = 0; b < nf4_packed_bytes(got->numel); b++)  // 4-bit codes kept from the F32 file
                    codes_kept += (got->packed[b] >> 4) == (f32->packed[b] >> 4),
                        codes_kept += (got->packed[b] & 15) == (f32->packed[b] & 15);
                codes += 2 * nf4_packed_bytes(got->numel);
                nf4_tensor_free(&want);
                free(w);
            }
        CU_ASSERT_EQUAL(rows_differ, 0);
        CU_ASSERT_EQUAL(same, c->n_layers * LIN_COUNT);
        const double err_logits = test_rel_err(l, lf, n);
        CU_ASSERT(err_logits < files[k].tol);
        printf("\n    %-20s rows == gguf-py's quantization of HF, model == HF round-tripped (%d linears); "
               "%.1f%% NF4 codes as from F32; logits rel %.2f vs the F32 file (bound %.2f), loss %.4f (F32 %.4f) ",
               files[k].file, same, 100.0 * codes_kept / (double)codes, err_logits, files[k].tol, r.loss, rf.loss);
        free(l);
        model_free(&m);
        q_gguf_close(&g);
    }
    free(lf);
    model_free(&f);
    q_st_model_close(&hf);
}

// The tied file is the Q8_0 file without output.weight: its logits are the
// Q8_0 model's with token_embd as lm_head, bit for bit.
static void test_tied(void) {
    model t, q;
    model_step_result rt, rq;
    float *lt = forward(&t, gguf_path("llama_gqa_tied_q8_0.gguf"), &rt);
    CU_ASSERT(t.cfg.tie_embeddings);
    CU_ASSERT_PTR_EQUAL(t.lm_head, t.embed);
    q_err err;
    TEST_OK(model_load(&q, gguf_path("llama_gqa_q8_0.gguf"), 64, &err), &err);
    float *own_head = q.lm_head;
    q.lm_head = q.embed;
    lora l;
    model_batch b;
    TEST_OK(lora_load_peft(&l, &q, model_path("adapter"), &err), &err);
    TEST_OK(model_batch_load(&b, model_path("batch.safetensors"), q.cfg.vocab, &err), &err);
    float *lq = malloc((size_t)(b.N * q.cfg.vocab) * sizeof *lq);
    TEST_OK(model_forward(&q, &l, &b, lq, &rq, &err), &err);
    CU_ASSERT(memcmp(lt, lq, (size_t)(b.N * q.cfg.vocab) * 4) == 0);
    CU_ASSERT(memcmp(&rt.loss, &rq.loss, sizeof rt.loss) == 0);
    q.lm_head = own_head;
    free(lt);
    free(lq);
    model_batch_free(&b);
    lora_free(&l);
    model_free(&t);
    model_free(&q);
}

// ----------------------------------------------------------------------------
// corrupt files: made by mutating the good ones

typedef struct blob {
    uint8_t *data;
    size_t size;
} blob;

static blob blob_read(const char *path) {
    blob b = {0};
    q_err err;
    char *data;
    TEST_OK(q_file_read(path, &data, &b.size, &err), &err);
    b.data = (uint8_t *)data;
    return b;
}

// Offset of a length-prefixed GGUF string (u64 length + bytes) in b.
static size_t find_string(const blob *b, const char *s) {
    const size_t n = strlen(s);
    uint8_t pat[128];
    const uint64_t len = n;
    memcpy(pat, &len, 8);
    memcpy(pat + 8, s, n);
    for (size_t i = 0; i + 8 + n <= b->size; i++)
        if (memcmp(b->data + i, pat, 8 + n) == 0) return i;
    CU_FAIL_FATAL("pattern not found");
    return 0;
}

// Offset just past a length-prefixed key or tensor name.
static size_t after_string(const blob *b, const char *s) { return find_string(b, s) + 8 + strlen(s); }

static void put32(blob *b, size_t at, uint32_t v) { memcpy(b->data + at, &v, 4); }
static void put64(blob *b, size_t at, uint64_t v) { memcpy(b->data + at, &v, 8); }

// Writes b[0..size) to dir/name and returns the path (static buffer).
static const char *blob_write(const blob *b, size_t size, const char *dir, const char *name) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    CU_ASSERT_FATAL(f != NULL);
    CU_ASSERT_FATAL(fwrite(b->data, 1, size, f) == size);
    fclose(f);
    return path;
}

// q_gguf_open of b (cut to `size`) fails with a message naming the file and `want`.
static void expect_open_error(const blob *b, size_t size, const char *dir, const char *want) {
    const char *path = blob_write(b, size, dir, "bad.gguf");
    q_err err = {{0}};
    q_gguf g;
    const int rc = q_gguf_open(&g, path, &err);
    CU_ASSERT_EQUAL(rc, -1);
    if (rc == 0) {
        fprintf(stderr, "\n  opened a file that should fail with \"%s\"", want);
        q_gguf_close(&g);
        return;
    }
    CU_ASSERT(contains(err.msg, path));
    CU_ASSERT(contains(err.msg, want));
}

static void expect_load_error(const blob *b, const char *dir, const char *want) {
    const char *path = blob_write(b, b->size, dir, "bad.gguf");
    q_err err = {{0}};
    model m;
    CU_ASSERT_EQUAL_FATAL(model_load(&m, path, 64, &err), -1);
    CU_ASSERT(contains(err.msg, path));
    CU_ASSERT(contains(err.msg, want));
}

static void test_corrupt_files(void) {
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    blob good = blob_read(gguf_path("types.gguf"));
    blob b = {malloc(good.size), good.size};
#define RESET() memcpy(b.data, good.data, good.size)

    q_err err;
    q_gguf g;
    CU_ASSERT_EQUAL(q_gguf_open(&g, dir, &err), -1);
    CU_ASSERT(contains(err.msg, "not a regular file"));
    CU_ASSERT_EQUAL(q_gguf_open(&g, gguf_path("nope.gguf"), &err), -1);
    CU_ASSERT(contains(err.msg, "nope.gguf: cannot open: No such file"));
    RESET();
    expect_open_error(&b, 0, dir, "not a GGUF file");
    expect_open_error(&b, 3, dir, "not a GGUF file");
    b.data[0] = 'X';
    expect_open_error(&b, b.size, dir, "not a GGUF file (the first bytes are 58 47 55 46");
    RESET();
    expect_open_error(&b, 10, dir, "truncated");
    put32(&b, 4, 1);
    expect_open_error(&b, b.size, dir, "GGUF version 1 is not supported");
    put32(&b, 4, 0x03000000);
    expect_open_error(&b, b.size, dir, "big-endian");
    RESET();
    put64(&b, 8, 1ull << 60);
    expect_open_error(&b, b.size, dir, "tensor count 1152921504606846976 is impossible");
    RESET();
    put64(&b, 16, 1ull << 60);
    expect_open_error(&b, b.size, dir, "metadata count 1152921504606846976 is impossible");

    // metadata
    RESET();
    put64(&b, find_string(&b, "general.architecture"), 1ull << 40);
    expect_open_error(&b, b.size, dir, "runs past the end of the file");
    RESET();
    put32(&b, after_string(&b, "test.u8"), 13);
    expect_open_error(&b, b.size, dir, "key \"test.u8\": unknown value type 13");
    RESET();
    put32(&b, after_string(&b, "test.strings") + 4, 9);
    expect_open_error(&b, b.size, dir, "arrays of arrays are not supported");
    RESET();
    put64(&b, after_string(&b, "test.u16s") + 8, 1ull << 61);
    expect_open_error(&b, b.size, dir, "cannot fit");
    RESET();
    put64(&b, after_string(&b, "test.strings") + 8, 1ull << 61);
    expect_open_error(&b, b.size, dir, "cannot fit");
    RESET();
    memcpy(b.data + find_string(&b, "test.u16") + 8, "test.i16", 8);
    expect_open_error(&b, b.size, dir, "duplicate metadata key \"test.i16\"");
    RESET();
    b.data[find_string(&b, "test.u32") + 12] = 0;
    expect_open_error(&b, b.size, dir, "contains a NUL byte");
    RESET();
    put32(&b, after_string(&b, "general.alignment") + 4, 48);
    expect_open_error(&b, b.size, dir, "general.alignment = 48 is not a power of two");
    RESET();
    put32(&b, after_string(&b, "general.alignment"), 5);  // i32
    expect_open_error(&b, b.size, dir, "general.alignment must be a u32, found i32");

    // tensor infos: name, n_dims, ne[n_dims], type, offset
    RESET();
    put32(&b, after_string(&b, "q8_0"), 5);
    expect_open_error(&b, b.size, dir, "tensor \"q8_0\" has 5 dimensions (at most 4)");
    RESET();
    put64(&b, after_string(&b, "f16") + 4 + 8, 1ull << 63);
    expect_open_error(&b, b.size, dir, "tensor \"f16\": dimension 1 is negative");
    RESET();
    put64(&b, after_string(&b, "f32") + 4, 1ull << 40);
    put64(&b, after_string(&b, "f32") + 12, 1ull << 40);
    expect_open_error(&b, b.size, dir, "tensor \"f32\": the element count overflows");
    RESET();
    put32(&b, after_string(&b, "q8_0") + 4 + 16, 4);
    expect_open_error(&b, b.size, dir, "tensor \"q8_0\" has unknown ggml type 4");
    RESET();
    put32(&b, after_string(&b, "q8_0") + 4 + 16, 14);  // Q6_K on rows of 64
    expect_open_error(&b, b.size, dir, "ne[0] = 64 is not a multiple of the Q6_K block size 256");
    RESET();
    const size_t q8_offset_at = after_string(&b, "q8_0") + 4 + 16 + 4;
    uint64_t q8_offset;
    memcpy(&q8_offset, b.data + q8_offset_at, 8);
    char want[256];
    put64(&b, q8_offset_at, q8_offset + 64);
    snprintf(want, sizeof want, "tensor \"q8_0\": offset %llu, expected %llu (the padded sizes of the tensors before it)",
             (unsigned long long)q8_offset + 64, (unsigned long long)q8_offset);
    expect_open_error(&b, b.size, dir, want);
    put64(&b, q8_offset_at, q8_offset + 1);
    snprintf(want, sizeof want, "offset %llu is not a multiple of the alignment 64", (unsigned long long)q8_offset + 1);
    expect_open_error(&b, b.size, dir, want);
    RESET();
    memcpy(b.data + find_string(&b, "q4_0") + 8, "q4_1", 4);
    expect_open_error(&b, b.size, dir, "duplicate tensor name \"q4_1\"");
    RESET();
    put64(&b, after_string(&b, "q8_0") + 4 + 8, 1ull << 40);  // 2^40 rows
    expect_open_error(&b, b.size, dir, "cannot fit in a file of");

    // truncated: inside the KVs, inside the tensor infos, inside the data
    RESET();
    expect_open_error(&b, 100, dir, "tensor count 9 is impossible for a file of 100 bytes");
    expect_open_error(&b, 300, dir, "truncated: ");
    expect_open_error(&b, after_string(&b, "f32") + 6, dir, "truncated: the info of tensor \"f32\" needs 8 bytes");
    expect_open_error(&b, after_string(&b, "q4_1") + 6, dir, "tensor \"f16\": 192 bytes of data at offset 768 "
                      "cannot fit in a file of");
    snprintf(want, sizeof want, "lies outside the file (%zu bytes", b.size - 100);
    expect_open_error(&b, b.size - 100, dir, want);

    // no crash, whatever the cut: every prefix of the file opens only when
    // it keeps all of the last tensor's data (its trailing padding is optional)
    TEST_OK(q_gguf_open(&g, gguf_path("types.gguf"), &err), &err);
    const q_gguf_tensor *last = &g.tensors[g.n_tensors - 1];
    const size_t data_end = (size_t)((const uint8_t *)last->data - g.map) + last->nbytes;
    q_gguf_close(&g);
    int opened = 0;
    for (size_t cut = 0; cut < good.size; cut++) {
        const char *path = blob_write(&good, cut, dir, "cut.gguf");
        if (q_gguf_open(&g, path, &err) == 0) opened++, q_gguf_close(&g);
        else CU_ASSERT(strstr(err.msg, path) != NULL);
    }
    CU_ASSERT_EQUAL(opened, (int)(good.size - data_end));
    // and random byte flips in the header and infos: open or fail cleanly
    uint64_t rng = 42;
    const size_t header = after_string(&good, "q8_0") + 32;  // through the last tensor info
    for (int k = 0; k < 2000; k++) {
        RESET();
        for (int f = 0; f < 3; f++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            b.data[(rng >> 8) % header] ^= (uint8_t)(1u << (rng & 7));
        }
        const char *path = blob_write(&b, b.size, dir, "flip.gguf");
        if (q_gguf_open(&g, path, &err) == 0) {
            float *y = malloc(4096 * sizeof *y);
            for (size_t i = 0; i < g.n_tensors; i++)  // the data pointers must be usable
                if (g.tensors[i].numel <= 4096 && q_gguf_type_info(g.tensors[i].type, NULL, NULL))
                    q_gguf_dequantize(g.tensors[i].type, g.tensors[i].data, g.tensors[i].numel, y, &err);
            free(y);
            q_gguf_close(&g);
        } else {
            CU_ASSERT(strstr(err.msg, path) != NULL);
        }
    }
    free(b.data);
    free(good.data);

    // model-level problems in a well-formed file (the Q4_1 model, 91 KB)
    good = blob_read(gguf_path("llama_gqa_q4_1.gguf"));
    b = (blob){malloc(good.size), good.size};
    TEST_OK(q_gguf_open(&g, gguf_path("llama_gqa_q4_1.gguf"), &err), &err);
    const size_t norm_data = (size_t)((const uint8_t *)q_gguf_find_tensor(&g, "output_norm.weight")->data - g.map);
    const size_t rope_data = (size_t)((const uint8_t *)q_gguf_find_tensor(&g, "rope_freqs.weight")->data - g.map);
    q_gguf_close(&g);
    RESET();
    memcpy(b.data + find_string(&b, "llama") + 8, "gemma", 5);
    expect_load_error(&b, dir, "architecture \"gemma\" is not supported (supported GGUF architectures: llama)");
    RESET();
    put32(&b, after_string(&b, "llama.feed_forward_length") + 4, 128);
    expect_load_error(&b, dir, "tensor blk.0.ffn_gate.weight has ne [64, 160], expected [64, 128] (inputs, outputs)");
    RESET();
    put32(&b, after_string(&b, "llama.attention.head_count") + 4, 3);
    expect_load_error(&b, dir, "head_count (3) must be a multiple of head_count_kv (2)");
    RESET();
    put32(&b, after_string(&b, "llama.attention.value_length") + 4, 8);
    expect_load_error(&b, dir, "value_length 8 differs from key_length 16: not supported");
    RESET();
    put32(&b, after_string(&b, "llama.rope.dimension_count") + 4, 8);
    expect_load_error(&b, dir, "llama.rope.dimension_count 8 differs from the head dimension 16 (partial rotary)");
    RESET();
    put32(&b, after_string(&b, "llama.attention.layer_norm_rms_epsilon"), 8);  // f32 -> string
    expect_open_error(&b, b.size, dir, "runs past the end of the file");  // its bits read as a string length
    RESET();
    put32(&b, after_string(&b, "llama.block_count"), 6);  // u32 -> f32
    expect_load_error(&b, dir, "key \"llama.block_count\" is a f32, expected an integer");
    RESET();
    b.data[find_string(&b, "output_norm.weight") + 8 + 10] = 'X';  // output_norX.weight
    expect_load_error(&b, dir, "missing tensor output_norm.weight");
    RESET();
    put32(&b, after_string(&b, "output_norm.weight") + 4 + 8, 26);  // F32 -> I32, same size
    expect_load_error(&b, dir, "tensor output_norm.weight has ggml type I32, which qlora cannot read");
    RESET();
    put32(&b, norm_data + 4 * 5, 0x7fc00000u);
    expect_load_error(&b, dir, "tensor output_norm.weight: element 5 is not finite");
    RESET();
    put32(&b, rope_data + 4 * 3, 0xbf800000u);  // -1
    expect_load_error(&b, dir, "rope_freqs.weight[3] = -1 must be positive");
#undef RESET
    free(b.data);
    free(good.data);
    test_rmtree(dir);
    free(dir);
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("gguf", NULL, NULL);
    CU_add_test(s, "metadata, getters, tensor infos", test_metadata);
    CU_add_test(s, "hand-built Q4_0/Q4_1/Q8_0 blocks", test_dequant_blocks);
    CU_add_test(s, "dequantize == gguf-py, bit for bit", test_dequant_vs_gguf_py);
    CU_add_test(s, "llama config from GGUF keys", test_config);
    CU_add_test(s, "F32 GGUF == fp32 safetensors, and PyTorch", test_f32_equals_safetensors);
    CU_add_test(s, "F16 / Q8_0 / Q4_1 files", test_quantized_files);
    CU_add_test(s, "tied embeddings", test_tied);
    CU_add_test(s, "corrupt files", test_corrupt_files);
    return test_main();
}
