// core/gguf.c: a read-only GGUF view (docs: gguf.md 3.1-3.6, 3.9). The file
// is mmapped; the header, metadata and tensor infos are validated the way
// ggml's gguf.cpp validates them, so that every pointer handed out (a value,
// a string, a tensor's data) lies inside the mapping:
//
//   magic "GGUF", version 2 or 3 (v1 had u32 lengths), tensor and KV counts
//   bounded by what the file could hold, every length inside the file, value
//   types 0..12, no arrays of arrays, unique keys, general.alignment a u32
//   power of two, tensor names unique and < 64 bytes, n_dims <= 4, dims
//   non-negative with a product that fits, a known ggml type, ne[0] a
//   multiple of its block, offsets the running sum of the padded sizes, and
//   data inside the file.
//
// Dequantization follows ggml-quants.c dequantize_row_*: products and sums
// in fp32, one rounding each (the build has -ffp-contract=off).
#define _GNU_SOURCE
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NAME 64       // ggml's GGML_MAX_NAME, including the NUL
#define GGUF_MAX_KEY 65535     // the spec's limit on key length

// ----------------------------------------------------------------------------
// ggml types: block size and bytes per block (ggml.c type_traits). The table
// knows every type so that the layout of any file can be checked; `read`
// marks the ones q_gguf_dequantize handles.

typedef struct ggml_type_info {
    const char *name;
    int64_t block, bytes;
    bool read;
} ggml_type_info;

static const ggml_type_info ggml_types[] = {
    [0] = {"F32", 1, 4, true},        [1] = {"F16", 1, 2, true},         [2] = {"Q4_0", 32, 18, true},
    [3] = {"Q4_1", 32, 20, true},     [6] = {"Q5_0", 32, 22, false},     [7] = {"Q5_1", 32, 24, false},
    [8] = {"Q8_0", 32, 34, true},     [9] = {"Q8_1", 32, 36, false},     [10] = {"Q2_K", 256, 84, false},
    [11] = {"Q3_K", 256, 110, false}, [12] = {"Q4_K", 256, 144, false},  [13] = {"Q5_K", 256, 176, false},
    [14] = {"Q6_K", 256, 210, false}, [15] = {"Q8_K", 256, 292, false},  [16] = {"IQ2_XXS", 256, 66, false},
    [17] = {"IQ2_XS", 256, 74, false}, [18] = {"IQ3_XXS", 256, 98, false}, [19] = {"IQ1_S", 256, 50, false},
    [20] = {"IQ4_NL", 32, 18, false}, [21] = {"IQ3_S", 256, 110, false}, [22] = {"IQ2_S", 256, 82, false},
    [23] = {"IQ4_XS", 256, 136, false}, [24] = {"I8", 1, 1, false},      [25] = {"I16", 1, 2, false},
    [26] = {"I32", 1, 4, false},      [27] = {"I64", 1, 8, false},       [28] = {"F64", 1, 8, false},
    [29] = {"IQ1_M", 256, 56, false}, [30] = {"BF16", 1, 2, true},       [34] = {"TQ1_0", 256, 54, false},
    [35] = {"TQ2_0", 256, 66, false}, [39] = {"MXFP4", 32, 17, false},   [40] = {"NVFP4", 64, 36, false},
    [41] = {"Q1_0", 128, 18, false},
};
#define N_GGML_TYPES (sizeof ggml_types / sizeof ggml_types[0])

static const ggml_type_info *type_lookup(uint32_t type) {
    return type < N_GGML_TYPES && ggml_types[type].name ? &ggml_types[type] : NULL;
}

bool q_gguf_type_info(uint32_t type, int64_t *block, int64_t *block_bytes) {
    const ggml_type_info *t = type_lookup(type);
    if (!t || !t->read) return false;
    if (block) *block = t->block;
    if (block_bytes) *block_bytes = t->bytes;
    return true;
}

const char *q_gguf_type_name(uint32_t type) {
    const ggml_type_info *t = type_lookup(type);
    return t ? t->name : "unknown";
}

static const char *value_type_name(uint32_t t) {
    static const char *const names[] = {"u8",     "i8",    "u16",   "i16", "u32", "i32", "f32",
                                        "bool",   "string", "array", "u64", "i64", "f64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

// Bytes of one fixed-size value; 0 for strings and arrays.
static size_t value_size(uint32_t t) {
    switch (t) {
    case Q_GGUF_U8: case Q_GGUF_I8: case Q_GGUF_BOOL: return 1;
    case Q_GGUF_U16: case Q_GGUF_I16: return 2;
    case Q_GGUF_U32: case Q_GGUF_I32: case Q_GGUF_F32: return 4;
    case Q_GGUF_U64: case Q_GGUF_I64: case Q_GGUF_F64: return 8;
    default: return 0;
    }
}

// ----------------------------------------------------------------------------
// a bounds-checked cursor over the mapping; every read names what it wanted

typedef struct cursor {
    const uint8_t *base, *p, *end;
} cursor;

static size_t cur_pos(const cursor *c) { return (size_t)(c->p - c->base); }
static size_t cur_left(const cursor *c) { return (size_t)(c->end - c->p); }

static int need(cursor *c, uint64_t n, const char *what, q_err *err) {
    if (n > cur_left(c))
        return q_err_set(err, "truncated: %s needs %llu bytes at offset %zu, the file has %zu left", what,
                         (unsigned long long)n, cur_pos(c), cur_left(c));
    return 0;
}

static int rd_u32(cursor *c, uint32_t *v, const char *what, q_err *err) {
    if (need(c, 4, what, err)) return -1;
    memcpy(v, c->p, 4);
    c->p += 4;
    return 0;
}

static int rd_u64(cursor *c, uint64_t *v, const char *what, q_err *err) {
    if (need(c, 8, what, err)) return -1;
    memcpy(v, c->p, 8);
    c->p += 8;
    return 0;
}

// A gguf_string: u64 length, then the bytes (no NUL). Points into the map.
static int rd_string(cursor *c, const char **s, uint64_t *len, const char *what, q_err *err) {
    if (rd_u64(c, len, what, err)) return -1;
    if (*len > cur_left(c))
        return q_err_set(err, "%s: string length %llu at offset %zu runs past the end of the file (%zu bytes left)",
                         what, (unsigned long long)*len, cur_pos(c) - 8, cur_left(c));
    *s = (const char *)c->p;
    c->p += *len;
    return 0;
}

// A key or tensor name as a C string: no embedded NUL, bounded length.
static int rd_name(cursor *c, char **out, uint64_t max, const char *what, q_err *err) {
    const char *s = NULL;
    uint64_t len = 0;
    if (rd_string(c, &s, &len, what, err)) return -1;
    if (len == 0) return q_err_set(err, "%s at offset %zu is empty", what, cur_pos(c) - 8);
    if (len > max)
        return q_err_set(err, "%s at offset %zu is %llu bytes long (at most %llu)", what, cur_pos(c) - 8 - (size_t)len,
                         (unsigned long long)len, (unsigned long long)max);
    if (memchr(s, 0, len)) return q_err_set(err, "%s \"%.*s\" contains a NUL byte", what, (int)strnlen(s, len), s);
    if (!(*out = strndup(s, len))) return q_err_set(err, "out of memory");
    return 0;
}

// ----------------------------------------------------------------------------
// parsing

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// Sorts a copy of the names and reports the first duplicate.
static int check_unique(char *const *names, size_t stride, size_t n, const char *what, q_err *err) {
    if (n < 2) return 0;
    const char **s = malloc(n * sizeof *s);
    if (!s) return q_err_set(err, "out of memory");
    for (size_t i = 0; i < n; i++) s[i] = *(char *const *)((const char *)names + i * stride);
    qsort(s, n, sizeof *s, cmp_str_ptr);
    int rc = 0;
    for (size_t i = 1; i < n && !rc; i++)
        if (strcmp(s[i - 1], s[i]) == 0) rc = q_err_set(err, "duplicate %s \"%s\"", what, s[i]);
    free(s);
    return rc;
}

static int parse_value(cursor *c, q_gguf_kv *kv, q_err *err) {
    uint32_t type;
    if (rd_u32(c, &type, "a value type", err)) return -1;
    if (type > Q_GGUF_F64) return q_err_set(err, "key \"%s\": unknown value type %u", kv->key, type);
    kv->type = (q_gguf_type)type;
    if (type == Q_GGUF_STRING) {
        const char *s;
        uint64_t len;
        kv->data = c->p;
        return rd_string(c, &s, &len, kv->key, err);
    }
    if (type != Q_GGUF_ARRAY) {
        kv->data = c->p;
        if (need(c, value_size(type), kv->key, err)) return -1;
        c->p += value_size(type);
        return 0;
    }
    uint32_t elem;
    if (rd_u32(c, &elem, kv->key, err) || rd_u64(c, &kv->count, kv->key, err)) return -1;
    if (elem == Q_GGUF_ARRAY) return q_err_set(err, "key \"%s\": arrays of arrays are not supported", kv->key);
    if (elem > Q_GGUF_F64) return q_err_set(err, "key \"%s\": unknown array element type %u", kv->key, elem);
    kv->elem_type = (q_gguf_type)elem;
    kv->data = c->p;
    if (elem == Q_GGUF_STRING) {
        if (kv->count > cur_left(c) / 8)  // each element has at least its u64 length
            return q_err_set(err, "key \"%s\": %llu strings cannot fit in the %zu bytes left", kv->key,
                             (unsigned long long)kv->count, cur_left(c));
        for (uint64_t i = 0; i < kv->count; i++) {
            const char *s;
            uint64_t len;
            if (rd_string(c, &s, &len, kv->key, err)) return -1;
        }
        return 0;
    }
    const size_t size = value_size(elem);
    if (kv->count > cur_left(c) / size)
        return q_err_set(err, "key \"%s\": an array of %llu %s values cannot fit in the %zu bytes left", kv->key,
                         (unsigned long long)kv->count, value_type_name(elem), cur_left(c));
    c->p += kv->count * size;
    return 0;
}

static int parse_tensor_info(cursor *c, q_gguf_tensor *t, q_err *err) {
    if (rd_name(c, &t->name, GGUF_MAX_NAME - 1, "tensor name", err)) return -1;
    char what[96];
    snprintf(what, sizeof what, "the info of tensor \"%s\"", t->name);
    uint32_t n_dims;
    if (rd_u32(c, &n_dims, what, err)) return -1;
    if (n_dims > GGUF_MAX_DIMS)
        return q_err_set(err, "tensor \"%s\" has %u dimensions (at most %d)", t->name, n_dims, GGUF_MAX_DIMS);
    t->n_dims = (int)n_dims;
    t->numel = 1;
    for (int i = 0; i < GGUF_MAX_DIMS; i++) {
        uint64_t ne = 1;
        if (i < t->n_dims && rd_u64(c, &ne, what, err)) return -1;
        if (ne > (uint64_t)INT64_MAX)
            return q_err_set(err, "tensor \"%s\": dimension %d is negative (%lld)", t->name, i, (long long)ne);
        t->ne[i] = (int64_t)ne;
        if (ne && t->numel > INT64_MAX / (int64_t)ne)
            return q_err_set(err, "tensor \"%s\": the element count overflows", t->name);
        t->numel *= (int64_t)ne;
    }
    if (rd_u32(c, &t->type, what, err)) return -1;
    const ggml_type_info *ti = type_lookup(t->type);
    if (!ti) return q_err_set(err, "tensor \"%s\" has unknown ggml type %u", t->name, t->type);
    if (t->ne[0] % ti->block)
        return q_err_set(err, "tensor \"%s\": ne[0] = %lld is not a multiple of the %s block size %lld", t->name,
                         (long long)t->ne[0], ti->name, (long long)ti->block);
    // rows * (blocks per row * bytes per block), each step checked
    const int64_t row = t->ne[0] / ti->block * ti->bytes, rows = t->ne[0] ? t->numel / t->ne[0] : 0;
    if (rows && row > INT64_MAX / rows) return q_err_set(err, "tensor \"%s\": the byte size overflows", t->name);
    t->nbytes = (size_t)(row * rows);
    return 0;
}

static int parse(q_gguf *g, q_err *err) {
    cursor c = {g->map, g->map, g->map + g->map_size};
    if (g->map_size < 4 || memcmp(g->map, GGUF_MAGIC, 4) != 0) {
        char got[16] = "";
        for (size_t i = 0; i < 4 && i < g->map_size; i++)
            snprintf(got + 3 * i, sizeof got - 3 * i, "%02x ", g->map[i]);
        return q_err_set(err, "not a GGUF file (the first bytes are %s%s, expected 47 47 55 46 \"GGUF\")",
                         g->map_size ? got : "missing", g->map_size && g->map_size < 4 ? "(short file)" : "");
    }
    c.p += 4;
    if (rd_u32(&c, &g->version, "the version", err)) return -1;
    if (g->version == 1) return q_err_set(err, "GGUF version 1 is not supported (only 2 and 3)");
    if (g->version != 2 && g->version != 3) {
        if (g->version >= 0x10000 && (g->version & 0xffff) == 0)
            return q_err_set(err, "GGUF version %u is not supported: the file looks big-endian", g->version);
        return q_err_set(err, "GGUF version %u is not supported (only 2 and 3)", g->version);
    }
    uint64_t n_tensors, n_kv;
    if (rd_u64(&c, &n_tensors, "the tensor count", err) || rd_u64(&c, &n_kv, "the metadata count", err)) return -1;
    // A KV takes at least 8 (key length) + 1 (key) + 4 (type) + 1 (value)
    // bytes, a tensor info 8 + 1 + 4 + 4 + 8: counts past that are lies.
    const size_t left = cur_left(&c);
    if (n_tensors > left / 25)
        return q_err_set(err, "tensor count %llu is impossible for a file of %zu bytes", (unsigned long long)n_tensors,
                         g->map_size);
    if (n_kv > left / 14)
        return q_err_set(err, "metadata count %llu is impossible for a file of %zu bytes", (unsigned long long)n_kv,
                         g->map_size);
    g->kv = calloc(n_kv ? n_kv : 1, sizeof *g->kv);
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
    if (!g->kv || !g->tensors) return q_err_set(err, "out of memory");

    for (size_t i = 0; i < n_kv; i++) {
        q_gguf_kv *kv = &g->kv[i];
        if (rd_name(&c, &kv->key, GGUF_MAX_KEY, "metadata key", err)) return -1;
        g->n_kv = i + 1;  // owned from here on
        if (parse_value(&c, kv, err)) return -1;
    }
    if (check_unique(&g->kv[0].key, sizeof *g->kv, g->n_kv, "metadata key", err)) return -1;
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const q_gguf_kv *al = q_gguf_find_kv(g, "general.alignment");
    if (al) {
        if (al->type != Q_GGUF_U32)
            return q_err_set(err, "general.alignment must be a u32, found %s", value_type_name(al->type));
        memcpy(&g->alignment, al->data, 4);
        if (g->alignment == 0 || (g->alignment & (g->alignment - 1)))
            return q_err_set(err, "general.alignment = %u is not a power of two", g->alignment);
    }

    // offsets[i]: tensor i's start in the data section, checked against the
    // running sum of the padded sizes; absolute once the section's start is known
    uint64_t *offsets = malloc((n_tensors ? n_tensors : 1) * sizeof *offsets);
    if (!offsets) return q_err_set(err, "out of memory");
    int rc = -1;
    uint64_t expect = 0;
    const uint64_t align = g->alignment;
    for (size_t i = 0; i < n_tensors; i++) {
        q_gguf_tensor *t = &g->tensors[i];
        g->n_tensors = i + 1;
        uint64_t offset;
        if (parse_tensor_info(&c, t, err) || rd_u64(&c, &offset, "a tensor offset", err)) goto done;
        if (offset % align) {
            q_err_set(err, "tensor \"%s\": offset %llu is not a multiple of the alignment %u", t->name,
                      (unsigned long long)offset, g->alignment);
            goto done;
        }
        if (offset != expect) {
            q_err_set(err, "tensor \"%s\": offset %llu, expected %llu (the padded sizes of the tensors before it)",
                      t->name, (unsigned long long)offset, (unsigned long long)expect);
            goto done;
        }
        // a loose bound now (the data section starts later), which also keeps expect from overflowing
        if (offset > g->map_size || t->nbytes > g->map_size - offset) {
            q_err_set(err, "tensor \"%s\": %zu bytes of data at offset %llu cannot fit in a file of %zu bytes",
                      t->name, t->nbytes, (unsigned long long)offset, g->map_size);
            goto done;
        }
        offsets[i] = offset;
        expect += (t->nbytes + align - 1) / align * align;
    }
    if (check_unique(&g->tensors[0].name, sizeof *g->tensors, g->n_tensors, "tensor name", err)) goto done;

    const size_t data_start = (cur_pos(&c) + align - 1) / align * align;
    for (size_t i = 0; i < g->n_tensors; i++) {
        q_gguf_tensor *t = &g->tensors[i];
        if (data_start > g->map_size || offsets[i] > g->map_size - data_start ||
            t->nbytes > g->map_size - data_start - offsets[i]) {
            q_err_set(err, "tensor \"%s\": data [%llu, %llu) lies outside the file (%zu bytes, data section at "
                      "%zu): truncated?", t->name, (unsigned long long)(data_start + offsets[i]),
                      (unsigned long long)(data_start + offsets[i] + t->nbytes), g->map_size, data_start);
            goto done;
        }
        t->data = g->map + data_start + offsets[i];
    }
    rc = 0;
done:
    free(offsets);
    return rc;
}

// After the bytes are in place (mapped or the caller's): validate and index.
static int open_finish(q_gguf *g, const char *name, q_err *err) {
    g->path = strdup(name);
    q_err e;
    if (!g->path || parse(g, &e)) {
        if (!g->path) snprintf(e.msg, sizeof e.msg, "out of memory");
        q_gguf_close(g);
        return q_err_set(err, "%s: %s", name, e.msg);
    }
    return 0;
}

int q_gguf_open(q_gguf *g, const char *path, q_err *err) {
    memset(g, 0, sizeof *g);
    if (q_file_map(path, &g->map, &g->map_size, err)) return -1;
    g->owns_map = true;
    return open_finish(g, path, err);
}

int q_gguf_open_memory(q_gguf *g, const void *data, size_t size, const char *name, q_err *err) {
    memset(g, 0, sizeof *g);
    g->map = data;
    g->map_size = data ? size : 0;
    return open_finish(g, name, err);
}

void q_gguf_close(q_gguf *g) {
    if (g->owns_map) q_file_unmap(g->map, g->map_size);
    for (size_t i = 0; i < g->n_kv; i++) free(g->kv[i].key);
    for (size_t i = 0; i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->kv);
    free(g->tensors);
    free(g->path);
    memset(g, 0, sizeof *g);
}

// ----------------------------------------------------------------------------
// lookups and typed getters

const q_gguf_kv *q_gguf_find_kv(const q_gguf *g, const char *key) {
    for (size_t i = 0; i < g->n_kv; i++)
        if (strcmp(g->kv[i].key, key) == 0) return &g->kv[i];
    return NULL;
}

const q_gguf_tensor *q_gguf_find_tensor(const q_gguf *g, const char *name) {
    for (size_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

static const q_gguf_kv *find_or_fail(const q_gguf *g, const char *key, q_err *err) {
    const q_gguf_kv *kv = q_gguf_find_kv(g, key);
    if (!kv) q_err_set(err, "%s: missing key \"%s\"", g->path, key);
    return kv;
}

static int wrong_type(const q_gguf *g, const q_gguf_kv *kv, const char *want, q_err *err) {
    if (kv->type == Q_GGUF_ARRAY)
        return q_err_set(err, "%s: key \"%s\" is an array of %s, expected %s", g->path, kv->key,
                         value_type_name(kv->elem_type), want);
    return q_err_set(err, "%s: key \"%s\" is a %s, expected %s", g->path, kv->key, value_type_name(kv->type), want);
}

// Integer values of any width; false for other types or a u64 past INT64_MAX.
static bool read_int(q_gguf_type type, const uint8_t *p, int64_t *v, bool *overflow) {
    *overflow = false;
    switch (type) {
    case Q_GGUF_U8: *v = p[0]; return true;
    case Q_GGUF_I8: *v = (int8_t)p[0]; return true;
    case Q_GGUF_U16: { uint16_t x; memcpy(&x, p, 2); *v = x; return true; }
    case Q_GGUF_I16: { int16_t x; memcpy(&x, p, 2); *v = x; return true; }
    case Q_GGUF_U32: { uint32_t x; memcpy(&x, p, 4); *v = x; return true; }
    case Q_GGUF_I32: { int32_t x; memcpy(&x, p, 4); *v = x; return true; }
    case Q_GGUF_I64: memcpy(v, p, 8); return true;
    case Q_GGUF_U64: {
        uint64_t x;
        memcpy(&x, p, 8);
        if (x > (uint64_t)INT64_MAX) return *overflow = true, false;
        *v = (int64_t)x;
        return true;
    }
    default: return false;
    }
}

int q_gguf_get_int(const q_gguf *g, const char *key, int64_t *v, q_err *err) {
    const q_gguf_kv *kv = find_or_fail(g, key, err);
    if (!kv) return -1;
    bool overflow;
    if (read_int(kv->type, kv->data, v, &overflow)) return 0;
    if (overflow) return q_err_set(err, "%s: key \"%s\" (u64) does not fit in an int64", g->path, key);
    return wrong_type(g, kv, "an integer", err);
}

int q_gguf_get_float(const q_gguf *g, const char *key, double *v, q_err *err) {
    const q_gguf_kv *kv = find_or_fail(g, key, err);
    if (!kv) return -1;
    if (kv->type == Q_GGUF_F32) {
        float f;
        memcpy(&f, kv->data, 4);
        *v = f;
        return 0;
    }
    if (kv->type == Q_GGUF_F64) {
        memcpy(v, kv->data, 8);
        return 0;
    }
    int64_t i;
    bool overflow;
    if (read_int(kv->type, kv->data, &i, &overflow)) {
        *v = (double)i;
        return 0;
    }
    return wrong_type(g, kv, "a number", err);
}

int q_gguf_get_bool(const q_gguf *g, const char *key, bool *v, q_err *err) {
    const q_gguf_kv *kv = find_or_fail(g, key, err);
    if (!kv) return -1;
    if (kv->type != Q_GGUF_BOOL) return wrong_type(g, kv, "a bool", err);
    *v = kv->data[0] != 0;
    return 0;
}

int q_gguf_get_string(const q_gguf *g, const char *key, const char **s, size_t *len, q_err *err) {
    const q_gguf_kv *kv = find_or_fail(g, key, err);
    if (!kv) return -1;
    if (kv->type != Q_GGUF_STRING) return wrong_type(g, kv, "a string", err);
    uint64_t n;
    memcpy(&n, kv->data, 8);
    *s = (const char *)kv->data + 8;
    *len = (size_t)n;
    return 0;
}

// The strings were bounds-checked at open; the checks here only keep a
// hand-made kv from walking off its end.
void q_gguf_string_iter_init(q_gguf_string_iter *it, const q_gguf_kv *kv) {
    const bool ok = kv && kv->type == Q_GGUF_ARRAY && kv->elem_type == Q_GGUF_STRING;
    it->p = ok ? kv->data : NULL;
    it->end = NULL;
    it->left = ok ? kv->count : 0;
}

bool q_gguf_string_iter_next(q_gguf_string_iter *it, const char **s, size_t *len) {
    if (!it->left || !it->p) return false;
    uint64_t n;
    memcpy(&n, it->p, 8);
    *s = (const char *)it->p + 8;
    *len = (size_t)n;
    it->p += 8 + n;
    it->left--;
    return true;
}

// ----------------------------------------------------------------------------
// dequantization (ggml-quants.c dequantize_row_*; gguf-py quants.py agrees)

static float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return q_f16_to_f32(h);
}

// Q4_0: half d; u8 qs[16]. Low nibble of byte j is element j, high nibble element j+16.
static void dequant_q4_0(const uint8_t *x, int64_t nb, float *y) {
#pragma omp parallel for schedule(static) if (nb > 4096)
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = x + i * 18;
        const float d = half_at(b);
        float *o = y + i * 32;
        for (int j = 0; j < 16; j++) {
            o[j] = (float)((b[2 + j] & 0x0f) - 8) * d;
            o[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
        }
    }
}

// Q4_1: half d; half m; u8 qs[16]. y = q*d + m.
static void dequant_q4_1(const uint8_t *x, int64_t nb, float *y) {
#pragma omp parallel for schedule(static) if (nb > 4096)
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = x + i * 20;
        const float d = half_at(b), m = half_at(b + 2);
        float *o = y + i * 32;
        for (int j = 0; j < 16; j++) {
            o[j] = (float)(b[4 + j] & 0x0f) * d + m;
            o[j + 16] = (float)(b[4 + j] >> 4) * d + m;
        }
    }
}

// Q8_0: half d; i8 qs[32]. y = q*d.
static void dequant_q8_0(const uint8_t *x, int64_t nb, float *y) {
#pragma omp parallel for schedule(static) if (nb > 4096)
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = x + i * 34;
        const float d = half_at(b);
        float *o = y + i * 32;
        for (int j = 0; j < 32; j++) o[j] = (float)(int8_t)b[2 + j] * d;
    }
}

int q_gguf_dequantize(uint32_t type, const void *data, int64_t n, float *out, q_err *err) {
    int64_t block, bytes;
    if (!q_gguf_type_info(type, &block, &bytes))
        return q_err_set(err, "cannot dequantize ggml type %s (%u): supported are F32, F16, BF16, Q4_0, Q4_1, Q8_0",
                         q_gguf_type_name(type), type);
    if (n < 0 || n % block) return q_err_set(err, "%lld elements are not a whole number of %s blocks of %lld",
                                             (long long)n, q_gguf_type_name(type), (long long)block);
    const uint8_t *x = data;
    switch (type) {
    case 0: memcpy(out, x, (size_t)n * 4); break;
    case 1: for (int64_t i = 0; i < n; i++) out[i] = half_at(x + 2 * i); break;
    case 30:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, x + 2 * i, 2);
            out[i] = q_bf16_to_f32(h);
        }
        break;
    case 2: dequant_q4_0(x, n / 32, out); break;
    case 3: dequant_q4_1(x, n / 32, out); break;
    default: dequant_q8_0(x, n / 32, out); break;
    }
    return 0;
}
