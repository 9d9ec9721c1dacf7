// core/json.c: a strict RFC 8259 parser into a q_json tree.
//
// Recursive descent over text[0..len), which need not be NUL-terminated: every
// read goes through peek(), which checks the bound. Anything outside the
// grammar is an error (trailing commas, comments, leading zeros, NaN,
// control characters or invalid UTF-8 in strings, lone surrogates, garbage
// after the value). Object keys are kept in file order, duplicates included;
// callers that care about duplicates check for them.
#include "core.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define JSON_MAX_DEPTH 256

typedef struct parser {
    const unsigned char *s;
    size_t len, pos;
    int depth;
    q_err *err;
} parser;

// ----------------------------------------------------------------------------
// errors and low-level reading

// Errors name the line and column (1-based, in bytes) of p->pos.
static int fail(parser *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(parser *p, const char *fmt, ...) {
    size_t line = 1, col = 1;
    for (size_t i = 0; i < p->pos && i < p->len; i++) {
        if (p->s[i] == '\n') { line++; col = 1; }
        else col++;
    }
    char what[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return q_err_set(p->err, "line %zu, column %zu: %s", line, col, what);
}

// The next byte, or -1 at the end of the input.
static int peek(const parser *p) { return p->pos < p->len ? p->s[p->pos] : -1; }

// Describes the byte at p->pos for an error message.
static const char *describe(const parser *p, char *buf, size_t size) {
    int c = peek(p);
    if (c < 0) snprintf(buf, size, "end of input");
    else if (c > 0x20 && c < 0x7f) snprintf(buf, size, "'%c'", c);
    else snprintf(buf, size, "byte 0x%02x", c);
    return buf;
}

static int fail_unexpected(parser *p, const char *expected) {
    char b[32];
    return fail(p, "expected %s, found %s", expected, describe(p, b, sizeof b));
}

static void skip_ws(parser *p) {
    for (int c; (c = peek(p)) == ' ' || c == '\t' || c == '\n' || c == '\r';) p->pos++;
}

static bool is_digit(int c) { return c >= '0' && c <= '9'; }

// ----------------------------------------------------------------------------
// tree memory

static void free_contents(q_json *v) {
    free(v->string);
    for (size_t i = 0; i < v->count; i++) {
        free_contents(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
}

void q_json_free(q_json *v) {
    if (!v) return;
    free_contents(v);
    free(v);
}

const q_json *q_json_get(const q_json *v, const char *key) {
    if (!v || v->type != Q_JSON_OBJECT) return NULL;
    for (size_t i = 0; i < v->count; i++)
        if (strcmp(v->keys[i], key) == 0) return &v->items[i];
    return NULL;
}

// Appends one zeroed item to an array or object (and a NULL key slot for
// objects), so that a half-parsed child is always safe to free.
static q_json *add_item(parser *p, q_json *v, size_t *cap) {
    if (v->count == *cap) {
        size_t n = *cap ? *cap * 2 : 4;
        q_json *items = realloc(v->items, n * sizeof *items);
        if (!items) return fail(p, "out of memory"), NULL;
        v->items = items;
        if (v->type == Q_JSON_OBJECT) {
            char **keys = realloc(v->keys, n * sizeof *keys);
            if (!keys) return fail(p, "out of memory"), NULL;
            v->keys = keys;
        }
        *cap = n;
    }
    q_json *item = &v->items[v->count];
    memset(item, 0, sizeof *item);
    if (v->type == Q_JSON_OBJECT) v->keys[v->count] = NULL;
    v->count++;
    return item;
}

// ----------------------------------------------------------------------------
// strings

// Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is not one
// (overlong forms, surrogates and code points above U+10FFFF are ill-formed;
// RFC 3629, table 3-7 of the Unicode standard).
static size_t utf8_sequence(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c < 0x80) return 1;
    else if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else return 0;
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xbf) return 0;
    return len;
}

static int hex4(parser *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int c = peek(p);
        if (is_digit(c)) v = v * 16 + (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v = v * 16 + (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v = v * 16 + (unsigned)(c - 'A' + 10);
        else return fail_unexpected(p, "a hex digit in \\u escape");
        p->pos++;
    }
    *out = v;
    return 0;
}

static int append_utf8(q_buf *b, unsigned cp) {
    unsigned char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (unsigned char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (unsigned char)(0xc0 | cp >> 6); n = 2; }
    else if (cp < 0x10000) { u[0] = (unsigned char)(0xe0 | cp >> 12); n = 3; }
    else { u[0] = (unsigned char)(0xf0 | cp >> 18); n = 4; }
    for (size_t i = 1; i < n; i++) u[i] = (unsigned char)(0x80 | ((cp >> (6 * (n - 1 - i))) & 0x3f));
    return q_buf_append(b, u, n);
}

// A \uXXXX escape (the "\u" already consumed); a high surrogate must be
// followed by an escaped low surrogate, and the pair decodes to one code point.
static int parse_unicode_escape(parser *p, q_buf *b) {
    size_t start = p->pos - 2;
    unsigned cp = 0, lo = 0;
    if (hex4(p, &cp)) return -1;
    if (cp >= 0xdc00 && cp <= 0xdfff) {
        p->pos = start;
        return fail(p, "lone low surrogate \\u%04x", cp);
    }
    if (cp >= 0xd800 && cp <= 0xdbff) {
        if (p->len - p->pos < 2 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
            p->pos = start;
            return fail(p, "high surrogate \\u%04x not followed by a low surrogate", cp);
        }
        p->pos += 2;
        if (hex4(p, &lo)) return -1;
        if (lo < 0xdc00 || lo > 0xdfff) {
            p->pos = start;
            return fail(p, "high surrogate \\u%04x followed by \\u%04x, not a low surrogate", cp, lo);
        }
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
    }
    return append_utf8(b, cp) ? fail(p, "out of memory") : 0;
}

// The byte a one-letter escape stands for, or -1 if c is not one.
static int simple_escape(int c) {
    switch (c) {
    case '"': return '"';
    case '\\': return '\\';
    case '/': return '/';
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    default: return -1;
    }
}

// Parses a string at p->pos (on the opening quote) into a malloc'd,
// NUL-terminated buffer; *len excludes the terminator and counts \u0000.
static int parse_string(parser *p, char **out, size_t *len) {
    q_buf b = {0};
    p->pos++;  // opening quote
    for (;;) {
        // copy the run of plain bytes up to the next quote, backslash or problem
        size_t run = p->pos;
        while (run < p->len && p->s[run] >= 0x20 && p->s[run] < 0x80 && p->s[run] != '"' && p->s[run] != '\\') run++;
        if (run > p->pos && q_buf_append(&b, p->s + p->pos, run - p->pos)) goto oom;
        p->pos = run;
        int c = peek(p);
        if (c < 0) { q_buf_free(&b); return fail(p, "unterminated string"); }
        if (c == '"') { p->pos++; break; }
        if (c < 0x20) { q_buf_free(&b); return fail(p, "unescaped control character 0x%02x in string", c); }
        if (c >= 0x80) {
            size_t n = utf8_sequence(p->s + p->pos, p->len - p->pos);
            if (n == 0) { q_buf_free(&b); return fail(p, "invalid UTF-8 byte 0x%02x in string", c); }
            if (q_buf_append(&b, p->s + p->pos, n)) goto oom;
            p->pos += n;
            continue;
        }
        // backslash escape
        p->pos++;
        c = peek(p);
        if (c == 'u') {
            p->pos++;
            if (parse_unicode_escape(p, &b)) { q_buf_free(&b); return -1; }
            continue;
        }
        int decoded = simple_escape(c);
        if (decoded < 0) {
            q_buf_free(&b);
            return fail_unexpected(p, "an escape character (\" \\ / b f n r t u) after '\\'");
        }
        char ch = (char)decoded;
        if (q_buf_append(&b, &ch, 1)) goto oom;
        p->pos++;
    }
    if (!b.data && q_buf_append(&b, "", 0)) goto oom;  // the empty string is "" too, not NULL
    *out = b.data;
    *len = b.len;
    return 0;
oom:
    q_buf_free(&b);
    return fail(p, "out of memory");
}

// ----------------------------------------------------------------------------
// numbers

// -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? checked here; the value then
// comes from strtod over exactly that substring (LC_NUMERIC stays "C": qlora
// never calls setlocale).
static int parse_number(parser *p, q_json *v) {
    size_t start = p->pos;
    bool integral = true;
    if (peek(p) == '-') p->pos++;
    if (peek(p) == '0') {
        p->pos++;
        if (is_digit(peek(p))) {
            p->pos = start;
            return fail(p, "leading zeros are not allowed in numbers");
        }
    } else if (is_digit(peek(p))) {
        while (is_digit(peek(p))) p->pos++;
    } else {
        return fail_unexpected(p, "a digit");
    }
    if (peek(p) == '.') {
        integral = false;
        p->pos++;
        if (!is_digit(peek(p))) return fail_unexpected(p, "a digit after the decimal point");
        while (is_digit(peek(p))) p->pos++;
    }
    if (peek(p) == 'e' || peek(p) == 'E') {
        integral = false;
        p->pos++;
        if (peek(p) == '+' || peek(p) == '-') p->pos++;
        if (!is_digit(peek(p))) return fail_unexpected(p, "a digit in the exponent");
        while (is_digit(peek(p))) p->pos++;
    }
    size_t n = p->pos - start;
    char small[64], *tmp = n < sizeof small ? small : malloc(n + 1);
    if (!tmp) return fail(p, "out of memory");
    memcpy(tmp, p->s + start, n);
    tmp[n] = 0;
    errno = 0;
    v->type = Q_JSON_NUMBER;
    v->number = strtod(tmp, NULL);
    int range = errno;
    if (tmp != small) free(tmp);
    if (range == ERANGE && isinf(v->number)) {
        p->pos = start;
        return fail(p, "number out of range of a double");
    }
    if (integral) {
        // exact int64 when it fits: magnitude up to 2^63 - 1, or 2^63 when negative
        const unsigned char *d = p->s + start;
        bool neg = *d == '-';
        uint64_t mag = 0, limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
        bool fits = true;
        for (d += neg; d < p->s + p->pos && fits; d++) {
            unsigned digit = (unsigned)(*d - '0');
            if (mag > (limit - digit) / 10) fits = false;
            else mag = mag * 10 + digit;
        }
        if (fits) {
            v->is_int = true;
            v->integer = !neg || mag == 0 ? (int64_t)mag : -(int64_t)(mag - 1) - 1;  // no overflow at INT64_MIN
        }
    }
    return 0;
}

// ----------------------------------------------------------------------------
// values

static int parse_value(parser *p, q_json *v);

static int parse_array(parser *p, q_json *v) {
    size_t cap = 0;
    v->type = Q_JSON_ARRAY;
    p->pos++;  // '['
    skip_ws(p);
    if (peek(p) == ']') { p->pos++; return 0; }
    for (;;) {
        q_json *item = add_item(p, v, &cap);
        if (!item || parse_value(p, item)) return -1;
        skip_ws(p);
        int c = peek(p);
        if (c == ']') { p->pos++; return 0; }
        if (c != ',') return fail_unexpected(p, "',' or ']' in array");
        p->pos++;
        skip_ws(p);
        if (peek(p) == ']') return fail(p, "trailing comma in array");
    }
}

static int parse_object(parser *p, q_json *v) {
    size_t cap = 0;
    v->type = Q_JSON_OBJECT;
    p->pos++;  // '{'
    skip_ws(p);
    if (peek(p) == '}') { p->pos++; return 0; }
    for (;;) {
        if (peek(p) != '"') return fail_unexpected(p, "a string key in object");
        size_t key_pos = p->pos;
        q_json *item = add_item(p, v, &cap);
        if (!item) return -1;
        size_t key_len;
        if (parse_string(p, &v->keys[v->count - 1], &key_len)) return -1;
        if (strlen(v->keys[v->count - 1]) != key_len) {  // keys are C strings in this API
            p->pos = key_pos;
            return fail(p, "object key contains \\u0000");
        }
        skip_ws(p);
        if (peek(p) != ':') return fail_unexpected(p, "':' after object key");
        p->pos++;
        if (parse_value(p, item)) return -1;
        skip_ws(p);
        int c = peek(p);
        if (c == '}') { p->pos++; return 0; }
        if (c != ',') return fail_unexpected(p, "',' or '}' in object");
        p->pos++;
        skip_ws(p);
        if (peek(p) == '}') return fail(p, "trailing comma in object");
    }
}

static int parse_literal(parser *p, const char *word) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) return fail_unexpected(p, "a JSON value");
    p->pos += n;
    return 0;
}

static int parse_value(parser *p, q_json *v) {
    skip_ws(p);
    int c = peek(p);
    switch (c) {
    case '{':
    case '[': {
        if (++p->depth > JSON_MAX_DEPTH) return fail(p, "nesting deeper than %d levels", JSON_MAX_DEPTH);
        int rc = c == '{' ? parse_object(p, v) : parse_array(p, v);
        p->depth--;
        return rc;
    }
    case '"':
        v->type = Q_JSON_STRING;
        return parse_string(p, &v->string, &v->string_len);
    case 't': v->type = Q_JSON_BOOL; v->boolean = true; return parse_literal(p, "true");
    case 'f': v->type = Q_JSON_BOOL; return parse_literal(p, "false");
    case 'n': v->type = Q_JSON_NULL; return parse_literal(p, "null");
    default:
        if (c == '-' || is_digit(c)) return parse_number(p, v);
        return fail_unexpected(p, "a JSON value");
    }
}

int q_json_parse(const char *text, size_t len, q_json **out, q_err *err) {
    *out = NULL;
    parser p = {.s = (const unsigned char *)text, .len = text ? len : 0, .err = err};
    q_json *root = calloc(1, sizeof *root);
    if (!root) return q_err_set(err, "out of memory");
    if (parse_value(&p, root)) { q_json_free(root); return -1; }
    skip_ws(&p);
    if (p.pos < p.len) {
        q_json_free(root);
        return fail_unexpected(&p, "end of input after the JSON value");
    }
    *out = root;
    return 0;
}
