// core/core.c: status messages, dtypes, half floats, buffers and files.
#define _GNU_SOURCE
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// status

int q_err_set(q_err *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int q_err_wrap(q_err *err, const char *fmt, ...) {
    if (err) {
        char prefix[256], old[sizeof err->msg];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(prefix, sizeof prefix, fmt, ap);
        va_end(ap);
        memcpy(old, err->msg, sizeof old);
        // prefix is at most 255 bytes, so the old message keeps at least 254 (truncated if longer)
        int room = (int)(sizeof err->msg - 3 - strlen(prefix));
        snprintf(err->msg, sizeof err->msg, "%s: %.*s", prefix, room, old);
    }
    return -1;
}

// ----------------------------------------------------------------------------
// dtypes

static const struct {
    const char *st, *torch;
    size_t size;
} dtype_info[Q_DTYPE_COUNT] = {
    [Q_DTYPE_F32] = {"F32", "float32", 4},  [Q_DTYPE_F16] = {"F16", "float16", 2},
    [Q_DTYPE_BF16] = {"BF16", "bfloat16", 2}, [Q_DTYPE_U8] = {"U8", "uint8", 1},
    [Q_DTYPE_I8] = {"I8", "int8", 1},        [Q_DTYPE_I32] = {"I32", "int32", 4},
    [Q_DTYPE_I64] = {"I64", "int64", 8},
};

size_t q_dtype_size(q_dtype dt) { return (unsigned)dt < Q_DTYPE_COUNT ? dtype_info[dt].size : 0; }
const char *q_dtype_name(q_dtype dt) { return (unsigned)dt < Q_DTYPE_COUNT ? dtype_info[dt].st : "?"; }
const char *q_dtype_torch_name(q_dtype dt) {
    return (unsigned)dt < Q_DTYPE_COUNT ? dtype_info[dt].torch : "?";
}

int q_dtype_from_name(const char *name, q_dtype *out) {
    for (int i = 0; i < Q_DTYPE_COUNT; i++)
        if (strcmp(name, dtype_info[i].st) == 0) { *out = (q_dtype)i; return 0; }
    return -1;
}

int q_dtype_from_torch_name(const char *name, q_dtype *out) {
    for (int i = 0; i < Q_DTYPE_COUNT; i++)
        if (strcmp(name, dtype_info[i].torch) == 0) { *out = (q_dtype)i; return 0; }
    return -1;
}

// ----------------------------------------------------------------------------
// half floats

float q_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
    if (exp == 0x1f) return q_bits_f32(sign | 0x7f800000u | (man << 13));  // inf, NaN
    if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return q_bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t q_f32_to_f16(float f) {
    uint32_t u = q_f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {  // below 2^-14: subnormal half, round the scaled value to an integer
        // a * 2^24 is exact in fp32 for these magnitudes' significands; nearbyintf rounds to even.
        float v = q_bits_f32(a) * 16777216.0f;
        return (uint16_t)(sign | (uint32_t)nearbyintf(v));
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);  // rebias, round to nearest even
    return (uint16_t)(sign | (r >> 13));
}

void q_convert_to_f32(const void *src, q_dtype dt, float *dst, size_t n) {
    if (dt == Q_DTYPE_F32) { memcpy(dst, src, n * 4); return; }
    const uint16_t *s = src;
    if (dt == Q_DTYPE_BF16)
        for (size_t i = 0; i < n; i++) dst[i] = q_bf16_to_f32(s[i]);
    else
        for (size_t i = 0; i < n; i++) dst[i] = q_f16_to_f32(s[i]);
}

void q_convert_from_f32(const float *src, void *dst, q_dtype dt, size_t n) {
    if (dt == Q_DTYPE_F32) { memcpy(dst, src, n * 4); return; }
    uint16_t *d = dst;
    if (dt == Q_DTYPE_BF16)
        for (size_t i = 0; i < n; i++) d[i] = q_f32_to_bf16(src[i]);
    else
        for (size_t i = 0; i < n; i++) d[i] = q_f32_to_f16(src[i]);
}

// Python's float_repr_style 'short': shortest round-trip digits, then
// scientific notation when the decimal exponent is < -4 or >= 16.
void q_format_float_repr(double v, char *out, size_t size) {
    if (isnan(v)) { snprintf(out, size, "NaN"); return; }
    if (isinf(v)) { snprintf(out, size, v < 0 ? "-Infinity" : "Infinity"); return; }
    if (v == 0) { snprintf(out, size, signbit(v) ? "-0.0" : "0.0"); return; }
    char buf[40];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
        if (strtod(buf, NULL) == v) break;
    }
    // buf = [-]d[.ddd]e[+-]XX : pull out the digits and the exponent
    char digits[24];
    int nd = 0, neg = buf[0] == '-';
    char *p = buf + neg;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[nd++] = *p;
    digits[nd] = 0;
    int e = atoi(p + 1);  // value = d.ddd * 10^e
    char *o = out;
    size_t left = size;
#define EMIT(...) do { int k = snprintf(o, left, __VA_ARGS__); if (k < 0 || (size_t)k >= left) return; o += k; left -= k; } while (0)
    if (neg) EMIT("-");
    if (e < -4 || e >= 16) {
        EMIT("%c", digits[0]);
        if (nd > 1) EMIT(".%s", digits + 1);
        EMIT("e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    } else if (e < 0) {
        EMIT("0.");
        for (int i = 0; i < -e - 1; i++) EMIT("0");
        EMIT("%s", digits);
    } else {
        for (int i = 0; i <= e; i++) EMIT("%c", i < nd ? digits[i] : '0');
        EMIT(".");
        if (nd > e + 1) EMIT("%s", digits + e + 1);
        else EMIT("0");
    }
#undef EMIT
}

// ----------------------------------------------------------------------------
// buffer

static int buf_reserve(q_buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

int q_buf_append(q_buf *b, const void *data, size_t n) {
    if (buf_reserve(b, n)) return -1;
    memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = 0;
    return 0;
}

int q_buf_printf(q_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || buf_reserve(b, (size_t)n)) return -1;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

int q_buf_json_string(q_buf *b, const char *s) {
    if (q_buf_append(b, "\"", 1)) return -1;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        int rc;
        switch (*p) {
        case '"': rc = q_buf_append(b, "\\\"", 2); break;
        case '\\': rc = q_buf_append(b, "\\\\", 2); break;
        case '\n': rc = q_buf_append(b, "\\n", 2); break;
        case '\r': rc = q_buf_append(b, "\\r", 2); break;
        case '\t': rc = q_buf_append(b, "\\t", 2); break;
        default:
            rc = *p < 0x20 ? q_buf_printf(b, "\\u%04x", *p) : q_buf_append(b, p, 1);
        }
        if (rc) return -1;
    }
    return q_buf_append(b, "\"", 1);
}

void q_buf_free(q_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

// ----------------------------------------------------------------------------
// files

int q_file_read(const char *path, char **data, size_t *size, q_err *err) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return q_err_set(err, "%s: cannot open: %s", path, strerror(errno));
    q_buf b = {0};
    char chunk[1 << 16];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, fp)) > 0)
        if (q_buf_append(&b, chunk, n)) { fclose(fp); q_buf_free(&b); return q_err_set(err, "%s: out of memory", path); }
    int bad = ferror(fp);
    fclose(fp);
    if (bad) { q_buf_free(&b); return q_err_set(err, "%s: read error", path); }
    if (!b.data && q_buf_append(&b, "", 0)) return q_err_set(err, "%s: out of memory", path);
    *data = b.data;
    *size = b.len;
    return 0;
}

static int fsync_dir_of(const char *path) {
    char *copy = strdup(path);
    if (!copy) return -1;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY);
    free(copy);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

bool q_fault_kill_write(const char *path) {
    const char *fault = getenv("QLORA_FAULT_KILL_WRITE");
    return fault && *fault && strstr(path, fault);
}

int q_file_write_atomic(const char *path, const void *data, size_t size, q_err *err) {
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
        return q_err_set(err, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return q_err_set(err, "%s: cannot create: %s", tmp, strerror(errno));
    const char *p = data;
    size_t left = size;
    const bool fault = q_fault_kill_write(path);
    if (fault) left = size / 2;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = errno;
            close(fd);
            unlink(tmp);
            return q_err_set(err, "%s: write failed: %s", tmp, strerror(e));
        }
        p += w;
        left -= (size_t)w;
    }
    if (fault) {
        fsync(fd);
        raise(SIGKILL);
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        unlink(tmp);
        return q_err_set(err, "%s: fsync failed: %s", tmp, strerror(errno));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return q_err_set(err, "%s: rename failed: %s", path, strerror(e));
    }
    fsync_dir_of(path);  // best effort: the data itself is already durable
    return 0;
}

int q_file_map(const char *path, const uint8_t **map, size_t *size, q_err *err) {
    *map = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return q_err_set(err, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return q_err_set(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return q_err_set(err, "%s: not a regular file", path);
    }
    if (st.st_size > 0) {  // an empty file fails its format's checks; mmap of 0 bytes would fail first
        void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            return q_err_set(err, "%s: cannot mmap: %s", path, strerror(e));
        }
        *map = m;
    }
    close(fd);  // the mapping keeps the file alive
    *size = (size_t)st.st_size;
    return 0;
}

void q_file_unmap(const uint8_t *map, size_t size) {
    if (map && size) munmap((void *)map, size);
}

bool q_path_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

bool q_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int q_mkdir_p(const char *path, q_err *err) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) return q_err_set(err, "%s: path too long", path);
    for (char *p = buf + 1; ; p++) {
        if (*p == '/' || *p == 0) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return q_err_set(err, "%s: cannot create folder: %s", buf, strerror(errno));
            *p = c;
            if (!c) break;
        }
    }
    if (!q_path_is_dir(path)) return q_err_set(err, "%s: exists and is not a folder", path);
    return 0;
}
