// tests/test_tokenizer.c: the byte-level BPE tokenizer against HF `tokenizers`.
//
// The goldens (tests/fixtures/tokenizers, made by
// scripts/fixtures/make_tokenizer_fixtures.py) hold a mixed corpus and, per
// tokenizer, HF's ids for every line (special tokens matched, and with
// encode_special_tokens=True), HF's decode of them, and HF's decode of id
// sequences that cut UTF-8 characters. SmolLM2 is the real tokenizer; the
// Llama 3 and Qwen2 ones are small stand-ins with their real pipelines.
#define _GNU_SOURCE
#include "data/data.h"
#include "test_util.h"

#include <stdio.h>
#include <stdlib.h>

static const char *const NAMES[] = {"smollm2", "llama3", "qwen2"};
#define N_TOK 3

// ----------------------------------------------------------------------------
// fixtures

typedef struct jsonl {
    q_json **rows;  // [n]
    size_t n;
} jsonl;

static void jsonl_free(jsonl *j) {
    for (size_t i = 0; i < j->n; i++) q_json_free(j->rows[i]);
    free(j->rows);
    j->rows = NULL;
    j->n = 0;
}

// Reads a JSONL fixture, one parsed value per line.
static int jsonl_read(const char *name, jsonl *out) {
    q_err err;
    char *text;
    size_t size;
    memset(out, 0, sizeof *out);
    if (q_file_read(test_fixture(name), &text, &size, &err)) {
        fprintf(stderr, "\n  %s\n", err.msg);
        return -1;
    }
    size_t cap = 0;
    for (char *p = text, *end = text + size; p < end;) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (out->n == cap) {
            cap = cap ? 2 * cap : 256;
            out->rows = realloc(out->rows, cap * sizeof *out->rows);
        }
        if (q_json_parse(p, len, &out->rows[out->n], &err)) {
            fprintf(stderr, "\n  %s line %zu: %s\n", name, out->n + 1, err.msg);
            free(text);
            jsonl_free(out);
            return -1;
        }
        out->n++;
        p += len + 1;
    }
    free(text);
    return 0;
}

static tok_tokenizer *load(const char *name) {
    char path[256];
    snprintf(path, sizeof path, "tokenizers/%s/tokenizer.json", name);
    tok_tokenizer *t = NULL;
    q_err err;
    if (tok_load_json(&t, test_fixture(path), &err)) fprintf(stderr, "\n  %s\n", err.msg);
    return t;
}

// True when ids[0..n) equals the JSON array a.
static bool ids_equal(const int32_t *ids, int64_t n, const q_json *a) {
    if (!a || a->type != Q_JSON_ARRAY || (int64_t)a->count != n) return false;
    for (int64_t i = 0; i < n; i++)
        if (a->items[i].integer != ids[i]) return false;
    return true;
}

static void print_mismatch(const char *tok, size_t line, const int32_t *ids, int64_t n, const q_json *want) {
    fprintf(stderr, "\n  %s line %zu: got", tok, line + 1);
    for (int64_t i = 0; i < n && i < 24; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, " (%lld)\n  want", (long long)n);
    for (size_t i = 0; i < want->count && i < 24; i++) fprintf(stderr, " %lld", (long long)want->items[i].integer);
    fprintf(stderr, " (%zu)\n", want->count);
}

// The special ids, read straight from the tokenizer.json (not through our loader).
static bool *special_ids(const char *name, int64_t n_vocab) {
    char path[256];
    snprintf(path, sizeof path, "tokenizers/%s/tokenizer.json", name);
    char *text;
    size_t size;
    q_err err;
    q_json *root;
    bool *sp = calloc((size_t)n_vocab, 1);
    if (q_file_read(test_fixture(path), &text, &size, &err)) return sp;
    if (!q_json_parse(text, size, &root, &err)) {
        const q_json *added = q_json_get(root, "added_tokens");
        for (size_t i = 0; added && i < added->count; i++) {
            const q_json *s = q_json_get(&added->items[i], "special");
            int64_t id = q_json_get(&added->items[i], "id")->integer;
            if (s && s->boolean && id < n_vocab) sp[id] = true;
        }
        q_json_free(root);
    }
    free(text);
    return sp;
}

// ----------------------------------------------------------------------------
// the corpus, every tokenizer

static void test_corpus_matches_hf(void) {
    jsonl corpus;
    CU_ASSERT_FATAL(jsonl_read("tokenizers/corpus.jsonl", &corpus) == 0);
    for (int k = 0; k < N_TOK; k++) {
        char name[128];
        snprintf(name, sizeof name, "tokenizers/%s/ids.jsonl", NAMES[k]);
        jsonl gold;
        tok_tokenizer *t = load(NAMES[k]);
        CU_ASSERT_FATAL(t != NULL);
        CU_ASSERT_FATAL(jsonl_read(name, &gold) == 0);
        CU_ASSERT_EQUAL_FATAL(gold.n, corpus.n);
        bool *special = special_ids(NAMES[k], tok_vocab_size(t));
        size_t lines_ok = 0, plain_ok = 0, decoded_ok = 0, n_special_lines = 0;
        int64_t tokens = 0;
        q_err err;
        for (size_t i = 0; i < corpus.n; i++) {
            const q_json *text = corpus.rows[i], *g = gold.rows[i];
            const q_json *want = q_json_get(g, "special"), *want_plain = q_json_get(g, "plain");
            const q_json *want_dec = q_json_get(g, "decoded");
            if (!want_plain) want_plain = want;
            else n_special_lines++;
            int32_t *ids, *plain;
            int64_t n, np;
            TEST_OK(tok_encode(t, text->string, text->string_len, true, &ids, &n, &err), &err);
            TEST_OK(tok_encode(t, text->string, text->string_len, false, &plain, &np, &err), &err);
            if (ids_equal(ids, n, want)) {
                lines_ok++;
                tokens += n;
            } else {
                print_mismatch(NAMES[k], i, ids, n, want);
            }
            if (ids_equal(plain, np, want_plain)) plain_ok++;
            else print_mismatch(NAMES[k], i, plain, np, want_plain);
            for (int64_t j = 0; j < np; j++) CU_ASSERT(!special[plain[j]]);  // user text never injects control tokens

            // decode(encode(x)) == x (HF's decode where the normalizer changed the text)
            char *dec;
            size_t dlen;
            TEST_OK(tok_decode(t, ids, n, &dec, &dlen, &err), &err);
            const q_json *ref = want_dec ? want_dec : text;
            if (dlen == ref->string_len && !memcmp(dec, ref->string, dlen)) decoded_ok++;
            else fprintf(stderr, "\n  %s line %zu: decode differs\n", NAMES[k], i + 1);
            free(dec);
            free(ids);
            free(plain);
        }
        printf("\n    %s: %zu/%zu lines, %lld tokens identical to HF; allow_special=false %zu/%zu (%zu lines "
               "differ by special tokens); decode %zu/%zu",
               NAMES[k], lines_ok, corpus.n, (long long)tokens, plain_ok, corpus.n, n_special_lines, decoded_ok,
               corpus.n);
        CU_ASSERT_EQUAL(lines_ok, corpus.n);
        CU_ASSERT_EQUAL(plain_ok, corpus.n);
        CU_ASSERT_EQUAL(decoded_ok, corpus.n);
        CU_ASSERT(n_special_lines > 0);  // the corpus does exercise allow_special
        free(special);
        jsonl_free(&gold);
        tok_free(t);
    }
    jsonl_free(&corpus);
}

// HF's decode of id sequences that cut characters (U+FFFD, Rust's lossy rules) and mix in specials.
static void test_decode_matches_hf(void) {
    for (int k = 0; k < N_TOK; k++) {
        char name[128];
        snprintf(name, sizeof name, "tokenizers/%s/decode.jsonl", NAMES[k]);
        jsonl cases;
        tok_tokenizer *t = load(NAMES[k]);
        CU_ASSERT_FATAL(t != NULL);
        CU_ASSERT_FATAL(jsonl_read(name, &cases) == 0);
        size_t ok = 0, replaced = 0;
        for (size_t i = 0; i < cases.n; i++) {
            const q_json *a = q_json_get(cases.rows[i], "ids"), *want = q_json_get(cases.rows[i], "text");
            int32_t *ids = malloc((a->count + 1) * sizeof *ids);
            for (size_t j = 0; j < a->count; j++) ids[j] = (int32_t)a->items[j].integer;
            char *text;
            size_t len;
            q_err err;
            TEST_OK(tok_decode(t, ids, (int64_t)a->count, &text, &len, &err), &err);
            if (len == want->string_len && !memcmp(text, want->string, len)) ok++;
            else fprintf(stderr, "\n  %s decode case %zu: got \"%s\" want \"%s\"\n", NAMES[k], i, text, want->string);
            CU_ASSERT_EQUAL(text[len], 0);
            replaced += strstr(want->string, "\xEF\xBF\xBD") != NULL;
            free(text);
            free(ids);
        }
        printf("\n    %s: %zu/%zu decode cases identical to HF (%zu with U+FFFD)", NAMES[k], ok, cases.n, replaced);
        CU_ASSERT_EQUAL(ok, cases.n);
        CU_ASSERT(replaced > 0);
        jsonl_free(&cases);
        tok_free(t);
    }
}

// ----------------------------------------------------------------------------
// special ids, lookups

static void test_special_tokens(void) {
    tok_tokenizer *s = load("smollm2"), *l = load("llama3"), *q = load("qwen2");
    CU_ASSERT_FATAL(s && l && q);
    // SmolLM2: llama.cpp's metadata says bos 1 <|im_start|>, eos 2 <|im_end|>, add_bos_token false
    CU_ASSERT_EQUAL(tok_vocab_size(s), 49152);
    CU_ASSERT_EQUAL(tok_token_id(s, "<|endoftext|>"), 0);
    CU_ASSERT_EQUAL(tok_token_id(s, "<|im_start|>"), 1);
    CU_ASSERT_EQUAL(tok_bos_id(s), 1);
    CU_ASSERT_EQUAL(tok_eos_id(s), 2);
    CU_ASSERT_FALSE(tok_adds_bos(s));
    CU_ASSERT_EQUAL(tok_token_id(s, "\xC4\xA0the"), 260);  // "Ġthe", by its vocabulary spelling
    CU_ASSERT_EQUAL(tok_token_id(s, "no such token"), -1);
    // Llama 3 stand-in: 3005 trained ids, then 11 specials; BOS from TemplateProcessing,
    // EOS by the fallback rule (no tokenizer_config.json)
    CU_ASSERT_EQUAL(tok_vocab_size(l), 3016);
    CU_ASSERT_EQUAL(tok_bos_id(l), 3005);
    CU_ASSERT_EQUAL(tok_token_id(l, "<|begin_of_text|>"), 3005);
    CU_ASSERT_TRUE(tok_adds_bos(l));
    CU_ASSERT_EQUAL(tok_eos_id(l), tok_token_id(l, "<|end_of_text|>"));
    CU_ASSERT_EQUAL(tok_token_id(l, "<|eot_id|>"), 3014);
    // Qwen2 stand-in: no BOS, EOS <|im_end|> from tokenizer_config.json
    CU_ASSERT_EQUAL(tok_vocab_size(q), 3008);
    CU_ASSERT_EQUAL(tok_bos_id(q), -1);
    CU_ASSERT_FALSE(tok_adds_bos(q));
    CU_ASSERT_EQUAL(tok_eos_id(q), 3002);
    CU_ASSERT_EQUAL(tok_token_id(q, "<|im_end|>"), 3002);
    tok_free(s);
    tok_free(l);
    tok_free(q);
}

// ----------------------------------------------------------------------------
// GGUF

static void test_gguf_matches_json(void) {
    q_gguf g;
    q_err err;
    TEST_OK(q_gguf_open(&g, test_fixture("tokenizers/smollm2/tokenizer.gguf"), &err), &err);
    tok_tokenizer *tg = NULL, *tj = load("smollm2");
    TEST_OK(tok_load_gguf(&tg, &g, &err), &err);
    q_gguf_close(&g);  // the tokenizer keeps its own copies
    CU_ASSERT_FATAL(tj != NULL);
    CU_ASSERT_EQUAL(tok_vocab_size(tg), tok_vocab_size(tj));
    CU_ASSERT_EQUAL(tok_bos_id(tg), 1);
    CU_ASSERT_EQUAL(tok_eos_id(tg), 2);
    CU_ASSERT_FALSE(tok_adds_bos(tg));
    jsonl corpus;
    CU_ASSERT_FATAL(jsonl_read("tokenizers/corpus.jsonl", &corpus) == 0);
    size_t same = 0;
    int64_t tokens = 0;
    for (size_t i = 0; i < corpus.n; i++) {
        for (int sp = 0; sp < 2; sp++) {
            int32_t *a, *b;
            int64_t na, nb;
            const q_json *x = corpus.rows[i];
            TEST_OK(tok_encode(tg, x->string, x->string_len, sp, &a, &na, &err), &err);
            TEST_OK(tok_encode(tj, x->string, x->string_len, sp, &b, &nb, &err), &err);
            bool eq = na == nb && !memcmp(a, b, (size_t)na * sizeof *a);
            same += eq && sp;
            tokens += eq && sp ? na : 0;
            CU_ASSERT(eq);
            free(a);
            free(b);
        }
    }
    printf("\n    GGUF vs tokenizer.json: %zu/%zu lines, %lld tokens identical", same, corpus.n, (long long)tokens);
    CU_ASSERT_EQUAL(same, corpus.n);
    jsonl_free(&corpus);
    tok_free(tg);
    tok_free(tj);
}

// A minimal GGUF with string keys only (test input for the error paths).
static void write_gguf(const char *path, const char *const *kv, int n_kv) {
    FILE *f = fopen(path, "wb");
    uint32_t magic = 0x46554747, version = 3, t_str = 8;
    uint64_t n_tensors = 0, n = (uint64_t)n_kv;
    fwrite(&magic, 4, 1, f);
    fwrite(&version, 4, 1, f);
    fwrite(&n_tensors, 8, 1, f);
    fwrite(&n, 8, 1, f);
    for (int i = 0; i < n_kv; i++) {
        uint64_t kl = strlen(kv[2 * i]), vl = strlen(kv[2 * i + 1]);
        fwrite(&kl, 8, 1, f);
        fwrite(kv[2 * i], 1, kl, f);
        fwrite(&t_str, 4, 1, f);
        fwrite(&vl, 8, 1, f);
        fwrite(kv[2 * i + 1], 1, vl, f);
    }
    fclose(f);
}

static void test_gguf_errors(void) {
    char *dir = test_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/t.gguf", dir);
    struct {
        const char *kv[4];
        int n;
        const char *want;
    } cases[] = {
        {{"tokenizer.ggml.model", "llama"}, 1, "not supported yet"},
        {{"tokenizer.ggml.model", "bert"}, 1, "\"bert\""},
        {{"tokenizer.ggml.model", "gpt2", "tokenizer.ggml.pre", "falcon"}, 2, "unknown tokenizer.ggml.pre \"falcon\""},
        {{"tokenizer.ggml.model", "gpt2", "tokenizer.ggml.pre", "smollm"}, 2, "tokenizer.ggml.tokens"},
        {{"general.name", "x"}, 1, "tokenizer.ggml.model"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        write_gguf(path, cases[i].kv, cases[i].n);
        q_gguf g;
        q_err err;
        TEST_OK(q_gguf_open(&g, path, &err), &err);
        static int sentinel;
        tok_tokenizer *t = (tok_tokenizer *)&sentinel;  // must be reset to NULL on failure
        CU_ASSERT_EQUAL(tok_load_gguf(&t, &g, &err), -1);
        CU_ASSERT_PTR_NULL(t);
        if (!strstr(err.msg, cases[i].want) || !strstr(err.msg, path))
            fprintf(stderr, "\n  case %zu: \"%s\" lacks \"%s\"\n", i, err.msg, cases[i].want);
        CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, cases[i].want));
        CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, path));
        q_gguf_close(&g);
    }
    test_rmtree(dir);
    free(dir);
}

// ----------------------------------------------------------------------------
// errors

static void expect_load_error(const char *dir, const char *json, const char *want) {
    char path[512];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    FILE *f = fopen(path, "w");
    fputs(json, f);
    fclose(f);
    static int sentinel;
    tok_tokenizer *t = (tok_tokenizer *)&sentinel;  // must be reset to NULL on failure
    q_err err;
    CU_ASSERT_EQUAL(tok_load_json(&t, path, &err), -1);
    CU_ASSERT_PTR_NULL(t);
    if (!strstr(err.msg, want)) fprintf(stderr, "\n  \"%s\" lacks \"%s\"\n", err.msg, want);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, want));
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, path));
}

#define TINY_MODEL "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[\"a b\"]}"
#define TINY_BL "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false},\"decoder\":{\"type\":\"ByteLevel\"}"

static void test_load_errors(void) {
    tok_tokenizer *t = NULL;
    q_err err;
    CU_ASSERT_EQUAL(tok_load_json(&t, "/nonexistent/tokenizer.json", &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "/nonexistent/tokenizer.json"));
    char *dir = test_tmpdir();
    CU_ASSERT_PTR_NOT_NULL_FATAL(dir);
    expect_load_error(dir, "{\"model\": {\"vocab\": {}, \"merges\": [],}}", "line 1");  // trailing comma
    expect_load_error(dir, "{" TINY_MODEL ",\"pre_tokenizer\":{\"type\":\"Whitespace\"},\"decoder\":{\"type\":\"ByteLevel\"}}",
                      "unknown pre-tokenizer type \"Whitespace\"");
    expect_load_error(dir, "{" TINY_MODEL ",\"normalizer\":{\"type\":\"NFKC\"}," TINY_BL "}", "normalizer \"NFKC\"");
    expect_load_error(dir, "{\"model\":{\"type\":\"WordPiece\",\"vocab\":{},\"merges\":[]}," TINY_BL "}", "WordPiece");
    expect_load_error(dir, "{\"model\":{\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"a b\"]}," TINY_BL "}",
                      "\"ab\" is not in the vocabulary");
    expect_load_error(dir, "{\"model\":{\"vocab\":{\"a\":0,\"b\":0},\"merges\":[]}," TINY_BL "}", "token id 0 is used");
    expect_load_error(dir, "{" TINY_MODEL ",\"decoder\":{\"type\":\"ByteLevel\"}}", "no ByteLevel pre-tokenizer");
    expect_load_error(dir, "{" TINY_MODEL ",\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"},"
                      "\"behavior\":\"Isolated\"}}", "regex \"(\"");
    expect_load_error(dir, "{" TINY_MODEL ",\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"decoder\":{\"type\":\"WordPiece\"}}",
                      "decoder \"WordPiece\"");
    // a tokenizer_config.json naming a token the vocabulary lacks
    char cfg[512];
    snprintf(cfg, sizeof cfg, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(cfg, "w");
    fputs("{\"eos_token\": \"</s>\"}", f);
    fclose(f);
    expect_load_error(dir, "{" TINY_MODEL "," TINY_BL "}", "eos_token \"</s>\" is not in the vocabulary");
    test_rmtree(dir);
    free(dir);
}

static void test_encode_decode_errors(void) {
    tok_tokenizer *t = load("smollm2");
    CU_ASSERT_FATAL(t != NULL);
    q_err err;
    char *text = NULL;
    size_t len;
    int32_t bad[] = {0, 49152}, neg[] = {-1};
    CU_ASSERT_EQUAL(tok_decode(t, bad, 2, &text, &len, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "id 49152"));
    CU_ASSERT_EQUAL(tok_decode(t, neg, 1, &text, &len, &err), -1);
    CU_ASSERT_PTR_NULL(text);
    // empty in, empty out
    TEST_OK(tok_decode(t, NULL, 0, &text, &len, &err), &err);
    CU_ASSERT_EQUAL(len, 0);
    CU_ASSERT_STRING_EQUAL(text, "");
    free(text);
    int32_t *ids = NULL;
    int64_t n = -1;
    TEST_OK(tok_encode(t, "", 0, true, &ids, &n, &err), &err);
    CU_ASSERT_EQUAL(n, 0);
    CU_ASSERT_PTR_NOT_NULL(ids);
    free(ids);
    // invalid UTF-8 is refused with the offset of the first bad byte
    CU_ASSERT_EQUAL(tok_encode(t, "ab\xC3(", 4, true, &ids, &n, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "byte 2"));
    CU_ASSERT_EQUAL(tok_encode(t, "\xED\xA0\x80", 3, true, &ids, &n, &err), -1);  // a surrogate
    // NUL is an ordinary character in the middle of the text
    TEST_OK(tok_encode(t, "a\0b", 3, true, &ids, &n, &err), &err);
    CU_ASSERT_EQUAL(n, 3);
    free(ids);
    tok_free(t);
}

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite s = CU_add_suite("tokenizer", NULL, NULL);
    CU_add_test(s, "every corpus line encodes to HF's ids (3 tokenizers)", test_corpus_matches_hf);
    CU_add_test(s, "decode matches HF, lossy UTF-8 included", test_decode_matches_hf);
    CU_add_test(s, "BOS/EOS and token lookups", test_special_tokens);
    CU_add_test(s, "GGUF tokenizer == tokenizer.json on the corpus", test_gguf_matches_json);
    CU_add_test(s, "GGUF errors: SentencePiece, unknown pre-tokenizer", test_gguf_errors);
    CU_add_test(s, "load errors", test_load_errors);
    CU_add_test(s, "encode/decode errors and edge cases", test_encode_decode_errors);
    return test_main();
}
