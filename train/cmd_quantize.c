// train/cmd_quantize.c: `qlora quantize MODEL_DIR OUT_DIR` turns an HF
// safetensors model into a bnb-4bit checkpoint that transformers loads with
// from_pretrained (formats.md section 4): the linear weights of the blocks in
// NF4 (or FP4), everything else copied, config.json given quantization_config.
#define _GNU_SOURCE
#include "train.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

typedef struct quantize_opts {
    const char *model_dir, *out_dir;
    int64_t blocksize;
    nf4_qtype qtype;
    bool nested;
    const char *compute_dtype;
    int64_t max_shard_bytes;
} quantize_opts;

static void quantize_usage(void) {
    fprintf(stderr,
            "usage: qlora quantize MODEL_DIR OUT_DIR [options]\n"
            "  --blocksize N          4-bit block size, 32..4096 (default 64)\n"
            "  --quant-type nf4|fp4   code table (default nf4)\n"
            "  --no-double-quant      keep fp32 block scales (default: double-quantize them)\n"
            "  --compute-dtype T      bnb_4bit_compute_dtype written to config.json (default bfloat16)\n"
            "  --max-shard-size B     split the output into shards of at most B bytes (default 5000000000)\n");
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// config.json: the original text with quantization_config added before the
// closing brace, so every other key stays byte for byte as it was.

static int write_config(const quantize_opts *o, q_err *err) {
    char path[4096], *text = NULL;
    size_t len;
    snprintf(path, sizeof path, "%s/config.json", o->model_dir);
    if (q_file_read(path, &text, &len, err)) return -1;
    q_json *cfg = NULL;
    if (q_json_parse(text, len, &cfg, err)) { free(text); return q_err_wrap(err, "%s", path); }
    int rc = -1;
    if (cfg->type != Q_JSON_OBJECT) { q_err_set(err, "%s: not a JSON object", path); goto done; }
    if (q_json_get(cfg, "quantization_config")) {
        q_err_set(err, "%s: the model is already quantized (config.json has quantization_config)", path);
        goto done;
    }
    size_t end = len;
    while (end > 0 && text[end - 1] != '}') end--;
    size_t body = end - 1;  // index of the closing brace
    while (body > 0 && (text[body - 1] == ' ' || text[body - 1] == '\n' || text[body - 1] == '\r' ||
                        text[body - 1] == '\t'))
        body--;
    q_buf b = {0};
    q_buf_append(&b, text, body);
    q_buf_printf(&b,
                 "%s\n  \"quantization_config\": {\n"
                 "    \"_load_in_4bit\": true,\n    \"_load_in_8bit\": false,\n"
                 "    \"bnb_4bit_compute_dtype\": \"%s\",\n    \"bnb_4bit_quant_storage\": \"uint8\",\n"
                 "    \"bnb_4bit_quant_type\": \"%s\",\n    \"bnb_4bit_use_double_quant\": %s,\n"
                 "    \"llm_int8_enable_fp32_cpu_offload\": false,\n    \"llm_int8_has_fp16_weight\": false,\n"
                 "    \"llm_int8_skip_modules\": null,\n    \"llm_int8_threshold\": 6.0,\n"
                 "    \"load_in_4bit\": true,\n    \"load_in_8bit\": false,\n"
                 "    \"quant_method\": \"bitsandbytes\"\n  }\n}\n",
                 text[body - 1] == '{' ? "" : ",", o->compute_dtype, nf4_qtype_name(o->qtype),
                 o->nested ? "true" : "false");
    snprintf(path, sizeof path, "%s/config.json", o->out_dir);
    rc = b.data ? q_file_write_atomic(path, b.data, b.len, err) : q_err_set(err, "out of memory");
    q_buf_free(&b);
done:
    q_json_free(cfg);
    free(text);
    return rc;
}

// Tokenizer and generation files travel with the weights.
static int copy_side_files(const quantize_opts *o, q_err *err) {
    DIR *d = opendir(o->model_dir);
    if (!d) return 0;
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        const char *n = e->d_name;
        size_t l = strlen(n);
        if (n[0] == '.' || strcmp(n, "config.json") == 0 || strcmp(n, "model.safetensors.index.json") == 0 ||
            (l > 12 && strcmp(n + l - 12, ".safetensors") == 0))
            continue;
        char src[4096], dst[4096], *data = NULL;
        size_t size;
        snprintf(src, sizeof src, "%s/%s", o->model_dir, n);
        snprintf(dst, sizeof dst, "%s/%s", o->out_dir, n);
        if (q_path_is_dir(src)) continue;
        rc = q_file_read(src, &data, &size, err);
        if (rc == 0) rc = q_file_write_atomic(dst, data, size, err);
        free(data);
    }
    closedir(d);
    return rc;
}

// ----------------------------------------------------------------------------
// writing the tensors, sharded the way transformers shards: greedy in order,
// model-0000i-of-0000n.safetensors plus model.safetensors.index.json.

static size_t entry_bytes(const q_st_entry *e) {
    size_t n = q_dtype_size(e->dtype);
    for (int i = 0; i < e->ndim; i++) n *= (size_t)e->shape[i];
    return n;
}

static int write_shards(const quantize_opts *o, q_st_entry *entries, size_t n, q_err *err) {
    static const char *const mk[] = {"format"}, *const mv[] = {"pt"};
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += entry_bytes(&entries[i]);
    // shard boundaries: a new shard starts when the next tensor would overflow
    size_t *first = malloc((n + 1) * sizeof *first), nshards = 0, cur = 0;
    if (!first) return q_err_set(err, "out of memory");
    for (size_t i = 0; i < n; i++) {
        size_t b = entry_bytes(&entries[i]);
        if (i == 0 || (cur > 0 && cur + b > (size_t)o->max_shard_bytes)) { first[nshards++] = i; cur = 0; }
        cur += b;
    }
    first[nshards] = n;
    char path[4096];
    int rc = 0;
    q_buf index = {0};
    if (nshards == 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", o->out_dir);
        rc = q_st_write(path, entries, n, mk, mv, 1, err);
        free(first);
        return rc;
    }
    // index.json: json.dumps(index, indent=2, sort_keys=True) + "\n"; entries are sorted by name already
    q_buf_printf(&index, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n  \"weight_map\": {\n", total);
    for (size_t s = 0; s < nshards && rc == 0; s++) {
        char shard[64];
        snprintf(shard, sizeof shard, "model-%05zu-of-%05zu.safetensors", s + 1, nshards);
        snprintf(path, sizeof path, "%s/%s", o->out_dir, shard);
        printf("  writing %s (%zu tensors)\n", shard, first[s + 1] - first[s]);
        rc = q_st_write(path, entries + first[s], first[s + 1] - first[s], mk, mv, 1, err);
    }
    // weight_map in sorted key order across shards
    for (size_t i = 0; i < n && rc == 0; i++) {
        size_t s = 0;
        while (first[s + 1] <= i) s++;
        q_buf_printf(&index, "    ");
        q_buf_json_string(&index, entries[i].name);
        q_buf_printf(&index, ": \"model-%05zu-of-%05zu.safetensors\"%s\n", s + 1, nshards, i + 1 < n ? "," : "");
    }
    q_buf_printf(&index, "  }\n}\n");
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", o->out_dir);
        rc = index.data ? q_file_write_atomic(path, index.data, index.len, err) : q_err_set(err, "out of memory");
    }
    q_buf_free(&index);
    free(first);
    return rc;
}

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const q_st_entry *)a)->name, ((const q_st_entry *)b)->name);
}

static int quantize_model(const quantize_opts *o, q_err *err) {
    q_st_model m;
    if (q_st_model_open(&m, o->model_dir, err)) return -1;
    int rc = -1;
    nf4_tensor *qt = calloc(m.n_tensors, sizeof *qt);
    bnb4_record *rec = calloc(m.n_tensors, sizeof *rec);
    q_st_entry *entries = calloc(m.n_tensors * BNB4_MAX_ENTRIES, sizeof *entries);
    if (!qt || !rec || !entries) { q_err_set(err, "out of memory"); goto done; }
    if (q_mkdir_p(o->out_dir, err) || write_config(o, err)) goto done;

    size_t n = 0, nq = 0, total_q = 0;
    for (size_t i = 0; i < m.n_tensors; i++) total_q += bnb4_should_quantize(m.tensors[i]->name, m.tensors[i]);
    const double t0 = now_s();
    const bool tty = isatty(fileno(stdout));
    int64_t in_bytes = 0, out_bytes = 0;
    for (size_t i = 0; i < m.n_tensors; i++) {
        const q_st_tensor *t = m.tensors[i];
        in_bytes += (int64_t)t->nbytes;
        if (!bnb4_should_quantize(t->name, t)) {
            q_st_entry *e = &entries[n++];
            e->name = t->name;
            e->dtype = t->dtype;
            e->ndim = t->ndim;
            memcpy(e->shape, t->shape, sizeof e->shape);
            e->data = t->data;
            out_bytes += (int64_t)t->nbytes;
            continue;
        }
        if (nf4_tensor_quantize(&qt[i], t->data, t->dtype, t->ndim, t->shape, o->qtype, o->blocksize, o->nested,
                                err) ||
            bnb4_record_init(&rec[i], t->name, &qt[i], err)) {
            q_err_wrap(err, "%s", t->name);
            goto done;
        }
        for (int k = 0; k < rec[i].n; k++) entries[n++] = rec[i].entries[k];
        out_bytes += nf4_tensor_bytes(&qt[i]);
        nq++;
        // one rewritten line on a terminal, a line per tenth in a log
        double el = now_s() - t0, eta = el / (double)nq * (double)(total_q - nq);
        if (tty)
            printf("\r  quantized %zu/%zu  %-48.48s  %.1fs, ETA %.0fs   ", nq, total_q, t->name, el, eta);
        else if (nq * 10 / total_q != (nq - 1) * 10 / total_q)
            printf("  quantized %zu/%zu  %.1fs, ETA %.0fs\n", nq, total_q, el, eta);
        fflush(stdout);
    }
    if (nq && tty) printf("\n");
    if (nq == 0) printf("  warning: no transformer-block linear weights found; nothing was quantized\n");
    qsort(entries, n, sizeof *entries, cmp_entry);
    if (write_shards(o, entries, n, err) || copy_side_files(o, err)) goto done;
    printf("quantized %zu of %zu tensors (%s, block %lld%s) in %.1fs: %.1f MB -> %.1f MB\n", nq, m.n_tensors,
           nf4_qtype_name(o->qtype), (long long)o->blocksize, o->nested ? ", double-quant" : "", now_s() - t0,
           in_bytes / 1e6, out_bytes / 1e6);
    rc = 0;
done:
    for (size_t i = 0; qt && rec && i < m.n_tensors; i++) {
        nf4_tensor_free(&qt[i]);
        bnb4_record_free(&rec[i]);
    }
    free(qt);
    free(rec);
    free(entries);
    q_st_model_close(&m);
    return rc;
}

int cmd_quantize(int argc, char **argv) {
    quantize_opts o = {.blocksize = NF4_DEFAULT_BLOCKSIZE, .qtype = NF4_QTYPE_NF4, .nested = true,
                       .compute_dtype = "bfloat16", .max_shard_bytes = 5000000000LL};
    int pos = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) { quantize_usage(); return 0; }
        if (strcmp(a, "--no-double-quant") == 0) { o.nested = false; continue; }
        if (a[0] == '-' && a[1] == '-') {
            if (!val) { fprintf(stderr, "error: %s needs a value\n", a); return 2; }
            i++;
            char *end;
            if (strcmp(a, "--blocksize") == 0) {
                o.blocksize = strtoll(val, &end, 10);
                q_err err;
                if (*end || nf4_blocksize_check(o.blocksize, &err)) {
                    fprintf(stderr, "error: --blocksize %s: must be a power of two from 32 to 4096\n", val);
                    return 2;
                }
            } else if (strcmp(a, "--quant-type") == 0) {
                if (nf4_qtype_from_name(val, &o.qtype)) {
                    fprintf(stderr, "error: --quant-type %s: expected nf4 or fp4\n", val);
                    return 2;
                }
            } else if (strcmp(a, "--compute-dtype") == 0) {
                q_dtype dt;
                if (q_dtype_from_torch_name(val, &dt) || !q_dtype_is_float(dt)) {
                    fprintf(stderr, "error: --compute-dtype %s: expected bfloat16, float16 or float32\n", val);
                    return 2;
                }
                o.compute_dtype = val;
            } else if (strcmp(a, "--max-shard-size") == 0) {
                o.max_shard_bytes = strtoll(val, &end, 10);
                if (*end || o.max_shard_bytes <= 0) {
                    fprintf(stderr, "error: --max-shard-size %s: expected a positive byte count\n", val);
                    return 2;
                }
            } else {
                fprintf(stderr, "error: unknown option %s\n", a);
                quantize_usage();
                return 2;
            }
            continue;
        }
        if (pos == 0) o.model_dir = a;
        else if (pos == 1) o.out_dir = a;
        else { fprintf(stderr, "error: unexpected argument %s\n", a); return 2; }
        pos++;
    }
    if (pos != 2) { quantize_usage(); return 2; }
    if (!q_path_is_dir(o.model_dir)) {
        fprintf(stderr, "error: %s: not a folder (expected an HF model folder with config.json)\n", o.model_dir);
        return 1;
    }
    q_err err = {{0}};
    if (quantize_model(&o, &err)) {
        fprintf(stderr, "error: %s\n", err.msg);
        return 1;
    }
    return 0;
}
