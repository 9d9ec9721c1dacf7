// core/core.h: the bottom room. Status messages, dtypes, half-precision
// conversion, a byte buffer, a strict JSON parser and safetensors I/O.
// Every other room may include this; it includes nothing of theirs.
//
// Error convention: library functions return 0 on success and -1 on failure,
// filling a caller-owned q_err with one line that names the file and the
// problem. Only the CLI prints and exits.
#ifndef QLORA_CORE_H
#define QLORA_CORE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

// ----------------------------------------------------------------------------
// status

typedef struct q_err {
    char msg[512];
} q_err;

// Formats the message into err (if not NULL) and returns -1, so that callers
// can write `return q_err_set(err, "...")`.
int q_err_set(q_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Prepends "prefix: " to an existing message (adds context on the way up).
int q_err_wrap(q_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// ----------------------------------------------------------------------------
// dtypes (the subset of safetensors dtypes qlora reads and writes)

typedef enum q_dtype {
    Q_DTYPE_F32,
    Q_DTYPE_F16,
    Q_DTYPE_BF16,
    Q_DTYPE_U8,
    Q_DTYPE_I8,
    Q_DTYPE_I32,
    Q_DTYPE_I64,
    Q_DTYPE_COUNT
} q_dtype;

size_t q_dtype_size(q_dtype dt);
const char *q_dtype_name(q_dtype dt);        // safetensors spelling: "F32", "BF16", ...
const char *q_dtype_torch_name(q_dtype dt);  // torch spelling: "float32", "bfloat16", ...
int q_dtype_from_name(const char *name, q_dtype *out);        // safetensors spelling
int q_dtype_from_torch_name(const char *name, q_dtype *out);  // torch spelling
static inline bool q_dtype_is_float(q_dtype dt) {
    return dt == Q_DTYPE_F32 || dt == Q_DTYPE_F16 || dt == Q_DTYPE_BF16;
}

// ----------------------------------------------------------------------------
// half-precision conversion: round to nearest even, NaN stays NaN, as
// PyTorch's .to(torch.float16/bfloat16) and CUDA's __float2half_rn do.

static inline uint32_t q_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float q_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float q_bf16_to_f32(uint16_t h) { return q_bits_f32((uint32_t)h << 16); }

static inline uint16_t q_f32_to_bf16(float f) {
    uint32_t u = q_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float q_f16_to_f32(uint16_t h);
uint16_t q_f32_to_f16(float f);

// Loads n values of a float dtype (F32/F16/BF16) into fp32, or stores fp32 into one.
void q_convert_to_f32(const void *src, q_dtype dt, float *dst, size_t n);
void q_convert_from_f32(const float *src, void *dst, q_dtype dt, size_t n);

// Python's repr() of a double: the shortest digits that round-trip, in
// Python's layout ("0.0499420166015625", "1e-05", "3.0"). Used where a file
// must match what Python's json.dumps writes.
void q_format_float_repr(double v, char *out, size_t size);

// ----------------------------------------------------------------------------
// growable byte buffer

typedef struct q_buf {
    char *data;   // NUL-terminated while len < cap
    size_t len;
    size_t cap;
} q_buf;

int q_buf_append(q_buf *b, const void *data, size_t n);
int q_buf_printf(q_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int q_buf_json_string(q_buf *b, const char *s);  // appends a quoted, escaped JSON string
void q_buf_free(q_buf *b);

// ----------------------------------------------------------------------------
// files

// Reads a whole file into a malloc'd, NUL-terminated buffer.
int q_file_read(const char *path, char **data, size_t *size, q_err *err);
// Writes atomically: PATH.tmp, fsync, rename, fsync of the folder. A crash
// leaves either the old file or the new one, never a torn one.
int q_file_write_atomic(const char *path, const void *data, size_t size, q_err *err);
// Maps a whole regular file read-only (size 0: *map NULL). Errors name the file.
int q_file_map(const char *path, const uint8_t **map, size_t *size, q_err *err);
void q_file_unmap(const uint8_t *map, size_t size);
// Fault injection for the crash tests: true when $QLORA_FAULT_KILL_WRITE is a
// substring of path; the atomic writers then kill the process (SIGKILL)
// halfway through the temporary file, as a power cut or an OOM kill would.
bool q_fault_kill_write(const char *path);
bool q_path_is_dir(const char *path);
bool q_path_exists(const char *path);
int q_mkdir_p(const char *path, q_err *err);

// ----------------------------------------------------------------------------
// JSON (RFC 8259, strict: no trailing commas, comments, NaN or control chars)

typedef enum q_json_type {
    Q_JSON_NULL,
    Q_JSON_BOOL,
    Q_JSON_NUMBER,
    Q_JSON_STRING,
    Q_JSON_ARRAY,
    Q_JSON_OBJECT
} q_json_type;

typedef struct q_json q_json;
struct q_json {
    q_json_type type;
    bool boolean;      // Q_JSON_BOOL
    double number;     // Q_JSON_NUMBER
    bool is_int;       // number was written without fraction/exponent and fits int64
    int64_t integer;   // valid when is_int
    char *string;      // Q_JSON_STRING: decoded UTF-8, NUL-terminated
    size_t string_len; // bytes, may contain NUL (\u0000)
    size_t count;      // Q_JSON_ARRAY / Q_JSON_OBJECT: number of items
    q_json *items;     // [count]
    char **keys;       // [count] Q_JSON_OBJECT only, in file order
};

// Parses text[0..len) into a tree owned by *out (free with q_json_free).
// Errors say "line L, column C: what". Nesting depth is limited to 256.
int q_json_parse(const char *text, size_t len, q_json **out, q_err *err);
void q_json_free(q_json *v);
// Object lookup by key (first match); NULL if v is not an object or lacks it.
const q_json *q_json_get(const q_json *v, const char *key);

// ----------------------------------------------------------------------------
// safetensors (docs: formats.md section 8)

#define Q_ST_MAX_DIMS 8

typedef struct q_st_tensor {
    char *name;
    q_dtype dtype;
    int ndim;
    int64_t shape[Q_ST_MAX_DIMS];
    int64_t numel;
    size_t nbytes;
    const void *data;  // points into the file mapping: read-only, maybe unaligned
} q_st_tensor;

typedef struct q_st_file {
    char *path;
    const uint8_t *map;  // whole file (mmap or caller memory)
    size_t map_size;
    bool owns_map;       // munmap on close
    size_t n_tensors;
    q_st_tensor *tensors;  // [n_tensors], sorted by name
    size_t n_meta;
    char **meta_keys;      // [n_meta] __metadata__ entries
    char **meta_values;    // [n_meta]
} q_st_file;

// mmaps and validates a file. Every problem (truncation, bad JSON, unknown
// dtype, shape/offset mismatch, overlap, holes) is an error naming the file.
int q_st_open(q_st_file *f, const char *path, q_err *err);
// Same validation over caller memory (kept alive by the caller); the fuzz target uses it.
int q_st_open_memory(q_st_file *f, const void *data, size_t size, const char *name, q_err *err);
void q_st_close(q_st_file *f);
const q_st_tensor *q_st_find(const q_st_file *f, const char *name);
const char *q_st_meta(const q_st_file *f, const char *key);

// A model: one .safetensors file, or a folder with model.safetensors or
// model.safetensors.index.json and its shards.
typedef struct q_st_model {
    size_t n_files;
    q_st_file *files;            // [n_files]
    size_t n_tensors;
    const q_st_tensor **tensors;  // [n_tensors] across all shards, sorted by name
} q_st_model;

int q_st_model_open(q_st_model *m, const char *path, q_err *err);
void q_st_model_close(q_st_model *m);
const q_st_tensor *q_st_model_find(const q_st_model *m, const char *name);

// One tensor to write.
typedef struct q_st_entry {
    const char *name;
    q_dtype dtype;
    int ndim;
    int64_t shape[Q_ST_MAX_DIMS];
    const void *data;  // numel * dtype size bytes
} q_st_entry;

// Writes a safetensors file atomically, laid out as the reference writer does:
// entries sorted by dtype alignment (largest first; equal sizes in the Rust
// Dtype enum's order: F32 before I32, BF16 before F16, I8 before U8) then name,
// header padded with spaces to a multiple of 8. meta is n_meta key/value pairs or NULL.
int q_st_write(const char *path, const q_st_entry *entries, size_t n,
               const char *const *meta_keys, const char *const *meta_values, size_t n_meta,
               q_err *err);

// ----------------------------------------------------------------------------
// GGUF (docs: gguf.md). A read-only view of a mmapped file: metadata and
// tensor infos validated as llama.cpp validates them (magic, version 2/3,
// counts bounded by the file size, alignment a power of two, offsets the
// padded running sum, ne[0] a multiple of the type's block).

typedef enum q_gguf_type {  // metadata value types
    Q_GGUF_U8 = 0, Q_GGUF_I8 = 1, Q_GGUF_U16 = 2, Q_GGUF_I16 = 3, Q_GGUF_U32 = 4, Q_GGUF_I32 = 5,
    Q_GGUF_F32 = 6, Q_GGUF_BOOL = 7, Q_GGUF_STRING = 8, Q_GGUF_ARRAY = 9, Q_GGUF_U64 = 10, Q_GGUF_I64 = 11,
    Q_GGUF_F64 = 12,
} q_gguf_type;

typedef struct q_gguf_kv {
    char *key;
    q_gguf_type type;
    q_gguf_type elem_type;  // Q_GGUF_ARRAY only
    uint64_t count;         // Q_GGUF_ARRAY: number of elements
    const uint8_t *data;    // points into the mapping: the value (array: its first element)
} q_gguf_kv;

typedef struct q_gguf_tensor {
    char *name;
    uint32_t type;          // ggml type id (0 F32, 1 F16, 30 BF16, 2 Q4_0, 3 Q4_1, 8 Q8_0, ...)
    int n_dims;
    int64_t ne[4];          // ne[0] innermost: a Linear [out, in] is ne = {in, out}
    int64_t numel;
    size_t nbytes;
    const void *data;       // points into the mapping
} q_gguf_tensor;

typedef struct q_gguf {
    char *path;
    const uint8_t *map;
    size_t map_size;
    bool owns_map;          // mapped by q_gguf_open (unmapped on close)
    uint32_t version;
    uint32_t alignment;
    size_t n_kv;
    q_gguf_kv *kv;          // [n_kv] in file order
    size_t n_tensors;
    q_gguf_tensor *tensors; // [n_tensors] in file order
} q_gguf;

int q_gguf_open(q_gguf *g, const char *path, q_err *err);
// Same validation over caller memory (kept alive by the caller); the fuzz target uses it.
int q_gguf_open_memory(q_gguf *g, const void *data, size_t size, const char *name, q_err *err);
void q_gguf_close(q_gguf *g);
const q_gguf_kv *q_gguf_find_kv(const q_gguf *g, const char *key);
const q_gguf_tensor *q_gguf_find_tensor(const q_gguf *g, const char *name);
// Typed getters: 0 on success; -1 with an error naming the key when absent or
// of a type that cannot convert (any integer type converts to int64).
int q_gguf_get_int(const q_gguf *g, const char *key, int64_t *v, q_err *err);
int q_gguf_get_float(const q_gguf *g, const char *key, double *v, q_err *err);
int q_gguf_get_bool(const q_gguf *g, const char *key, bool *v, q_err *err);
// A string value (not NUL-terminated in the file): pointer and length.
int q_gguf_get_string(const q_gguf *g, const char *key, const char **s, size_t *len, q_err *err);
// Element i of a string array (bounds-checked by the caller against kv->count).
// Walks the array, so iterate with q_gguf_string_iter for whole arrays.
typedef struct q_gguf_string_iter {
    const uint8_t *p, *end;
    uint64_t left;
} q_gguf_string_iter;
void q_gguf_string_iter_init(q_gguf_string_iter *it, const q_gguf_kv *kv);
bool q_gguf_string_iter_next(q_gguf_string_iter *it, const char **s, size_t *len);
// Block size and bytes per block of a ggml type; false for types qlora cannot read.
bool q_gguf_type_info(uint32_t type, int64_t *block, int64_t *block_bytes);
const char *q_gguf_type_name(uint32_t type);
// Dequantizes n elements (a multiple of the block) of F32/F16/BF16/Q4_0/Q4_1/Q8_0 data to fp32.
int q_gguf_dequantize(uint32_t type, const void *data, int64_t n, float *out, q_err *err);

#ifdef __cplusplus
}
#endif
#endif  // QLORA_CORE_H
