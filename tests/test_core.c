// tests/test_core.c: the core room. The JSON parser (valid documents and a
// table of invalid ones), Python-compatible float repr, half-float rounding
// against known bit patterns, and safetensors: round trips, the reference
// writer's layout, a table of corrupt files, and sharded model folders.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "test_util.h"

static char *tmp;  // per-suite temporary folder

static int suite_init(void) { return (tmp = test_tmpdir()) ? 0 : -1; }
static int suite_clean(void) {
    test_rmtree(tmp);
    free(tmp);
    tmp = NULL;
    return 0;
}

// A path inside the suite's temporary folder (one of 4 static buffers, used in turn).
static const char *tmp_path(const char *name) {
    static char path[4][4096];
    static int next;
    char *p = path[next++ % 4];
    snprintf(p, sizeof path[0], "%s/%s", tmp, name);
    return p;
}

// ----------------------------------------------------------------------------
// JSON: valid documents

static q_json *parse_ok(const char *text) {
    q_json *v = NULL;
    q_err err;
    int rc = q_json_parse(text, strlen(text), &v, &err);
    if (rc) fprintf(stderr, "\n  %s: %s\n", text, err.msg);
    CU_ASSERT_EQUAL(rc, 0);
    return v;
}

static void test_json_nested(void) {
    q_json *v = parse_ok(" {\"a\": [1, 2, {\"b\": null}], \"c\": true, \"d\": false, \"e\": \"x\", \"f\": {}, \"g\": []}\r\n\t");
    CU_ASSERT_FATAL(v != NULL);
    CU_ASSERT_EQUAL(v->type, Q_JSON_OBJECT);
    CU_ASSERT_EQUAL_FATAL(v->count, 6);
    CU_ASSERT_STRING_EQUAL(v->keys[0], "a");
    CU_ASSERT_STRING_EQUAL(v->keys[5], "g");
    const q_json *a = q_json_get(v, "a");
    CU_ASSERT_FATAL(a && a->type == Q_JSON_ARRAY && a->count == 3);
    CU_ASSERT_EQUAL(a->items[1].integer, 2);
    CU_ASSERT_EQUAL(q_json_get(&a->items[2], "b")->type, Q_JSON_NULL);
    CU_ASSERT_PTR_NULL(q_json_get(a, "b"));  // not an object
    CU_ASSERT(q_json_get(v, "c")->boolean == true);
    CU_ASSERT(q_json_get(v, "d")->type == Q_JSON_BOOL && !q_json_get(v, "d")->boolean);
    CU_ASSERT_STRING_EQUAL(q_json_get(v, "e")->string, "x");
    CU_ASSERT_EQUAL(q_json_get(v, "f")->count, 0);
    CU_ASSERT_EQUAL(q_json_get(v, "g")->type, Q_JSON_ARRAY);
    CU_ASSERT_PTR_NULL(q_json_get(v, "zz"));
    q_json_free(v);

    // duplicate keys are kept in order; lookups find the first
    v = parse_ok("{\"k\":1,\"k\":2}");
    CU_ASSERT_EQUAL(v->count, 2);
    CU_ASSERT_EQUAL(q_json_get(v, "k")->integer, 1);
    q_json_free(v);

    // top-level scalars, and the length is respected (no NUL needed)
    v = parse_ok("\"\"");
    CU_ASSERT(v->type == Q_JSON_STRING && v->string_len == 0 && v->string && v->string[0] == 0);
    q_json_free(v);
    q_err err;
    CU_ASSERT_EQUAL(q_json_parse("[1,2]garbage", 5, &v, &err), 0);
    CU_ASSERT_EQUAL(v->count, 2);
    q_json_free(v);
}

static void test_json_strings(void) {
    q_json *v = parse_ok("[\"\\\"\\\\\\/\\b\\f\\n\\r\\t\", \"\\u00e9\\u20AC\\ud83d\\ude00\\u0000x\", \"\xc3\xa9\xf0\x9f\x98\x80\"]");
    CU_ASSERT_FATAL(v != NULL);
    CU_ASSERT_EQUAL(v->items[0].string_len, 8);
    CU_ASSERT(memcmp(v->items[0].string, "\"\\/\b\f\n\r\t", 9) == 0);
    // U+00E9, U+20AC, U+1F600 from a surrogate pair, U+0000, 'x'
    static const unsigned char want[] = {0xc3, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f, 0x98, 0x80, 0x00, 'x', 0};
    CU_ASSERT_EQUAL(v->items[1].string_len, 11);
    CU_ASSERT(memcmp(v->items[1].string, want, 12) == 0);
    // raw UTF-8 passes through unchanged
    CU_ASSERT_STRING_EQUAL(v->items[2].string, "\xc3\xa9\xf0\x9f\x98\x80");
    q_json_free(v);
}

static void test_json_numbers(void) {
    q_json *v = parse_ok("[0, -0, 9223372036854775807, -9223372036854775808, 9223372036854775808,"
                         " -9223372036854775809, 1.5, 1e3, 2.5E-3, 1E+2, -0.0, 1e-400, 123456789012, -17,"
                         " 0.1, 1.7976931348623157e308]");
    CU_ASSERT_FATAL(v != NULL && v->count == 16);
    const q_json *n = v->items;
    CU_ASSERT(n[0].is_int && n[0].integer == 0 && n[0].number == 0);
    CU_ASSERT(n[1].is_int && n[1].integer == 0 && signbit(n[1].number));
    CU_ASSERT(n[2].is_int && n[2].integer == INT64_MAX);
    CU_ASSERT(n[3].is_int && n[3].integer == INT64_MIN && n[3].number == -9223372036854775808.0);
    CU_ASSERT(!n[4].is_int && n[4].number == 9223372036854775808.0);
    CU_ASSERT(!n[5].is_int && n[5].number == -9223372036854775808.0);
    CU_ASSERT(!n[6].is_int && n[6].number == 1.5);
    CU_ASSERT(!n[7].is_int && n[7].number == 1000.0);
    CU_ASSERT(!n[8].is_int && n[8].number == 2.5e-3);
    CU_ASSERT(!n[9].is_int && n[9].number == 100.0);
    CU_ASSERT(!n[10].is_int && n[10].number == 0 && signbit(n[10].number));
    CU_ASSERT(!n[11].is_int && n[11].number == 0);  // underflow to zero is fine
    CU_ASSERT(n[12].is_int && n[12].integer == 123456789012LL);
    CU_ASSERT(n[13].is_int && n[13].integer == -17);
    CU_ASSERT(n[14].number == 0.1);
    CU_ASSERT(n[15].number == 1.7976931348623157e308);
    q_json_free(v);
}

static void test_json_depth(void) {
    char text[2 * 260 + 1];
    for (int depth = 256; depth <= 257; depth++) {
        memset(text, '[', (size_t)depth);
        memset(text + depth, ']', (size_t)depth);
        q_json *v = NULL;
        q_err err;
        int rc = q_json_parse(text, 2 * (size_t)depth, &v, &err);
        CU_ASSERT_EQUAL(rc, depth <= 256 ? 0 : -1);
        if (rc) CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "deeper"));
        q_json_free(v);
    }
}

// ----------------------------------------------------------------------------
// JSON: invalid documents

static void test_json_invalid(void) {
    static const struct {
        const char *text;
        size_t len;         // 0: strlen(text)
        const char *want;   // a part of the message
    } cases[] = {
        {"", 0, "end of input"},
        {"   ", 0, "end of input"},
        {"[1,]", 0, "trailing comma"},
        {"{\"a\":1,}", 0, "trailing comma"},
        {"[1 2]", 0, "expected ',' or ']'"},
        {"[1,,2]", 0, "expected a JSON value"},
        {"{\"a\" 1}", 0, "':'"},
        {"{a:1}", 0, "string key"},
        {"{\"a\":}", 0, "JSON value"},
        {"{\"a\":1 \"b\":2}", 0, "',' or '}'"},
        {"// c\n1", 0, "expected a JSON value"},
        {"/* c */ 1", 0, "expected a JSON value"},
        {"01", 0, "leading zeros"},
        {"-012", 0, "leading zeros"},
        {"1.", 0, "decimal point"},
        {".5", 0, "JSON value"},
        {"1e", 0, "exponent"},
        {"1e+", 0, "exponent"},
        {"+1", 0, "JSON value"},
        {"-", 0, "digit"},
        {"-a", 0, "digit"},
        {"NaN", 0, "JSON value"},
        {"Infinity", 0, "JSON value"},
        {"-Infinity", 0, "digit"},
        {"1e400", 0, "out of range"},
        {"tru", 0, "JSON value"},
        {"nul", 0, "JSON value"},
        {"True", 0, "JSON value"},
        {"'a'", 0, "JSON value"},
        {"\"abc", 0, "unterminated string"},
        {"\"a\tb\"", 0, "control character 0x09"},
        {"\"\x01\"", 0, "control character 0x01"},
        {"\"a\nb\"", 0, "control character 0x0a"},
        {"\"\\x\"", 0, "escape"},
        {"\"\\", 0, "escape"},
        {"\"\\u12\"", 0, "hex digit"},
        {"\"\\u12g4\"", 0, "hex digit"},
        {"\"\\ud800\"", 0, "high surrogate"},
        {"\"\\ud800x\"", 0, "high surrogate"},
        {"\"\\ud800\\u0041\"", 0, "not a low surrogate"},
        {"\"\\udc00\"", 0, "lone low surrogate"},
        {"\"\xff\"", 0, "invalid UTF-8"},
        {"\"\x80\"", 0, "invalid UTF-8"},
        {"\"\xc0\xaf\"", 0, "invalid UTF-8"},          // overlong '/'
        {"\"\xe0\x80\xaf\"", 0, "invalid UTF-8"},      // overlong, 3 bytes
        {"\"\xed\xa0\x80\"", 0, "invalid UTF-8"},      // encoded surrogate
        {"\"\xf4\x90\x80\x80\"", 0, "invalid UTF-8"},  // above U+10FFFF
        {"\"\xe2\x82\"", 0, "invalid UTF-8"},          // truncated sequence
        {"\"\xe2\x82", 0, "invalid UTF-8"},            // truncated at the end of input
        {"{\"a\\u0000b\":1}", 0, "\\u0000"},
        {"[1] x", 0, "end of input after"},
        {"{} {}", 0, "end of input after"},
        {"[", 0, "end of input"},
        {"{", 0, "string key"},
        {"[1,", 0, "end of input"},
        {"\"a\0b\"", 5, "control character 0x00"},
        {"1\0", 2, "end of input after"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        q_json *v = (q_json *)1;
        q_err err = {{0}};
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].text);
        int rc = q_json_parse(cases[i].text, len, &v, &err);
        CU_ASSERT_EQUAL(rc, -1);
        CU_ASSERT_PTR_NULL(v);
        bool ok = rc == -1 && strncmp(err.msg, "line ", 5) == 0 && strstr(err.msg, cases[i].want);
        if (!ok) fprintf(stderr, "\n  case %zu (%s): rc %d, message \"%s\"\n", i, cases[i].text, rc, err.msg);
        CU_ASSERT(ok);
    }
    // positions are 1-based lines and byte columns
    q_json *v;
    q_err err;
    const char *text = "[1,\n  2,\n  ]";
    CU_ASSERT_EQUAL(q_json_parse(text, strlen(text), &v, &err), -1);
    CU_ASSERT_STRING_EQUAL(err.msg, "line 3, column 3: trailing comma in array");
    text = "{\n\"a\": 01}";
    CU_ASSERT_EQUAL(q_json_parse(text, strlen(text), &v, &err), -1);
    CU_ASSERT_STRING_EQUAL(err.msg, "line 2, column 6: leading zeros are not allowed in numbers");
}

// ----------------------------------------------------------------------------
// floats: Python repr, half precision

static void test_float_repr(void) {
    static const struct {
        double v;
        const char *want;  // repr(v) in CPython 3
    } cases[] = {
        {0.0499420166015625, "0.0499420166015625"},
        {1e-05, "1e-05"},
        {0.1, "0.1"},
        {1.0, "1.0"},
        {123456789.0, "123456789.0"},
        {1e16, "1e+16"},
        {1e15, "1000000000000000.0"},
        {1.5e-07, "1.5e-07"},
        {-2.5, "-2.5"},
        {0.3333333432674408, "0.3333333432674408"},  // repr(float(np.float32(1/3)))
        {0.0001, "0.0001"},
        {0.00012, "0.00012"},
        {2e-05, "2e-05"},
        {1234.5678, "1234.5678"},
        {100.0, "100.0"},
        {1e22, "1e+22"},
        {1.7976931348623157e308, "1.7976931348623157e+308"},
        {5e-324, "5e-324"},
        {0.0, "0.0"},
        {-0.0, "-0.0"},
        {0.10000000149011612, "0.10000000149011612"},  // float32 0.1
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char out[64];
        q_format_float_repr(cases[i].v, out, sizeof out);
        if (strcmp(out, cases[i].want) != 0) fprintf(stderr, "\n  repr: got %s, want %s\n", out, cases[i].want);
        CU_ASSERT_STRING_EQUAL(out, cases[i].want);
    }
}

static void test_half(void) {
    // fp32 -> fp16, round to nearest even (bit patterns from Python's struct 'e')
    static const struct {
        float f;
        uint16_t h;
    } f16[] = {
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {0.1f, 0x2e66},
        {65504.0f, 0x7bff},                 // largest finite
        {65519.99f, 0x7bff},
        {65520.0f, 0x7c00},                 // halfway to 65536: rounds to even, which overflows
        {1e6f, 0x7c00},
        {-INFINITY, 0xfc00},
        {1.00048828125f, 0x3c00},           // 1 + 2^-11: tie, stays even
        {1.00146484375f, 0x3c02},           // 1 + 3*2^-11: tie, up to even
        {5.9604644775390625e-8f, 0x0001},   // 2^-24, smallest subnormal
        {2.98023223876953125e-8f, 0x0000},  // 2^-25: tie, to even zero
        {8.94069671630859375e-8f, 0x0002},  // 1.5 * 2^-24: tie, to even 2
        {1.490116119384765625e-7f, 0x0002}, // 2.5 * 2^-24: tie, to even 2
        {6.103515625e-05f, 0x0400},         // 2^-14, smallest normal
        {6.1005353927612305e-05f, 0x0400},  // halfway between largest subnormal and 2^-14
        {-0.0f, 0x8000},
    };
    for (size_t i = 0; i < sizeof f16 / sizeof f16[0]; i++) {
        uint16_t h = q_f32_to_f16(f16[i].f);
        if (h != f16[i].h) fprintf(stderr, "\n  f16(%g): got 0x%04x, want 0x%04x\n", f16[i].f, h, f16[i].h);
        CU_ASSERT_EQUAL(h, f16[i].h);
    }
    uint16_t nan16 = q_f32_to_f16(NAN);
    CU_ASSERT((nan16 & 0x7c00) == 0x7c00 && (nan16 & 0x3ff) != 0);
    CU_ASSERT_EQUAL(q_f16_to_f32(0x0001), 5.9604644775390625e-8f);
    CU_ASSERT_EQUAL(q_f16_to_f32(0x03ff), 6.0975551605224609e-05f);
    CU_ASSERT_EQUAL(q_f16_to_f32(0x7bff), 65504.0f);
    CU_ASSERT_EQUAL(q_f16_to_f32(0xfc00), -INFINITY);
    CU_ASSERT(isnan(q_f16_to_f32(0x7e00)));
    CU_ASSERT(signbit(q_f16_to_f32(0x8000)) && q_f16_to_f32(0x8000) == 0);
    // every finite half survives f16 -> f32 -> f16
    for (uint32_t h = 0; h < 0x10000; h++)
        if ((h & 0x7c00) != 0x7c00 && q_f32_to_f16(q_f16_to_f32((uint16_t)h)) != h) {
            CU_FAIL("f16 round trip");
            break;
        }

    // fp32 -> bf16
    static const struct {
        uint32_t f;
        uint16_t b;
    } bf16[] = {
        {0x3f800000, 0x3f80},  // 1.0
        {0x3f808000, 0x3f80},  // 1 + 2^-8: tie, stays even
        {0x3f818000, 0x3f82},  // 1 + 3*2^-8: tie, up to even
        {0x3f808001, 0x3f81},  // just above the tie
        {0x7f7fffff, 0x7f80},  // FLT_MAX rounds up to inf
        {0xff800000, 0xff80},  // -inf
        {0x00010000, 0x0001},  // subnormal stays exact
        {0x7fc00000, 0x7fc0},  // quiet NaN
        {0x7f800001, 0x7fc0},  // signalling NaN: quieted, not rounded to inf
        {0x80000000, 0x8000},  // -0
    };
    for (size_t i = 0; i < sizeof bf16 / sizeof bf16[0]; i++)
        CU_ASSERT_EQUAL(q_f32_to_bf16(q_bits_f32(bf16[i].f)), bf16[i].b);
    CU_ASSERT_EQUAL(q_bf16_to_f32(0x3f80), 1.0f);
    CU_ASSERT_EQUAL(q_f32_bits(q_bf16_to_f32(0x0001)), 0x00010000u);

    // array conversions agree with the scalar ones
    float src[4] = {1.0f, 0.1f, -65520.0f, 3.0f}, back[4];
    uint16_t h[4];
    q_convert_from_f32(src, h, Q_DTYPE_F16, 4);
    CU_ASSERT(h[0] == 0x3c00 && h[1] == 0x2e66 && h[2] == 0xfc00 && h[3] == 0x4200);
    q_convert_to_f32(h, Q_DTYPE_F16, back, 4);
    CU_ASSERT(back[0] == 1.0f && back[2] == -INFINITY && back[3] == 3.0f);
    q_convert_from_f32(src, h, Q_DTYPE_BF16, 4);
    CU_ASSERT(h[0] == 0x3f80 && h[1] == 0x3dcd && h[3] == 0x4040);
    q_convert_to_f32(h, Q_DTYPE_BF16, back, 4);
    CU_ASSERT(back[0] == 1.0f && back[3] == 3.0f);
}

// ----------------------------------------------------------------------------
// safetensors: writing and reading back

static void test_st_roundtrip(void) {
    float w[6] = {1, 2, 3, 4, 5, -6}, scalar = 42.5f;
    uint16_t h[4] = {0x3c00, 0x4000, 0xc000, 0x7bff}, b[4] = {0x3f80, 0x4000, 0x4040, 0x4080};
    uint8_t u[5] = {0, 1, 127, 128, 255};
    int8_t i8[3] = {-128, 0, 127};
    int32_t i32[2] = {INT32_MIN, 7};
    int64_t i64[2] = {INT64_MAX, -1};
    const q_st_entry entries[] = {
        {"w", Q_DTYPE_F32, 2, {2, 3}, w},
        {"half", Q_DTYPE_F16, 1, {4}, h},
        {"brain", Q_DTYPE_BF16, 2, {2, 2}, b},
        {"bytes", Q_DTYPE_U8, 1, {5}, u},
        {"i8", Q_DTYPE_I8, 1, {3}, i8},
        {"i32", Q_DTYPE_I32, 1, {2}, i32},
        {"i64", Q_DTYPE_I64, 2, {1, 2}, i64},
        {"scalar", Q_DTYPE_F32, 0, {0}, &scalar},
        {"empty", Q_DTYPE_F32, 2, {0, 3}, NULL},
        {"model.layers.0.self_attn.q_proj.weight", Q_DTYPE_U8, 1, {1}, u},
    };
    size_t n = sizeof entries / sizeof entries[0];
    static const char *const mk[] = {"format", "note"}, *const mv[] = {"pt", "quote \" and \xc3\xa9"};
    q_err err;
    const char *path = tmp_path("roundtrip.safetensors");
    TEST_OK(q_st_write(path, entries, n, mk, mv, 2, &err), &err);
    CU_ASSERT_FALSE(q_path_exists(tmp_path("roundtrip.safetensors.tmp")));

    q_st_file f;
    TEST_OK(q_st_open(&f, path, &err), &err);
    CU_ASSERT_EQUAL(f.n_tensors, n);
    for (size_t i = 1; i < f.n_tensors; i++) CU_ASSERT(strcmp(f.tensors[i - 1].name, f.tensors[i].name) < 0);
    for (size_t i = 0; i < n; i++) {
        const q_st_entry *e = &entries[i];
        const q_st_tensor *t = q_st_find(&f, e->name);
        CU_ASSERT_FATAL(t != NULL);
        CU_ASSERT_EQUAL(t->dtype, e->dtype);
        CU_ASSERT_EQUAL(t->ndim, e->ndim);
        int64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            CU_ASSERT_EQUAL(t->shape[d], e->shape[d]);
            numel *= e->shape[d];
        }
        CU_ASSERT_EQUAL(t->numel, numel);
        CU_ASSERT_EQUAL(t->nbytes, (size_t)numel * q_dtype_size(e->dtype));
        if (t->nbytes) CU_ASSERT(memcmp(t->data, e->data, t->nbytes) == 0);
    }
    CU_ASSERT_EQUAL(q_st_find(&f, "scalar")->numel, 1);
    CU_ASSERT_EQUAL(q_st_find(&f, "empty")->nbytes, 0);
    CU_ASSERT_PTR_NULL(q_st_find(&f, "missing"));
    CU_ASSERT_PTR_NULL(q_st_find(&f, ""));
    CU_ASSERT_EQUAL(f.n_meta, 2);
    CU_ASSERT_STRING_EQUAL(q_st_meta(&f, "format"), "pt");
    CU_ASSERT_STRING_EQUAL(q_st_meta(&f, "note"), mv[1]);
    CU_ASSERT_PTR_NULL(q_st_meta(&f, "other"));
    q_st_close(&f);
    q_st_close(&f);  // closing twice is harmless

    // the same file as a model, by path and as the folder's model.safetensors
    q_st_model m;
    TEST_OK(q_st_model_open(&m, path, &err), &err);
    CU_ASSERT_EQUAL(m.n_files, 1);
    CU_ASSERT_EQUAL(m.n_tensors, n);
    CU_ASSERT_EQUAL(q_st_model_find(&m, "i64")->shape[1], 2);
    CU_ASSERT_PTR_NULL(q_st_model_find(&m, "nope"));
    q_st_model_close(&m);
    const char *dir = tmp_path("single");
    TEST_OK(q_mkdir_p(dir, &err), &err);
    char file[4200];
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    TEST_OK(q_st_write(file, entries, 3, NULL, NULL, 0, &err), &err);
    TEST_OK(q_st_model_open(&m, dir, &err), &err);
    CU_ASSERT_EQUAL(m.n_tensors, 3);
    CU_ASSERT_PTR_NOT_NULL(q_st_model_find(&m, "brain"));
    q_st_model_close(&m);

    // zero tensors is a valid file: header "{}" padded to 8
    path = tmp_path("empty.safetensors");
    TEST_OK(q_st_write(path, NULL, 0, NULL, NULL, 0, &err), &err);
    char *data;
    size_t size;
    TEST_OK(q_file_read(path, &data, &size, &err), &err);
    CU_ASSERT_EQUAL(size, 16);
    CU_ASSERT(memcmp(data, "\x08\0\0\0\0\0\0\0{}      ", 16) == 0);
    free(data);
    TEST_OK(q_st_open(&f, path, &err), &err);
    CU_ASSERT_EQUAL(f.n_tensors, 0);
    CU_ASSERT_PTR_NULL(q_st_find(&f, "x"));
    q_st_close(&f);
}

// The exact bytes the reference writer produces: dtype order (alignment
// descending, then the Rust enum's order among equal sizes), then name;
// metadata first, compact JSON, spaces up to a multiple of 8.
static void test_st_layout(void) {
    uint16_t a[2] = {0x1111, 0x2222}, bf = 0x3f80;
    float b = 1.0f;
    uint8_t c[3] = {7, 8, 9}, u = 1;
    int8_t i8 = -1;
    int32_t i32 = 3;
    int64_t a2 = 5;
    const q_st_entry entries[] = {
        {"c", Q_DTYPE_U8, 1, {3}, c},      {"a", Q_DTYPE_F16, 1, {2}, a}, {"b", Q_DTYPE_F32, 1, {1}, &b},
        {"a2", Q_DTYPE_I64, 1, {1}, &a2},  {"a3", Q_DTYPE_I32, 0, {0}, &i32}, {"z", Q_DTYPE_BF16, 1, {1}, &bf},
        {"d", Q_DTYPE_I8, 1, {1}, &i8},    {"a4", Q_DTYPE_U8, 1, {1}, &u},
    };
    static const char *const mk[] = {"format"}, *const mv[] = {"pt"};
    q_err err;
    const char *path = tmp_path("layout.safetensors");
    TEST_OK(q_st_write(path, entries, 8, mk, mv, 1, &err), &err);
    char *data;
    size_t size;
    TEST_OK(q_file_read(path, &data, &size, &err), &err);
    // what safetensors.torch.save_file writes for the same tensors (checked with safetensors 0.8.0)
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"a2\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
                       "\"a3\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[12,16]},"
                       "\"z\":{\"dtype\":\"BF16\",\"shape\":[1],\"data_offsets\":[16,18]},"
                       "\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[18,22]},"
                       "\"d\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[22,23]},"
                       "\"a4\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[23,24]},"
                       "\"c\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[24,27]}}";
    size_t jl = strlen(json), n = (jl + 7) / 8 * 8;
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | (uint8_t)data[i];
    CU_ASSERT_EQUAL(hl, n);
    CU_ASSERT_EQUAL(size, 8 + n + 27);
    CU_ASSERT(memcmp(data + 8, json, jl) == 0);
    if (memcmp(data + 8, json, jl) != 0) fprintf(stderr, "\n  header: %.*s\n", (int)hl, data + 8);
    for (size_t i = jl; i < n; i++) CU_ASSERT_EQUAL(data[8 + i], ' ');
    const char *d = data + 8 + n;
    CU_ASSERT(memcmp(d, &a2, 8) == 0 && memcmp(d + 8, &b, 4) == 0 && memcmp(d + 12, &i32, 4) == 0 &&
              memcmp(d + 16, &bf, 2) == 0 && memcmp(d + 18, a, 4) == 0 && memcmp(d + 22, &i8, 1) == 0 &&
              memcmp(d + 23, &u, 1) == 0 && memcmp(d + 24, c, 3) == 0);
    free(data);
}

static void test_st_write_errors(void) {
    static const float x[4] = {0};
    static const struct {
        q_st_entry e[2];
        size_t n;
        const char *want;
    } cases[] = {
        {{{"a", Q_DTYPE_F32, 1, {1}, x}, {"a", Q_DTYPE_F16, 1, {1}, x}}, 2, "duplicate tensor name a"},
        {{{"", Q_DTYPE_F32, 1, {1}, x}}, 1, "empty name"},
        {{{NULL, Q_DTYPE_F32, 1, {1}, x}}, 1, "empty name"},
        {{{"a", Q_DTYPE_F32, 2, {2, -1}, x}}, 1, "negative dim"},
        {{{"a", Q_DTYPE_F32, 9, {1, 1, 1, 1, 1, 1, 1, 1}, x}}, 1, "at most 8"},
        {{{"a", Q_DTYPE_F32, -1, {1}, x}}, 1, "dims"},
        {{{"a", Q_DTYPE_F32, 1, {4}, NULL}}, 1, "no data"},
        {{{"a", Q_DTYPE_COUNT, 1, {1}, x}}, 1, "invalid dtype"},
        {{{"a", Q_DTYPE_F32, 2, {INT64_MAX, 2}, x}}, 1, "overflows"},
        {{{"__metadata__", Q_DTYPE_F32, 1, {1}, x}}, 1, "reserved"},
        {{{"bad\xff", Q_DTYPE_F32, 1, {1}, x}}, 1, "UTF-8"},
    };
    const char *path = tmp_path("bad_write.safetensors");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        q_err err = {{0}};
        int rc = q_st_write(path, cases[i].e, cases[i].n, NULL, NULL, 0, &err);
        bool ok = rc == -1 && strstr(err.msg, "bad_write.safetensors") && strstr(err.msg, cases[i].want);
        if (!ok) fprintf(stderr, "\n  write case %zu: rc %d, message \"%s\"\n", i, rc, err.msg);
        CU_ASSERT(ok);
        CU_ASSERT_FALSE(q_path_exists(path));
    }
    static const char *const mk[] = {"k", "k"}, *const mv[] = {"1", "2"};
    q_st_entry e = {"a", Q_DTYPE_F32, 1, {1}, x};
    q_err err;
    CU_ASSERT_EQUAL(q_st_write(path, &e, 1, mk, mv, 2, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "duplicate __metadata__ key k"));
    CU_ASSERT_EQUAL(q_st_write(tmp_path("no/such/folder.safetensors"), &e, 1, NULL, NULL, 0, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "folder.safetensors.tmp"));
}

// ----------------------------------------------------------------------------
// safetensors: corrupt files

// A file image: 8-byte header length (len_override when non-zero), header, data_len data bytes.
static char *make_image(const char *header, uint64_t len_override, size_t data_len, size_t *size) {
    size_t hl = strlen(header);
    *size = 8 + hl + data_len;
    char *img = calloc(1, *size);
    uint64_t n = len_override ? len_override : hl;
    for (int i = 0; i < 8; i++) img[i] = (char)(n >> (8 * i));
    memcpy(img + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) img[8 + hl + i] = (char)i;
    return img;
}

#define T4(name, dt, shape, b, e) "\"" name "\":{\"dtype\":\"" dt "\",\"shape\":" shape ",\"data_offsets\":[" #b "," #e "]}"

static void test_st_corrupt(void) {
    static const struct {
        const char *file, *header;
        uint64_t len_override;
        size_t data_len;
        const char *want;
    } cases[] = {
        {"trunc_header.st", "{\"a\":1}", 100, 0, "runs past the end"},
        {"huge_header.st", "{}", 200000000, 0, "exceeds the limit"},
        {"bad_json.st", "{\"a\":{\"dtype\":", 0, 0, "invalid JSON header: line 1, column 15"},
        {"not_object.st", "[]", 0, 0, "does not start with '{'"},
        {"empty_header.st", "", 0, 0, "does not start with '{'"},
        {"trailing_comma.st", "{" T4("a", "F32", "[1]", 0, 4) ",}", 0, 4, "trailing comma"},
        {"unknown_dtype.st", "{" T4("a", "F33", "[1]", 0, 4) "}", 0, 4, "unknown dtype F33 in tensor a"},
        {"unsupported_dtype.st", "{" T4("w", "F64", "[1]", 0, 8) "}", 0, 8, "unsupported dtype F64 in tensor w"},
        {"bool_dtype.st", "{" T4("m", "BOOL", "[1]", 0, 1) "}", 0, 1, "unsupported dtype BOOL in tensor m"},
        {"dtype_number.st", "{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 0, 4, "dtype must be a string"},
        {"shape_mismatch.st", "{" T4("a", "F32", "[2]", 0, 4) "}", 0, 4, "need 8 bytes"},
        {"shape_negative.st", "{" T4("a", "U8", "[-1]", 0, 0) "}", 0, 0, "non-negative integers"},
        {"shape_float.st", "{" T4("a", "U8", "[2.0]", 0, 2) "}", 0, 2, "non-negative integers"},
        {"shape_9d.st", "{" T4("a", "U8", "[1,1,1,1,1,1,1,1,1]", 0, 1) "}", 0, 1, "9 dims"},
        {"shape_overflow.st", "{" T4("a", "U8", "[4294967296,4294967296]", 0, 1) "}", 0, 1, "overflows"},
        {"bytes_overflow.st", "{" T4("a", "I64", "[4611686018427387904]", 0, 1) "}", 0, 1, "overflows"},
        {"offsets_reversed.st", "{" T4("a", "U8", "[0]", 4, 0) "}", 0, 0, "after end"},
        {"offsets_short.st", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0]}}", 0, 0, "two non-negative"},
        {"overlap.st", "{" T4("a", "F32", "[2]", 0, 8) "," T4("b", "F32", "[2]", 4, 12) "}", 0, 12, "overlaps"},
        {"hole.st", "{" T4("a", "F32", "[1]", 0, 4) "," T4("b", "F32", "[1]", 8, 12) "}", 0, 12, "hole"},
        {"not_at_zero.st", "{" T4("a", "F32", "[1]", 4, 8) "}", 0, 8, "hole"},
        {"trailing_bytes.st", "{" T4("a", "F32", "[1]", 0, 4) "}", 0, 6, "2 trailing bytes"},
        {"trunc_data.st", "{" T4("a", "F32", "[2]", 0, 8) "}", 0, 4, "truncated"},
        {"duplicate.st", "{" T4("a", "F32", "[1]", 0, 4) "," T4("a", "F32", "[1]", 4, 8) "}", 0, 8,
         "duplicate tensor name a"},
        {"meta_number.st", "{\"__metadata__\":{\"k\":1}}", 0, 0, "__metadata__ value of k must be a string"},
        {"meta_array.st", "{\"__metadata__\":[]}", 0, 0, "__metadata__ must be an object"},
        {"meta_twice.st", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, 0, "duplicate __metadata__"},
        {"meta_dup_key.st", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, 0, "duplicate __metadata__ key k"},
        {"meta_nul.st", "{\"__metadata__\":{\"k\":\"a\\u0000b\"}}", 0, 0, "must be a string"},
        {"entry_array.st", "{\"a\":[]}", 0, 0, "entry must be an object"},
        {"extra_field.st", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0],\"x\":1}}", 0, 0,
         "unexpected field x"},
        {"missing_field.st", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0]}}", 0, 0, "missing field data_offsets"},
        {"dup_field.st", "{\"a\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0, 0,
         "duplicate field dtype"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t size;
        char *img = make_image(cases[i].header, cases[i].len_override, cases[i].data_len, &size);
        const char *path = tmp_path(cases[i].file);
        q_err err = {{0}};
        TEST_OK(q_file_write_atomic(path, img, size, &err), &err);
        q_st_file f;
        int rc = q_st_open(&f, path, &err);
        bool ok = rc == -1 && strstr(err.msg, cases[i].file) && strstr(err.msg, cases[i].want);
        if (!ok) fprintf(stderr, "\n  corrupt case %s: rc %d, message \"%s\"\n", cases[i].file, rc, err.msg);
        CU_ASSERT(ok);
        if (rc == 0) q_st_close(&f);
        // the same bytes in memory give the same verdict, named by the caller's name
        rc = q_st_open_memory(&f, img, size, "in-memory", &err);
        CU_ASSERT(rc == -1 && strncmp(err.msg, "in-memory: ", 11) == 0 && strstr(err.msg, cases[i].want));
        if (rc == 0) q_st_close(&f);
        free(img);
    }

    // files too short to hold the header length
    q_err err;
    q_st_file f;
    const char *path = tmp_path("short.st");
    TEST_OK(q_file_write_atomic(path, "\x02\0\0\0\0", 5, &err), &err);
    CU_ASSERT_EQUAL(q_st_open(&f, path, &err), -1);
    CU_ASSERT(strstr(err.msg, "short.st") && strstr(err.msg, "too short"));
    path = tmp_path("zero.st");
    TEST_OK(q_file_write_atomic(path, "", 0, &err), &err);
    CU_ASSERT_EQUAL(q_st_open(&f, path, &err), -1);
    CU_ASSERT(strstr(err.msg, "zero.st") && strstr(err.msg, "0 bytes"));
    CU_ASSERT_EQUAL(q_st_open(&f, tmp_path("absent.st"), &err), -1);
    CU_ASSERT(strstr(err.msg, "absent.st") && strstr(err.msg, "cannot open"));
    CU_ASSERT_EQUAL(q_st_open(&f, tmp, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "not a regular file"));

    // valid oddities: header right-padded with spaces, zero-size tensors sharing an offset,
    // entries listed out of offset order, empty __metadata__
    size_t size;
    char *img = make_image("{" T4("b", "F32", "[1]", 4, 8) "," T4("z", "U8", "[0,3]", 4, 4) ","
                           T4("a", "F32", "[]", 0, 4) "," T4("e", "U8", "[0]", 0, 0) ",\"__metadata__\":{}}    ",
                           0, 8, &size);
    TEST_OK(q_st_open_memory(&f, img, size, "padded", &err), &err);
    CU_ASSERT_EQUAL(f.n_tensors, 4);
    CU_ASSERT_STRING_EQUAL(f.tensors[0].name, "a");
    CU_ASSERT_EQUAL(f.tensors[0].ndim, 0);
    CU_ASSERT_EQUAL(q_st_find(&f, "b")->data, (const uint8_t *)f.map + size - 4);
    CU_ASSERT_EQUAL(q_st_find(&f, "z")->nbytes, 0);
    CU_ASSERT_EQUAL(f.n_meta, 0);
    q_st_close(&f);
    free(img);
}

// ----------------------------------------------------------------------------
// safetensors: sharded model folders

static void write_index(const char *dir, const char *json) {
    char path[4200];
    q_err err;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    TEST_OK(q_file_write_atomic(path, json, strlen(json), &err), &err);
}

static void test_st_sharded(void) {
    float a[2] = {1, 2}, b[3] = {3, 4, 5}, c[1] = {6};
    const q_st_entry s1[] = {{"a", Q_DTYPE_F32, 1, {2}, a}, {"b", Q_DTYPE_F32, 1, {3}, b}};
    const q_st_entry s2[] = {{"c", Q_DTYPE_F32, 1, {1}, c}};
    const char *dir = tmp_path("sharded");
    char path[4200];
    q_err err;
    TEST_OK(q_mkdir_p(dir, &err), &err);
    snprintf(path, sizeof path, "%s/model-00001-of-00002.safetensors", dir);
    TEST_OK(q_st_write(path, s1, 2, NULL, NULL, 0, &err), &err);
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    TEST_OK(q_st_write(path, s2, 1, NULL, NULL, 0, &err), &err);

    write_index(dir, "{\n  \"metadata\": {\n    \"total_size\": 24\n  },\n  \"weight_map\": {\n"
                     "    \"a\": \"model-00001-of-00002.safetensors\",\n"
                     "    \"b\": \"model-00001-of-00002.safetensors\",\n"
                     "    \"c\": \"model-00002-of-00002.safetensors\"\n  }\n}\n");
    q_st_model m;
    TEST_OK(q_st_model_open(&m, dir, &err), &err);
    CU_ASSERT_EQUAL(m.n_files, 2);
    CU_ASSERT_EQUAL(m.n_tensors, 3);
    CU_ASSERT(strcmp(m.tensors[0]->name, "a") == 0 && strcmp(m.tensors[2]->name, "c") == 0);
    const q_st_tensor *t = q_st_model_find(&m, "c");
    CU_ASSERT_FATAL(t != NULL);
    CU_ASSERT_EQUAL(*(const float *)t->data, 6.0f);
    CU_ASSERT_EQUAL(((const float *)q_st_model_find(&m, "b")->data)[2], 5.0f);
    q_st_model_close(&m);

    static const struct {
        const char *index, *want;
    } bad[] = {
        {"{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\",\"x\":\"model-00003-of-00003.safetensors\"}}",
         "model-00003-of-00003.safetensors: cannot open"},
        {"{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\",\"c\":\"model-00001-of-00002.safetensors\"}}",
         "tensor c is not in shard model-00001-of-00002.safetensors"},
        {"{\"weight_map\":{\"a\":\"../sharded/model-00001-of-00002.safetensors\"}}", "weight_map entry a"},
        {"{\"weight_map\":{\"a\":\"..\"}}", "weight_map entry a"},
        {"{\"weight_map\":{\"a\":1}}", "weight_map entry a"},
        {"{\"metadata\":{}}", "needs a \"weight_map\" object"},
        {"{\"weight_map\":{\"a\":\"x\",}}", "invalid JSON: line 1"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_index(dir, bad[i].index);
        int rc = q_st_model_open(&m, dir, &err);
        bool ok = rc == -1 && strstr(err.msg, bad[i].want);
        if (!ok) fprintf(stderr, "\n  index case %zu: rc %d, message \"%s\"\n", i, rc, err.msg);
        CU_ASSERT(ok);
        CU_ASSERT(m.n_files == 0 && m.n_tensors == 0 && m.files == NULL);
    }

    // a tensor in two shards
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    TEST_OK(q_st_write(path, s1, 1, NULL, NULL, 0, &err), &err);
    write_index(dir, "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                     "\"b\":\"model-00002-of-00002.safetensors\"}}");
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    const q_st_entry both[] = {{"a", Q_DTYPE_F32, 1, {2}, a}, {"b", Q_DTYPE_F32, 1, {3}, b}};
    TEST_OK(q_st_write(path, both, 2, NULL, NULL, 0, &err), &err);
    CU_ASSERT_EQUAL(q_st_model_open(&m, dir, &err), -1);
    CU_ASSERT_PTR_NOT_NULL(strstr(err.msg, "tensor a is in both"));

    // a folder with neither file
    const char *empty = tmp_path("no_model");
    TEST_OK(q_mkdir_p(empty, &err), &err);
    CU_ASSERT_EQUAL(q_st_model_open(&m, empty, &err), -1);
    snprintf(path, sizeof path, "%s: no model.safetensors or model.safetensors.index.json", empty);
    CU_ASSERT_STRING_EQUAL(err.msg, path);
}

// ----------------------------------------------------------------------------

int main(void) {
    if (CU_initialize_registry() != CUE_SUCCESS) return 1;
    CU_pSuite json = CU_add_suite("json", NULL, NULL);
    CU_add_test(json, "nested documents", test_json_nested);
    CU_add_test(json, "strings, escapes, surrogate pairs", test_json_strings);
    CU_add_test(json, "numbers and int64 limits", test_json_numbers);
    CU_add_test(json, "nesting depth limit", test_json_depth);
    CU_add_test(json, "invalid documents", test_json_invalid);
    CU_pSuite floats = CU_add_suite("floats", NULL, NULL);
    CU_add_test(floats, "Python float repr", test_float_repr);
    CU_add_test(floats, "f16 and bf16 rounding", test_half);
    CU_pSuite st = CU_add_suite("safetensors", suite_init, suite_clean);
    CU_add_test(st, "write and read back", test_st_roundtrip);
    CU_add_test(st, "reference writer layout", test_st_layout);
    CU_add_test(st, "write errors", test_st_write_errors);
    CU_add_test(st, "corrupt files", test_st_corrupt);
    CU_add_test(st, "sharded folders", test_st_sharded);
    return test_main();
}
