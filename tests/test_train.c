// tests/test_train.c: bnb-4bit checkpoints and the quantize / inspect /
// dequantize commands, run as a user runs them (the real binary).
#define _GNU_SOURCE
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "test_util.h"
#include "train/train.h"

// ----------------------------------------------------------------------------
// quant_state JSON: the bytes bitsandbytes wrote for every fixture case

static void test_quant_state_json(void) {
    q_st_file f;
    q_err err;
    TEST_OK(q_st_open(&f, test_fixture("nf4_bnb.safetensors"), &err), &err);
    int n = atoi(q_st_meta(&f, "cases")), same = 0;
    for (int k = 0; k < n; k++) {
        char key[64];
        snprintf(key, sizeof key, "c%d.input", k);
        const q_st_tensor *in = q_st_find(&f, key);
        snprintf(key, sizeof key, "c%d.offset", k);
        const q_st_tensor *off = q_st_find(&f, key);
        snprintf(key, sizeof key, "c%d.quant_state", k);
        const q_st_tensor *qs = q_st_find(&f, key);
        snprintf(key, sizeof key, "c%d", k);
        q_json *meta;
        const char *m = q_st_meta(&f, key);
        TEST_OK(q_json_parse(m, strlen(m), &meta, &err), &err);
        nf4_tensor t = {.dtype = in->dtype, .ndim = in->ndim, .nested = true};
        memcpy(t.shape, in->shape, sizeof t.shape);
        nf4_qtype_from_name(q_json_get(meta, "qtype")->string, &t.qtype);
        t.blocksize = q_json_get(meta, "blocksize")->integer;
        memcpy(&t.offset, off->data, 4);
        q_buf b = {0};
        CU_ASSERT_EQUAL(bnb4_quant_state_json(&t, &b), 0);
        bool eq = b.len == qs->nbytes && memcmp(b.data, qs->data, b.len) == 0;
        if (!eq) printf("\n    case %d: ours %s\n    theirs %.*s", k, b.data, (int)qs->nbytes, (const char *)qs->data);
        CU_ASSERT(eq);
        same += eq;
        q_buf_free(&b);
        q_json_free(meta);
    }
    printf("\n    %d/%d quant_state JSON byte-identical ", same, n);
    q_st_close(&f);
}

// ----------------------------------------------------------------------------
// a tiny Llama-shaped HF folder, written by the test

static const char *bin(void) {
    const char *b = getenv("QLORA_BIN");
    return b ? b : "./qlora";
}

// Runs a shell command, returns its exit status; output goes to *out (malloc'd).
static int run(char **out, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>&1", sizeof cmd - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    q_buf b = {0};
    char chunk[4096];
    size_t n;
    while (p && (n = fread(chunk, 1, sizeof chunk, p)) > 0) q_buf_append(&b, chunk, n);
    int st = p ? pclose(p) : -1;
    q_buf_append(&b, "", 0);
    if (out) *out = b.data;
    else q_buf_free(&b);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

typedef struct tiny_model {
    char *dir;
    float *w[12];  // fp32 values of each weight, as stored in bf16
    q_st_entry e[12];
    int n;
} tiny_model;

static void tiny_add(tiny_model *m, const char *name, int64_t d0, int64_t d1, uint64_t *rng) {
    int64_t n = d0 * (d1 ? d1 : 1);
    float *w = malloc(n * 4);
    uint16_t *h = malloc(n * 2);
    for (int64_t i = 0; i < n; i++) {
        h[i] = q_f32_to_bf16(0.02f * test_normal(rng));
        w[i] = q_bf16_to_f32(h[i]);
    }
    m->w[m->n] = w;
    m->e[m->n] = (q_st_entry){.name = strdup(name), .dtype = Q_DTYPE_BF16, .ndim = d1 ? 2 : 1,
                              .shape = {d0, d1}, .data = h};
    m->n++;
}

static void tiny_make(tiny_model *m, bool with_nan) {
    memset(m, 0, sizeof *m);
    m->dir = test_tmpdir();
    uint64_t rng = 99;
    tiny_add(m, "model.embed_tokens.weight", 64, 96, &rng);
    tiny_add(m, "model.layers.0.input_layernorm.weight", 96, 0, &rng);
    tiny_add(m, "model.layers.0.self_attn.q_proj.weight", 96, 96, &rng);
    tiny_add(m, "model.layers.0.self_attn.k_proj.weight", 32, 96, &rng);
    tiny_add(m, "model.layers.0.self_attn.v_proj.weight", 32, 96, &rng);
    tiny_add(m, "model.layers.0.self_attn.o_proj.weight", 96, 96, &rng);
    tiny_add(m, "model.layers.0.mlp.gate_proj.weight", 160, 96, &rng);
    tiny_add(m, "model.layers.0.mlp.up_proj.weight", 160, 96, &rng);
    tiny_add(m, "model.layers.0.mlp.down_proj.weight", 96, 160, &rng);
    tiny_add(m, "model.norm.weight", 96, 0, &rng);
    tiny_add(m, "lm_head.weight", 64, 96, &rng);
    if (with_nan) ((uint16_t *)m->e[7].data)[123] = 0x7fc0;
    char path[4096];
    q_err err;
    snprintf(path, sizeof path, "%s/model.safetensors", m->dir);
    CU_ASSERT_EQUAL(q_st_write(path, m->e, m->n, NULL, NULL, 0, &err), 0);
    const char *cfg = "{\n  \"architectures\": [\"LlamaForCausalLM\"],\n  \"hidden_size\": 96,\n"
                      "  \"torch_dtype\": \"bfloat16\"\n}\n";
    snprintf(path, sizeof path, "%s/config.json", m->dir);
    CU_ASSERT_EQUAL(q_file_write_atomic(path, cfg, strlen(cfg), &err), 0);
    snprintf(path, sizeof path, "%s/tokenizer.json", m->dir);
    CU_ASSERT_EQUAL(q_file_write_atomic(path, "{\"model\": {}}", 13, &err), 0);
}

static void tiny_free(tiny_model *m) {
    for (int i = 0; i < m->n; i++) {
        free(m->w[i]);
        free((void *)m->e[i].name);
        free((void *)m->e[i].data);
    }
    test_rmtree(m->dir);
    free(m->dir);
}

// Every linear weight of the output dequantizes to exactly what quantizing the
// input in-process gives; everything else is copied bit for bit.
static void check_quantized(const tiny_model *m, const char *out_dir, int64_t bs, bool nested) {
    q_st_model q;
    q_err err;
    TEST_OK(q_st_model_open(&q, out_dir, &err), &err);
    for (int i = 0; i < m->n; i++) {
        const q_st_entry *e = &m->e[i];
        const bool linear = e->ndim == 2 && strstr(e->name, "layers.") != NULL;
        CU_ASSERT_EQUAL(bnb4_is_quantized(&q, e->name), linear);
        const int64_t n = e->shape[0] * (e->ndim == 2 ? e->shape[1] : 1);
        if (!linear) {
            const q_st_tensor *t = q_st_model_find(&q, e->name);
            CU_ASSERT_FATAL(t != NULL);
            CU_ASSERT_EQUAL(t->dtype, Q_DTYPE_BF16);
            CU_ASSERT_EQUAL(memcmp(t->data, e->data, n * 2), 0);
            continue;
        }
        nf4_tensor got, want;
        TEST_OK(bnb4_load(&q, e->name, &got, &err), &err);
        TEST_OK(nf4_tensor_quantize(&want, e->data, e->dtype, 2, e->shape, NF4_QTYPE_NF4, bs, nested, &err), &err);
        CU_ASSERT_EQUAL(got.nested, nested);
        CU_ASSERT_EQUAL(got.dtype, Q_DTYPE_BF16);
        CU_ASSERT_EQUAL(got.shape[0], e->shape[0]);
        CU_ASSERT_EQUAL(got.shape[1], e->shape[1]);
        CU_ASSERT_EQUAL(memcmp(got.packed, want.packed, nf4_packed_bytes(n)), 0);
        uint16_t *a = malloc(n * 2), *b = malloc(n * 2);
        nf4_view va = nf4_tensor_view(&got), vb = nf4_tensor_view(&want);
        TEST_OK(nf4_dequantize(&va, a, Q_DTYPE_BF16, &err), &err);
        TEST_OK(nf4_dequantize(&vb, b, Q_DTYPE_BF16, &err), &err);
        CU_ASSERT_EQUAL(memcmp(a, b, n * 2), 0);
        // and the values are a faithful 4-bit copy of the input
        double num = 0, den = 0;
        for (int64_t k = 0; k < n; k++) {
            double d = q_bf16_to_f32(a[k]) - m->w[i][k];
            num += d * d;
            den += (double)m->w[i][k] * m->w[i][k];
        }
        CU_ASSERT(sqrt(num / den) < 0.12);  // NF4 on Gaussian weights: ~0.09 relative RMS error
        free(a), free(b);
        nf4_tensor_free(&got);
        nf4_tensor_free(&want);
    }
    q_st_model_close(&q);
}

static void test_quantize_command(void) {
    tiny_model m;
    tiny_make(&m, false);
    char out[4200], *log = NULL, path[4300];
    snprintf(out, sizeof out, "%s/q", m.dir);
    int rc = run(&log, "%s quantize %s %s", bin(), m.dir, out);
    if (rc) printf("\n%s", log);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    free(log);
    check_quantized(&m, out, 64, true);

    // config.json keeps the original keys and gains quantization_config
    char *cfg;
    size_t len;
    q_err err;
    q_json *j;
    snprintf(path, sizeof path, "%s/config.json", out);
    TEST_OK(q_file_read(path, &cfg, &len, &err), &err);
    TEST_OK(q_json_parse(cfg, len, &j, &err), &err);
    const q_json *qc = q_json_get(j, "quantization_config");
    CU_ASSERT_FATAL(qc != NULL);
    CU_ASSERT_STRING_EQUAL(q_json_get(qc, "quant_method")->string, "bitsandbytes");
    CU_ASSERT_STRING_EQUAL(q_json_get(qc, "bnb_4bit_quant_type")->string, "nf4");
    CU_ASSERT_EQUAL(q_json_get(qc, "bnb_4bit_use_double_quant")->boolean, true);
    CU_ASSERT_EQUAL(q_json_get(qc, "load_in_4bit")->boolean, true);
    CU_ASSERT_STRING_EQUAL(q_json_get(j, "torch_dtype")->string, "bfloat16");
    q_json_free(j);
    free(cfg);
    snprintf(path, sizeof path, "%s/tokenizer.json", out);
    CU_ASSERT(q_path_exists(path));

    // quantizing twice is refused
    char out2[4300];
    snprintf(out2, sizeof out2, "%s/qq", m.dir);
    CU_ASSERT_NOT_EQUAL(run(&log, "%s quantize %s %s", bin(), out, out2), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "already quantized"));
    free(log);

    // inspect: logical parameter counts, and bits per 4-bit weight computed here from the
    // layout (packed nibbles, one 8-bit code per block of 64, one fp32 per 256 blocks)
    CU_ASSERT_EQUAL(run(&log, "%s inspect %s", bin(), out), 0);
    int64_t lin = 0, all = 0, qbytes = 0;
    for (int i = 0; i < m.n; i++) {
        int64_t n = m.e[i].shape[0] * (m.e[i].ndim == 2 ? m.e[i].shape[1] : 1);
        all += n;
        if (m.e[i].ndim == 2 && strstr(m.e[i].name, "layers.")) {
            lin += n;
            qbytes += (n + 1) / 2 + (n + 63) / 64 + 4 * (((n + 63) / 64 + 255) / 256);
        }
    }
    char want[160];
    snprintf(want, sizeof want, "parameters: %lld", (long long)all);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, want));
    snprintf(want, sizeof want, "7 tensors, %lld parameters, %.3f bits per parameter", (long long)lin,
             qbytes * 8.0 / lin);
    if (!strstr(log, want)) printf("\n  want: %s\n%s", want, log);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, want));
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "model.layers.0.mlp.down_proj.weight"));
    free(log);

    // dequantize: the 4-bit weights come back in bf16 with their shapes
    snprintf(path, sizeof path, "%s/deq.safetensors", m.dir);
    CU_ASSERT_EQUAL(run(&log, "%s dequantize %s %s", bin(), out, path), 0);
    free(log);
    q_st_file f;
    TEST_OK(q_st_open(&f, path, &err), &err);
    CU_ASSERT_EQUAL(f.n_tensors, (size_t)m.n);
    const q_st_tensor *d = q_st_find(&f, "model.layers.0.mlp.down_proj.weight");
    CU_ASSERT_FATAL(d != NULL);
    CU_ASSERT_EQUAL(d->dtype, Q_DTYPE_BF16);
    CU_ASSERT_EQUAL(d->shape[0], 96);
    CU_ASSERT_EQUAL(d->shape[1], 160);
    q_st_close(&f);
    tiny_free(&m);
}

static void test_quantize_options_and_shards(void) {
    tiny_model m;
    tiny_make(&m, false);
    char out[4200], *log, path[4300];
    snprintf(out, sizeof out, "%s/q", m.dir);
    int rc = run(&log, "%s quantize %s %s --blocksize 128 --no-double-quant --max-shard-size 20000", bin(), m.dir,
                 out);
    if (rc) printf("\n%s", log);
    CU_ASSERT_EQUAL_FATAL(rc, 0);
    free(log);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", out);
    CU_ASSERT(q_path_exists(path));
    q_st_model sm;
    q_err err;
    TEST_OK(q_st_model_open(&sm, out, &err), &err);
    CU_ASSERT(sm.n_files > 1);
    q_st_model_close(&sm);
    check_quantized(&m, out, 128, false);
    CU_ASSERT_EQUAL(run(&log, "%s inspect %s --summary", bin(), out), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "4.250 bits per parameter"));  // 4 + 32/128
    free(log);
    tiny_free(&m);
}

static void test_quantize_errors(void) {
    char *log;
    CU_ASSERT_NOT_EQUAL(run(&log, "%s quantize /nonexistent/model /tmp/x", bin()), 0);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "/nonexistent/model"));
    free(log);
    tiny_model m;
    tiny_make(&m, false);
    CU_ASSERT_EQUAL(run(&log, "%s quantize %s %s/q --blocksize 48", bin(), m.dir, m.dir), 2);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "--blocksize 48"));
    free(log);
    CU_ASSERT_EQUAL(run(&log, "%s quantize %s %s/q --bogus 1", bin(), m.dir, m.dir), 2);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "unknown option --bogus"));
    free(log);
    // a truncated weights file names the file
    char path[4300];
    snprintf(path, sizeof path, "%s/model.safetensors", m.dir);
    CU_ASSERT_EQUAL(truncate(path, 1000), 0);
    CU_ASSERT_EQUAL(run(&log, "%s quantize %s %s/q", bin(), m.dir, m.dir), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "model.safetensors"));
    free(log);
    CU_ASSERT_EQUAL(run(&log, "%s inspect %s", bin(), path), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "model.safetensors"));
    free(log);
    tiny_free(&m);
    // a NaN weight names the tensor and refuses
    tiny_make(&m, true);
    CU_ASSERT_EQUAL(run(&log, "%s quantize %s %s/q", bin(), m.dir, m.dir), 1);
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "model.layers.0.mlp.up_proj.weight"));
    CU_ASSERT_PTR_NOT_NULL(strstr(log, "non-finite"));
    free(log);
    tiny_free(&m);
}

// A checkpoint whose quant_state disagrees with its tensors is refused, not misread.
static void test_bnb4_load_errors(void) {
    uint8_t packed[32] = {0}, qabs[1] = {0};
    float nabs[1] = {0}, map[256] = {0}, qmap[16] = {0};
    const char *qs = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [4, 32], "
                     "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}";
    q_st_entry e[6] = {
        {"w", Q_DTYPE_U8, 2, {32, 1}, packed},  // 4*32 = 128 elements need 64 bytes: wrong
        {"w.absmax", Q_DTYPE_U8, 1, {1}, qabs},
        {"w.nested_absmax", Q_DTYPE_F32, 1, {1}, nabs},
        {"w.nested_quant_map", Q_DTYPE_F32, 1, {256}, map},
        {"w.quant_map", Q_DTYPE_F32, 1, {16}, qmap},
        {"w.quant_state.bitsandbytes__nf4", Q_DTYPE_U8, 1, {(int64_t)strlen(qs)}, qs},
    };
    char *dir = test_tmpdir(), path[4200];
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    q_err err;
    TEST_OK(q_st_write(path, e, 6, NULL, NULL, 0, &err), &err);
    q_st_model m;
    TEST_OK(q_st_model_open(&m, path, &err), &err);
    nf4_tensor t;
    CU_ASSERT_EQUAL(bnb4_load(&m, "w", &t, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "expected U8 with 64 elements"));
    q_st_model_close(&m);
    test_rmtree(dir);
    free(dir);
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("bnb4bit", NULL, NULL);
    CU_add_test(s, "quant_state JSON matches bitsandbytes", test_quant_state_json);
    CU_add_test(s, "malformed checkpoints", test_bnb4_load_errors);
    CU_pSuite c = CU_add_suite("cli", NULL, NULL);
    CU_add_test(c, "quantize, inspect, dequantize", test_quantize_command);
    CU_add_test(c, "quantize options and sharding", test_quantize_options_and_shards);
    CU_add_test(c, "quantize bad input", test_quantize_errors);
    return test_main();
}
