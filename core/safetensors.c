// core/safetensors.c: reading (mmap + full validation), sharded models, and
// writing laid out byte for byte as the reference Rust writer does.
// Format facts: formats.md section 8.
//
// A file is an 8-byte little-endian header length N, N bytes of JSON, then
// the data buffer. Reading checks everything the reference reader checks
// (and a little more: unknown entry fields, NUL in names) so that a tensor's
// data pointer can be trusted to lie inside the mapping.
#define _GNU_SOURCE
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER 100000000ull  // the reference reader's limit on N
#define ST_INDEX_NAME "model.safetensors.index.json"

// Valid safetensors dtypes that qlora does not handle: named as unsupported
// rather than unknown, so the user knows the file itself is fine.
static const char *const other_dtypes[] = {
    "BOOL", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16",
    "U32", "F64", "C64", "U64", "F4", "F6_E2M3", "F6_E3M2",
};

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

// ----------------------------------------------------------------------------
// one header entry

// A tensor's byte range in the data buffer, kept aside for the layout check.
typedef struct span {
    uint64_t begin, end;
    const char *name;
    size_t tensor;  // index into q_st_file.tensors
} span;

static int cmp_span(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static bool json_uint(const q_json *v, uint64_t *out) {
    if (v->type != Q_JSON_NUMBER || !v->is_int || v->integer < 0) return false;
    *out = (uint64_t)v->integer;
    return true;
}

static int parse_dtype(const char *name, const q_json *v, q_dtype *dt, q_err *err) {
    if (v->type != Q_JSON_STRING || strlen(v->string) != v->string_len)
        return q_err_set(err, "tensor %s: dtype must be a string", name);
    if (q_dtype_from_name(v->string, dt) == 0) return 0;
    for (size_t i = 0; i < sizeof other_dtypes / sizeof other_dtypes[0]; i++)
        if (strcmp(v->string, other_dtypes[i]) == 0)
            return q_err_set(err, "unsupported dtype %s in tensor %s", v->string, name);
    return q_err_set(err, "unknown dtype %.40s in tensor %s", v->string, name);
}

static int parse_shape(const char *name, const q_json *v, q_st_tensor *t, q_err *err) {
    if (v->type != Q_JSON_ARRAY) return q_err_set(err, "tensor %s: shape must be an array", name);
    if (v->count > Q_ST_MAX_DIMS)
        return q_err_set(err, "tensor %s: shape has %zu dims, at most %d are supported", name, v->count,
                         Q_ST_MAX_DIMS);
    t->ndim = (int)v->count;
    t->numel = 1;
    for (size_t i = 0; i < v->count; i++) {
        uint64_t d;
        if (!json_uint(&v->items[i], &d)) return q_err_set(err, "tensor %s: shape must hold non-negative integers", name);
        t->shape[i] = (int64_t)d;
        if (d != 0 && t->numel > INT64_MAX / (int64_t)d)
            return q_err_set(err, "tensor %s: number of elements overflows", name);
        t->numel *= (int64_t)d;
    }
    return 0;
}

static int parse_offsets(const char *name, const q_json *v, span *s, q_err *err) {
    if (v->type != Q_JSON_ARRAY || v->count != 2 || !json_uint(&v->items[0], &s->begin) ||
        !json_uint(&v->items[1], &s->end))
        return q_err_set(err, "tensor %s: data_offsets must be two non-negative integers", name);
    if (s->begin > s->end)
        return q_err_set(err, "tensor %s: data_offsets begin %llu is after end %llu", name,
                         (unsigned long long)s->begin, (unsigned long long)s->end);
    return 0;
}

// Parses {"dtype": ..., "shape": [...], "data_offsets": [b, e]}: exactly
// these three fields, and a byte range that matches shape and dtype.
static int parse_entry(const char *name, const q_json *v, q_st_tensor *t, span *s, q_err *err) {
    static const char *const fields[3] = {"dtype", "shape", "data_offsets"};
    const q_json *field[3] = {NULL, NULL, NULL};
    if (v->type != Q_JSON_OBJECT) return q_err_set(err, "tensor %s: entry must be an object", name);
    for (size_t i = 0; i < v->count; i++) {
        int k = 0;
        while (k < 3 && strcmp(v->keys[i], fields[k]) != 0) k++;
        if (k == 3) return q_err_set(err, "tensor %s: unexpected field %s", name, v->keys[i]);
        if (field[k]) return q_err_set(err, "tensor %s: duplicate field %s", name, fields[k]);
        field[k] = &v->items[i];
    }
    for (int k = 0; k < 3; k++)
        if (!field[k]) return q_err_set(err, "tensor %s: missing field %s", name, fields[k]);
    if (parse_dtype(name, field[0], &t->dtype, err) || parse_shape(name, field[1], t, err) ||
        parse_offsets(name, field[2], s, err))
        return -1;
    int64_t size = (int64_t)q_dtype_size(t->dtype);
    if (t->numel > INT64_MAX / size) return q_err_set(err, "tensor %s: byte size overflows", name);
    uint64_t nbytes = (uint64_t)(t->numel * size);
    if (nbytes != s->end - s->begin)
        return q_err_set(err, "tensor %s: %lld elements of %s need %llu bytes, but data_offsets [%llu, %llu] span %llu",
                         name, (long long)t->numel, q_dtype_name(t->dtype), (unsigned long long)nbytes,
                         (unsigned long long)s->begin, (unsigned long long)s->end,
                         (unsigned long long)(s->end - s->begin));
    t->nbytes = (size_t)nbytes;
    return 0;
}

static int parse_metadata(q_st_file *f, const q_json *v, q_err *err) {
    if (f->meta_keys) return q_err_set(err, "duplicate __metadata__");
    if (v->type != Q_JSON_OBJECT) return q_err_set(err, "__metadata__ must be an object");
    f->meta_keys = calloc(v->count + 1, sizeof *f->meta_keys);  // +1: non-NULL even when empty
    f->meta_values = calloc(v->count + 1, sizeof *f->meta_values);
    if (!f->meta_keys || !f->meta_values) return q_err_set(err, "out of memory");
    for (size_t i = 0; i < v->count; i++) {
        const q_json *s = &v->items[i];
        if (s->type != Q_JSON_STRING || strlen(s->string) != s->string_len)
            return q_err_set(err, "__metadata__ value of %s must be a string", v->keys[i]);
        f->meta_keys[i] = strdup(v->keys[i]);
        f->meta_values[i] = strdup(s->string);
        f->n_meta++;
        if (!f->meta_keys[i] || !f->meta_values[i]) return q_err_set(err, "out of memory");
    }
    // duplicate keys: JSON keeps them, we do not
    const char **sorted = malloc((f->n_meta + 1) * sizeof *sorted);
    if (!sorted) return q_err_set(err, "out of memory");
    memcpy(sorted, f->meta_keys, f->n_meta * sizeof *sorted);
    qsort(sorted, f->n_meta, sizeof *sorted, cmp_str_ptr);
    int rc = 0;
    for (size_t i = 1; i < f->n_meta && rc == 0; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0) rc = q_err_set(err, "duplicate __metadata__ key %s", sorted[i]);
    free(sorted);
    return rc;
}

// ----------------------------------------------------------------------------
// one file

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const q_st_tensor *)a)->name, ((const q_st_tensor *)b)->name);
}

// Data entries must tile the data buffer exactly: sorted by offset, each
// begins where the previous one ended, the first at 0, the last at its end.
static int check_layout(span *spans, size_t n, uint64_t data_len, q_err *err) {
    qsort(spans, n, sizeof *spans, cmp_span);
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        if (spans[i].begin < at)
            return q_err_set(err, "tensor %s (bytes %llu..%llu) overlaps tensor %s (bytes %llu..%llu)", spans[i].name,
                             (unsigned long long)spans[i].begin, (unsigned long long)spans[i].end, spans[i - 1].name,
                             (unsigned long long)spans[i - 1].begin, (unsigned long long)spans[i - 1].end);
        if (spans[i].begin > at)
            return q_err_set(err, "hole in the data: tensor %s begins at byte %llu, but the previous data ends at %llu",
                             spans[i].name, (unsigned long long)spans[i].begin, (unsigned long long)at);
        at = spans[i].end;
    }
    if (at > data_len)
        return q_err_set(err, "truncated: tensor data ends at byte %llu but the file holds %llu data bytes",
                         (unsigned long long)at, (unsigned long long)data_len);
    if (at < data_len)
        return q_err_set(err, "%llu trailing bytes after the last tensor", (unsigned long long)(data_len - at));
    return 0;
}

// Validates f->map[0..map_size) and fills the tables; errors without the path.
static int parse_file(q_st_file *f, q_err *err) {
    if (f->map_size < 8) return q_err_set(err, "file is %zu bytes, too short for the 8-byte header length", f->map_size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | f->map[i];
    if (n > ST_MAX_HEADER)
        return q_err_set(err, "header length %llu exceeds the limit of %llu", (unsigned long long)n, ST_MAX_HEADER);
    if (n > f->map_size - 8)
        return q_err_set(err, "header length %llu runs past the end of the file (%zu bytes)", (unsigned long long)n,
                         f->map_size);
    const char *text = (const char *)f->map + 8;
    if (n == 0 || text[0] != '{') return q_err_set(err, "header does not start with '{'");

    q_json *root = NULL;
    q_err jerr;
    if (q_json_parse(text, (size_t)n, &root, &jerr)) return q_err_set(err, "invalid JSON header: %s", jerr.msg);
    const uint8_t *data = f->map + 8 + n;
    uint64_t data_len = f->map_size - 8 - n;
    span *spans = malloc((root->count + 1) * sizeof *spans);
    f->tensors = calloc(root->count + 1, sizeof *f->tensors);
    int rc = spans && f->tensors ? 0 : q_err_set(err, "out of memory");
    for (size_t i = 0; i < root->count && rc == 0; i++) {
        const char *key = root->keys[i];
        if (strcmp(key, "__metadata__") == 0) {
            rc = parse_metadata(f, &root->items[i], err);
            continue;
        }
        q_st_tensor *t = &f->tensors[f->n_tensors];
        span *s = &spans[f->n_tensors];
        if (!(t->name = strdup(key))) { rc = q_err_set(err, "out of memory"); break; }
        f->n_tensors++;
        s->name = t->name;
        s->tensor = f->n_tensors - 1;
        rc = parse_entry(key, &root->items[i], t, s, err);
    }
    if (rc == 0) rc = check_layout(spans, f->n_tensors, data_len, err);
    // the layout check bounds every range by data_len, so the pointers are in the mapping
    for (size_t i = 0; i < f->n_tensors && rc == 0; i++) f->tensors[spans[i].tensor].data = data + spans[i].begin;
    free(spans);
    q_json_free(root);
    if (rc) return rc;
    qsort(f->tensors, f->n_tensors, sizeof *f->tensors, cmp_tensor_name);
    for (size_t i = 1; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i - 1].name, f->tensors[i].name) == 0)
            return q_err_set(err, "duplicate tensor name %s", f->tensors[i].name);
    return 0;
}

// Validates the bytes now in f; on failure frees f and prefixes the name.
static int finish_open(q_st_file *f, const char *name, q_err *err) {
    q_err e;
    if (!f->path) {
        q_st_close(f);
        return q_err_set(err, "%s: out of memory", name);
    }
    if (parse_file(f, &e)) {
        q_st_close(f);
        return q_err_set(err, "%s: %s", name, e.msg);
    }
    return 0;
}

int q_st_open(q_st_file *f, const char *path, q_err *err) {
    memset(f, 0, sizeof *f);
    if (q_file_map(path, &f->map, &f->map_size, err)) return -1;
    f->owns_map = true;
    f->path = strdup(path);
    return finish_open(f, path, err);
}

int q_st_open_memory(q_st_file *f, const void *data, size_t size, const char *name, q_err *err) {
    memset(f, 0, sizeof *f);
    f->map = data;
    f->map_size = data ? size : 0;
    f->path = strdup(name);
    return finish_open(f, name, err);
}

void q_st_close(q_st_file *f) {
    if (f->owns_map) q_file_unmap(f->map, f->map_size);
    for (size_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    for (size_t i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->tensors);
    free(f->meta_keys);
    free(f->meta_values);
    free(f->path);
    memset(f, 0, sizeof *f);
}

static int cmp_key_tensor(const void *key, const void *t) {
    return strcmp(key, ((const q_st_tensor *)t)->name);
}

const q_st_tensor *q_st_find(const q_st_file *f, const char *name) {
    if (!f->n_tensors) return NULL;
    return bsearch(name, f->tensors, f->n_tensors, sizeof *f->tensors, cmp_key_tensor);
}

const char *q_st_meta(const q_st_file *f, const char *key) {
    for (size_t i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
    return NULL;
}

// ----------------------------------------------------------------------------
// models: one file, or a folder with model.safetensors or an index and shards

static int join_path(char *out, size_t size, const char *dir, const char *name, q_err *err) {
    if (snprintf(out, size, "%s/%s", dir, name) >= (int)size) return q_err_set(err, "%s: path too long", dir);
    return 0;
}

static int cmp_tensor_ptr(const void *a, const void *b) {
    return strcmp((*(const q_st_tensor *const *)a)->name, (*(const q_st_tensor *const *)b)->name);
}

static int cmp_key_tensor_ptr(const void *key, const void *t) {
    return strcmp(key, (*(const q_st_tensor *const *)t)->name);
}

// The file of the model that holds tensor t (for error messages).
static const char *file_of(const q_st_model *m, const q_st_tensor *t) {
    for (size_t i = 0; i < m->n_files; i++) {
        const q_st_file *f = &m->files[i];
        for (size_t j = 0; j < f->n_tensors; j++)
            if (&f->tensors[j] == t) return f->path;
    }
    return "?";
}

// Builds m->tensors over all files, sorted by name; a name in two files is an error.
static int gather_tensors(q_st_model *m, q_err *err) {
    size_t n = 0;
    for (size_t i = 0; i < m->n_files; i++) n += m->files[i].n_tensors;
    m->tensors = malloc((n + 1) * sizeof *m->tensors);
    if (!m->tensors) return q_err_set(err, "out of memory");
    for (size_t i = 0; i < m->n_files; i++)
        for (size_t j = 0; j < m->files[i].n_tensors; j++) m->tensors[m->n_tensors++] = &m->files[i].tensors[j];
    qsort(m->tensors, n, sizeof *m->tensors, cmp_tensor_ptr);
    for (size_t i = 1; i < n; i++)
        if (strcmp(m->tensors[i - 1]->name, m->tensors[i]->name) == 0)
            return q_err_set(err, "tensor %s is in both %s and %s", m->tensors[i]->name,
                             file_of(m, m->tensors[i - 1]), file_of(m, m->tensors[i]));
    return 0;
}

// A shard name from the index must name a file in the model folder itself.
static bool shard_name_ok(const q_json *v) {
    return v->type == Q_JSON_STRING && v->string_len > 0 && strlen(v->string) == v->string_len &&
           !strchr(v->string, '/') && !strstr(v->string, "..");
}

static int open_index(q_st_model *m, const char *dir, const char *index, q_err *err) {
    char *text = NULL;
    size_t len = 0;
    q_json *root = NULL;
    const char **shards = NULL;
    char path[4096];
    q_err e;
    int rc = q_file_read(index, &text, &len, err);
    if (rc) return rc;
    if (q_json_parse(text, len, &root, &e)) {
        free(text);
        return q_err_set(err, "%s: invalid JSON: %s", index, e.msg);
    }
    free(text);
    const q_json *wm = q_json_get(root, "weight_map");
    if (!wm || wm->type != Q_JSON_OBJECT) {
        rc = q_err_set(err, "%s: needs a \"weight_map\" object", index);
        goto done;
    }
    // distinct shard names, each opened once
    shards = malloc((wm->count + 1) * sizeof *shards);
    if (!shards) { rc = q_err_set(err, "out of memory"); goto done; }
    for (size_t i = 0; i < wm->count; i++) {
        if (!shard_name_ok(&wm->items[i])) {
            rc = q_err_set(err, "%s: weight_map entry %s must be a file name in the same folder", index, wm->keys[i]);
            goto done;
        }
        shards[i] = wm->items[i].string;
    }
    qsort(shards, wm->count, sizeof *shards, cmp_str_ptr);
    size_t n_shards = 0;
    for (size_t i = 0; i < wm->count; i++)
        if (n_shards == 0 || strcmp(shards[n_shards - 1], shards[i]) != 0) shards[n_shards++] = shards[i];
    m->files = calloc(n_shards + 1, sizeof *m->files);
    if (!m->files) { rc = q_err_set(err, "out of memory"); goto done; }
    for (size_t i = 0; i < n_shards; i++) {
        if ((rc = join_path(path, sizeof path, dir, shards[i], err))) goto done;
        if ((rc = q_st_open(&m->files[i], path, err))) goto done;
        m->n_files++;
    }
    // every tensor of the weight_map must be where the index says
    for (size_t i = 0; i < wm->count; i++) {
        const char **s = bsearch(&wm->items[i].string, shards, n_shards, sizeof *shards, cmp_str_ptr);
        if (!q_st_find(&m->files[s - shards], wm->keys[i])) {
            rc = q_err_set(err, "%s: tensor %s is not in shard %s", index, wm->keys[i], *s);
            goto done;
        }
    }
done:
    free(shards);
    q_json_free(root);
    return rc;
}

static int open_single(q_st_model *m, const char *path, q_err *err) {
    m->files = calloc(1, sizeof *m->files);
    if (!m->files) return q_err_set(err, "out of memory");
    if (q_st_open(&m->files[0], path, err)) return -1;
    m->n_files = 1;
    return 0;
}

int q_st_model_open(q_st_model *m, const char *path, q_err *err) {
    memset(m, 0, sizeof *m);
    char file[4096];
    int rc;
    if (!q_path_is_dir(path)) {
        rc = open_single(m, path, err);
    } else if (join_path(file, sizeof file, path, ST_INDEX_NAME, err)) {
        return -1;
    } else if (q_path_exists(file)) {
        rc = open_index(m, path, file, err);
    } else if (join_path(file, sizeof file, path, "model.safetensors", err)) {
        return -1;
    } else if (q_path_exists(file)) {
        rc = open_single(m, file, err);
    } else {
        return q_err_set(err, "%s: no model.safetensors or " ST_INDEX_NAME, path);
    }
    if (rc == 0) rc = gather_tensors(m, err);
    if (rc) q_st_model_close(m);
    return rc;
}

void q_st_model_close(q_st_model *m) {
    for (size_t i = 0; i < m->n_files; i++) q_st_close(&m->files[i]);
    free(m->files);
    free(m->tensors);
    memset(m, 0, sizeof *m);
}

const q_st_tensor *q_st_model_find(const q_st_model *m, const char *name) {
    if (!m->n_tensors) return NULL;
    const q_st_tensor *const *t = bsearch(name, m->tensors, m->n_tensors, sizeof *m->tensors, cmp_key_tensor_ptr);
    return t ? *t : NULL;
}

// ----------------------------------------------------------------------------
// writing

// One entry with its byte size, sorted into the file's order.
typedef struct planned {
    const q_st_entry *e;
    size_t nbytes;
} planned;

// The reference writer sorts by its Dtype enum, descending, then by name.
// The enum is declared in increasing alignment (BOOL, U8, I8, F8_E5M2,
// F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64), so this is
// alignment first, with ties broken by enum position: F32 before I32, BF16
// before F16, I8 before U8. These are the positions in that enum.
static const int writer_rank[Q_DTYPE_COUNT] = {
    [Q_DTYPE_U8] = 1,  [Q_DTYPE_I8] = 2,   [Q_DTYPE_F16] = 7, [Q_DTYPE_BF16] = 8,
    [Q_DTYPE_I32] = 9, [Q_DTYPE_F32] = 11, [Q_DTYPE_I64] = 13,
};

static int cmp_planned_layout(const void *a, const void *b) {
    const q_st_entry *x = ((const planned *)a)->e, *y = ((const planned *)b)->e;
    int rx = writer_rank[x->dtype], ry = writer_rank[y->dtype];
    if (rx != ry) return rx > ry ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_planned_name(const void *a, const void *b) {
    return strcmp(((const planned *)a)->e->name, ((const planned *)b)->e->name);
}

static int entry_nbytes(const q_st_entry *e, size_t *out, q_err *err) {
    if (!e->name || !e->name[0]) return q_err_set(err, "tensor with an empty name");
    if (strcmp(e->name, "__metadata__") == 0) return q_err_set(err, "tensor name __metadata__ is reserved");
    if ((unsigned)e->dtype >= Q_DTYPE_COUNT) return q_err_set(err, "tensor %s: invalid dtype", e->name);
    if (e->ndim < 0 || e->ndim > Q_ST_MAX_DIMS)
        return q_err_set(err, "tensor %s: %d dims, at most %d are supported", e->name, e->ndim, Q_ST_MAX_DIMS);
    int64_t numel = 1, size = (int64_t)q_dtype_size(e->dtype);
    for (int i = 0; i < e->ndim; i++) {
        int64_t d = e->shape[i];
        if (d < 0) return q_err_set(err, "tensor %s: negative dim %lld", e->name, (long long)d);
        if (d != 0 && numel > INT64_MAX / d) return q_err_set(err, "tensor %s: number of elements overflows", e->name);
        numel *= d;
    }
    if (numel > INT64_MAX / size || (uint64_t)(numel * size) > SIZE_MAX)
        return q_err_set(err, "tensor %s: byte size overflows", e->name);
    *out = (size_t)(numel * size);
    if (*out && !e->data) return q_err_set(err, "tensor %s: no data", e->name);
    return 0;
}

// Compact JSON as serde writes it, __metadata__ first, entries in layout
// order, padded with spaces to a multiple of 8 bytes.
static int build_header(q_buf *h, const planned *order, size_t n,
                        const char *const *meta_keys, const char *const *meta_values, size_t n_meta) {
    int bad = q_buf_append(h, "{", 1);
    if (n_meta) {
        bad |= q_buf_append(h, "\"__metadata__\":{", 16);
        for (size_t i = 0; i < n_meta; i++) {
            if (i) bad |= q_buf_append(h, ",", 1);
            bad |= q_buf_json_string(h, meta_keys[i]);
            bad |= q_buf_append(h, ":", 1);
            bad |= q_buf_json_string(h, meta_values[i]);
        }
        bad |= q_buf_append(h, "}", 1);
        if (n) bad |= q_buf_append(h, ",", 1);
    }
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        const q_st_entry *e = order[i].e;
        if (i) bad |= q_buf_append(h, ",", 1);
        bad |= q_buf_json_string(h, e->name);
        bad |= q_buf_printf(h, ":{\"dtype\":\"%s\",\"shape\":[", q_dtype_name(e->dtype));
        for (int d = 0; d < e->ndim; d++) bad |= q_buf_printf(h, d ? ",%lld" : "%lld", (long long)e->shape[d]);
        bad |= q_buf_printf(h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)at,
                            (unsigned long long)(at + order[i].nbytes));
        at += order[i].nbytes;
    }
    bad |= q_buf_append(h, "}", 1);
    while (!bad && h->len % 8) bad |= q_buf_append(h, " ", 1);
    return bad ? -1 : 0;
}

static void fsync_dir_of(const char *path) {
    char *copy = strdup(path);
    if (!copy) return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    free(copy);
    if (fd < 0) return;
    fsync(fd);
    close(fd);
}

// Streams header and data into PATH.tmp, then fsync and rename, with the
// guarantees of q_file_write_atomic but without the whole file in memory.
static int write_streaming(const char *path, const q_buf *header, const planned *order, size_t n,
                           q_err *err) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return q_err_set(err, "%s: path too long", path);
    FILE *fp = fopen(tmp, "wb");
    if (!fp) return q_err_set(err, "%s: cannot create: %s", tmp, strerror(errno));
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)header->len >> (8 * i));
    bool ok = fwrite(len, 1, 8, fp) == 8 && fwrite(header->data, 1, header->len, fp) == header->len;
    if (q_fault_kill_write(path)) {  // the crash tests: die with only the header written
        fflush(fp);
        fsync(fileno(fp));
        raise(SIGKILL);
    }
    for (size_t i = 0; i < n && ok; i++)  // empty tensors may have NULL data
        ok = !order[i].nbytes || fwrite(order[i].e->data, 1, order[i].nbytes, fp) == order[i].nbytes;
    ok = ok && fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    int e = errno;
    if (fclose(fp) != 0 && ok) ok = false, e = errno;
    if (!ok) {
        unlink(tmp);
        return q_err_set(err, "%s: write failed: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        e = errno;
        unlink(tmp);
        return q_err_set(err, "%s: rename failed: %s", path, strerror(e));
    }
    fsync_dir_of(path);  // best effort: the data itself is already durable
    return 0;
}

int q_st_write(const char *path, const q_st_entry *entries, size_t n, const char *const *meta_keys,
               const char *const *meta_values, size_t n_meta, q_err *err) {
    planned *order = malloc((n + 1) * sizeof *order);
    const char **keys = malloc((n_meta + 1) * sizeof *keys);
    q_buf h = {0};
    q_err e;
    int rc = order && keys ? 0 : q_err_set(&e, "out of memory");
    for (size_t i = 0; i < n && rc == 0; i++) {
        order[i].e = &entries[i];
        rc = entry_nbytes(&entries[i], &order[i].nbytes, &e);
    }
    // names unique (checked in name order), then the layout order
    if (rc == 0) qsort(order, n, sizeof *order, cmp_planned_name);
    for (size_t i = 1; i < n && rc == 0; i++)
        if (strcmp(order[i - 1].e->name, order[i].e->name) == 0)
            rc = q_err_set(&e, "duplicate tensor name %s", order[i].e->name);
    if (rc == 0) qsort(order, n, sizeof *order, cmp_planned_layout);
    for (size_t i = 0; i < n_meta && rc == 0; i++) {
        if (!meta_keys[i] || !meta_values[i]) rc = q_err_set(&e, "__metadata__ entry %zu is NULL", i);
        keys[i] = meta_keys[i];
    }
    if (rc == 0) qsort(keys, n_meta, sizeof *keys, cmp_str_ptr);
    for (size_t i = 1; i < n_meta && rc == 0; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0) rc = q_err_set(&e, "duplicate __metadata__ key %s", keys[i]);
    if (rc == 0 && build_header(&h, order, n, meta_keys, meta_values, n_meta)) rc = q_err_set(&e, "out of memory");
    // what we write must read back: this catches names that are not valid UTF-8
    q_json *check = NULL;
    q_err jerr;
    if (rc == 0 && q_json_parse(h.data, h.len, &check, &jerr))
        rc = q_err_set(&e, "header would not be valid JSON (names must be UTF-8): %s", jerr.msg);
    q_json_free(check);
    if (rc == 0) rc = write_streaming(path, &h, order, n, err);
    else q_err_set(err, "%s: %s", path, e.msg);
    q_buf_free(&h);
    free(keys);
    free(order);
    return rc;
}
