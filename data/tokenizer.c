// data/tokenizer.c: byte-level BPE, token for token what HF `tokenizers`
// produces for the tokenizer.json files of Llama 3, SmolLM/SmolLM2 and Qwen2,
// and for GGUF files with tokenizer.ggml.model "gpt2".
//
// encode, as HF runs it (tokenizer/mod.rs, added_vocabulary.rs):
//   1. added tokens with normalized=false are cut out of the raw text
//      (leftmost-longest, then the single_word / lstrip / rstrip rules);
//   2. each remaining segment is normalized (NFC where configured), then the
//      added tokens with normalized=true are cut out of it;
//   3. the pre-tokenizer stages split each piece further: Split (a regex and a
//      delimiter behavior), Digits, ByteLevel (optional prefix space, GPT-2
//      regex); ByteLevel must be the last stage;
//   4. each piece's bytes are merged by BPE rank (the GPT-2 byte alphabet is
//      only a spelling: we merge raw bytes and never build the Ġ strings).
// Regexes run on PCRE2 (JIT); HF runs Oniguruma. The two agree on these
// patterns once `\s` is spelled as Unicode White_Space (PCRE2 also counts
// U+180E), which regex_respell does.
//
// Speed: a pre-token that is a whole vocabulary entry is one hash lookup when
// merges could not split it differently (ignore_merges, or the entry's own
// bytes merge back to itself, checked once at load). Everything else is merged
// with a rank scan (short pieces) or a heap (long ones, O(n log n)). All state
// of an encode call lives on its own workspace: a tokenizer may be shared by
// threads.
//
// BOS/EOS rules (tokenizer.json has no eos field):
//   BOS: the leading special token of the post_processor's TemplateProcessing
//        (tok_adds_bos true), else tokenizer_config.json "bos_token" beside the
//        file (tok_adds_bos = its "add_bos_token", default false), else none.
//   EOS: tokenizer_config.json "eos_token", else the first token present of
//        <|endoftext|>, <|end_of_text|>, </s>, <|im_end|>, <|eot_id|>
//        (the document end of GPT-2/SmolLM/Qwen2, Llama 3, Llama 2 style).
//   GGUF: tokenizer.ggml.bos_token_id / eos_token_id / add_bos_token (default
//        true for llama-bpe, false otherwise, as llama.cpp).
#define _GNU_SOURCE
#include "data.h"

#include <stdio.h>
#include <stdlib.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#ifdef QLORA_HAVE_UTF8PROC
#include <utf8proc.h>
#endif

#define TOK_MAX_STAGES 8
#define TOK_MAX_TOKEN_BYTES (1u << 20)  // a vocabulary entry longer than this is a broken file
#define TOK_MAX_VOCAB (1 << 24)         // ids beyond this are a broken file (real ones: up to ~262k)
#define BPE_SCAN_MAX 48                 // longer pieces merge with the heap

// Unicode White_Space, as Rust's char::is_whitespace and Oniguruma's \s see it
#define WS_CLASS "\\t-\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
// HF's ByteLevel pre-tokenizer regex (pre_tokenizers/byte_level.rs)
static const char GPT2_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
// The Split patterns of Llama 3 and Qwen2 (for GGUF files, which only name them)
static const char LLAMA3_REGEX[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char QWEN2_REGEX[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// ----------------------------------------------------------------------------
// UTF-8 and the GPT-2 byte alphabet

// Decodes one code point of valid UTF-8 (validated before); returns its length.
static size_t utf8_decode(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t b = s[0];
    size_t len = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    if (len > n) len = 1;  // cannot happen on validated text; stays in bounds anyway
    switch (len) {
    case 1: *cp = b; break;
    case 2: *cp = ((uint32_t)(b & 0x1F) << 6) | (s[1] & 0x3F); break;
    case 3: *cp = ((uint32_t)(b & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F); break;
    default:
        *cp = ((uint32_t)(b & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) |
              (s[3] & 0x3F);
    }
    return len;
}

// Length of the well-formed UTF-8 sequence at s (Unicode table 3-7), or 0.
static size_t utf8_valid_len(const uint8_t *s, size_t n) {
    uint8_t b = s[0];
    if (b < 0x80) return 1;
    size_t len = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (!len || n < 2) return 0;
    uint8_t lo = 0x80, hi = 0xBF;  // the second byte's range depends on the first
    if (b == 0xE0) lo = 0xA0;
    else if (b == 0xED) hi = 0x9F;
    else if (b == 0xF0) lo = 0x90;
    else if (b == 0xF4) hi = 0x8F;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (i >= n || (s[i] & 0xC0) != 0x80) return 0;
    return len;
}

// Offset of the first invalid byte, or n when s[0..n) is valid UTF-8.
static size_t utf8_check(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) { i++; continue; }
        size_t l = utf8_valid_len(s + i, n - i);
        if (!l) return i;
        i += l;
    }
    return n;
}

static size_t utf8_encode(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12)); out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18)); out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

// GPT-2 bytes_to_unicode: printable bytes stand for themselves, the other 68
// become U+0100.. in byte order. Inverse: the byte a code point spells, or -1.
static int bl_byte_of(uint32_t cp) {
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF)) return (int)cp;
    if (cp >= 0x100 && cp <= 0x120) return (int)(cp - 0x100);          // 0x00..0x20
    if (cp >= 0x121 && cp <= 0x142) return (int)(cp - 0x121 + 0x7F);   // 0x7F..0xA0
    if (cp == 0x143) return 0xAD;
    return -1;
}

// Unicode White_Space (Rust char::is_whitespace; the lstrip/rstrip rules)
static bool is_white_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// ----------------------------------------------------------------------------
// hashing, an arena for strings that live as long as the tokenizer

static uint64_t hash_bytes(const void *p, size_t n) {
    const uint8_t *s = p;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xFF51AFD7ED558CCDull);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, s, 8);
        h = (h ^ v) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
        s += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, s, n);
    h = (h ^ v) * 0x94D049BB133111EBull;
    return h ^ (h >> 29);
}

typedef struct arena_block {
    struct arena_block *next;
    size_t used, cap;
    char data[];
} arena_block;

typedef struct arena {
    arena_block *head;
} arena;

static char *arena_dup(arena *a, const void *src, size_t n) {
    if (!a->head || a->head->cap - a->head->used < n + 1) {
        size_t cap = n + 1 > (1u << 20) ? n + 1 : (1u << 20);
        arena_block *b = malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->next = a->head;
        b->used = 0;
        b->cap = cap;
        a->head = b;
    }
    char *p = a->head->data + a->head->used;
    if (src && n) memcpy(p, src, n);  // src NULL: reserve only
    p[n] = 0;
    a->head->used += n + 1;
    return p;
}

static void arena_free(arena *a) {
    for (arena_block *b = a->head, *nx; b; b = nx) {
        nx = b->next;
        free(b);
    }
    a->head = NULL;
}

// ----------------------------------------------------------------------------
// maps: byte string -> id, and (left id, right id) -> (rank, merged id)

typedef struct str_slot {
    const char *key;  // NULL = empty; points into the arena
    uint32_t len;
    uint32_t tag;     // high hash bits
    uint64_t head0;   // the key's first 12 bytes, zero-padded: most keys
    uint32_t head1;   // compare without leaving the slot
    int32_t val;
} str_slot;

typedef struct str_map {
    str_slot *slots;
    size_t mask;
} str_map;

typedef struct str_probe {
    uint64_t hash, head0;
    uint32_t head1;
} str_probe;

static str_probe smap_probe(const char *k, size_t n) {
    char head[12] = {0};
    memcpy(head, k, n < 12 ? n : 12);
    str_probe p = {hash_bytes(k, n), 0, 0};
    memcpy(&p.head0, head, 8);
    memcpy(&p.head1, head + 8, 4);
    return p;
}

static int smap_init(str_map *m, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    m->slots = calloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    return m->slots ? 0 : -1;
}

// The slot holding k, or the empty slot where it would go.
static str_slot *smap_slot(const str_map *m, const char *k, size_t n, str_probe p) {
    uint32_t tag = (uint32_t)(p.hash >> 32);
    for (size_t i = p.hash & m->mask;; i = (i + 1) & m->mask) {
        str_slot *s = &m->slots[i];
        if (!s->key) return s;
        if (s->tag == tag && s->len == n && s->head0 == p.head0 && s->head1 == p.head1 &&
            (n <= 12 || memcmp(s->key + 12, k + 12, n - 12) == 0))
            return s;
    }
}

static int32_t smap_get(const str_map *m, const char *k, size_t n) {
    const str_slot *s = smap_slot(m, k, n, smap_probe(k, n));
    return s->key ? s->val : -1;
}

// Inserts or overwrites (later entries win, as in a Python/Rust map built in order).
static void smap_put(str_map *m, const char *k, size_t n, int32_t val) {
    str_probe p = smap_probe(k, n);
    str_slot *s = smap_slot(m, k, n, p);
    *s = (str_slot){k, (uint32_t)n, (uint32_t)(p.hash >> 32), p.head0, p.head1, val};
}

typedef struct merge_slot {
    uint64_t key;  // ((a + 1) << 32) | b, 0 = empty
    uint32_t rank;
    int32_t id;
} merge_slot;

typedef struct merge_map {
    merge_slot *slots;
    size_t mask;
} merge_map;

static inline uint64_t merge_key(int32_t a, int32_t b) { return ((uint64_t)(uint32_t)(a + 1) << 32) | (uint32_t)b; }

static inline const merge_slot *merge_find(const merge_map *m, int32_t a, int32_t b) {
    uint64_t k = merge_key(a, b);
    for (size_t i = (k * 0x9E3779B97F4A7C15ull) >> 20 & m->mask;; i = (i + 1) & m->mask) {
        const merge_slot *s = &m->slots[i];
        if (s->key == k) return s;
        if (!s->key) return NULL;
    }
}

static void merge_put(merge_map *m, int32_t a, int32_t b, uint32_t rank, int32_t id) {
    uint64_t k = merge_key(a, b);
    for (size_t i = (k * 0x9E3779B97F4A7C15ull) >> 20 & m->mask;; i = (i + 1) & m->mask) {
        merge_slot *s = &m->slots[i];
        if (!s->key || s->key == k) {  // a repeated merge takes its later rank, as HF's HashMap does
            s->key = k;
            s->rank = rank;
            s->id = id;
            return;
        }
    }
}

// ----------------------------------------------------------------------------
// the tokenizer

enum { TOKEN_SPECIAL = 1, TOKEN_ADDED = 2, TOKEN_WHOLE = 4 };

typedef struct tok_entry {
    const char *text;   // as the vocabulary spells it (added tokens: their content); NULL = unused id
    const char *bytes;  // what decode emits for it
    uint32_t text_len, n_bytes;
    uint8_t flags;      // TOKEN_*: WHOLE = BPE of its own bytes gives back exactly this token
} tok_entry;

typedef struct tok_added {
    const char *content;  // the text matched (normalized when `normalized`)
    uint32_t len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} tok_added;

// A byte trie over added-token contents: first-child / next-sibling lists.
typedef struct trie_node {
    int32_t child, sibling, added;  // added: index into t->added, -1 = not the end of a token
    uint8_t byte;
} trie_node;

typedef struct tok_trie {
    trie_node *nodes;  // [n], node 0 is the root
    int32_t n, cap;
    uint8_t first[32];  // bitmap of first bytes
} tok_trie;

typedef enum split_behavior {
    SPLIT_REMOVED, SPLIT_ISOLATED, SPLIT_MERGED_WITH_PREVIOUS, SPLIT_MERGED_WITH_NEXT, SPLIT_CONTIGUOUS
} split_behavior;

typedef struct tok_regex {
    pcre2_code *code;
    bool jit;
} tok_regex;

// One pre-tokenizer stage: optional prefix space (ByteLevel), then an
// optional regex split.
typedef struct tok_stage {
    bool prefix_space;
    bool split;
    tok_regex re;
    split_behavior behavior;
    bool invert;
} tok_stage;

struct tok_tokenizer {
    arena strings;
    tok_entry *tokens;  // [n_vocab], indexed by id
    int64_t n_vocab;    // largest id + 1
    str_map by_text;    // model vocabulary spelling -> id
    str_map by_bytes;   // raw bytes of byte-level vocabulary entries -> id
    merge_map merges;
    int32_t byte_id[256];  // the single-byte tokens, -1 when absent
    int32_t unk_id;
    bool fuse_unk, ignore_merges;

    tok_added *added;  // [n_added]
    int n_added, cap_added;
    tok_trie trie_raw, trie_norm;  // normalized=false / normalized=true tokens
    tok_regex word_re;             // \w test for single_word tokens

    bool nfc;
    tok_stage stages[TOK_MAX_STAGES];
    int n_stages;
    int byte_level_stage;  // index of the ByteLevel stage, -1 = none yet

    int32_t bos, eos;
    bool add_bos;
};

// ----------------------------------------------------------------------------
// regexes

// Oniguruma's \s is Unicode White_Space; PCRE2's also matches U+180E. Spell
// \s and \S out so both engines agree.
static int regex_respell(const char *p, size_t n, q_buf *b) {
    bool in_class = false;
    int rc = q_buf_append(b, "", 0);
    for (size_t i = 0; i < n && !rc; i++) {
        char c = p[i];
        if (c == '\\' && i + 1 < n) {
            char x = p[++i];
            if (x == 's') rc = q_buf_printf(b, in_class ? "%s" : "[%s]", WS_CLASS);
            else if (x == 'S' && !in_class) rc = q_buf_printf(b, "[^%s]", WS_CLASS);
            else rc = q_buf_append(b, p + i - 1, 2);
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = true;
            rc = q_buf_append(b, "[", 1);
            if (!rc && i + 1 < n && p[i + 1] == '^') rc = q_buf_append(b, p + ++i, 1);
            if (!rc && i + 1 < n && p[i + 1] == ']') rc = q_buf_append(b, p + ++i, 1);  // a literal ] first
            continue;
        }
        if (c == '[' && in_class && i + 1 < n && p[i + 1] == ':') {  // [:alpha:] inside a class
            const char *end = memmem(p + i, n - i, ":]", 2);
            size_t l = end ? (size_t)(end - (p + i)) + 2 : 1;
            rc = q_buf_append(b, p + i, l);
            i += l - 1;
            continue;
        }
        if (c == ']' && in_class) in_class = false;
        rc = q_buf_append(b, &c, 1);
    }
    return rc;
}

// Compiles a Split pattern (literal: a plain string) with Unicode properties, JIT when available.
static int regex_compile(tok_regex *r, const char *pattern, size_t n, bool literal, q_err *err) {
    q_buf b = {0};
    if (!literal && regex_respell(pattern, n, &b)) {
        q_buf_free(&b);
        return q_err_set(err, "out of memory");
    }
    int code;
    PCRE2_SIZE off;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    r->code = literal ? pcre2_compile((PCRE2_SPTR)pattern, n, opts, &code, &off, NULL)
                      : pcre2_compile((PCRE2_SPTR)b.data, b.len, opts, &code, &off, NULL);
    q_buf_free(&b);
    if (!r->code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return q_err_set(err, "regex \"%.*s\": %s", (int)(n > 200 ? 200 : n), pattern, (char *)msg);
    }
    r->jit = pcre2_jit_compile(r->code, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

static void regex_free(tok_regex *r) {
    if (r->code) pcre2_code_free(r->code);
    r->code = NULL;
}

// Leftmost match in s[0..n) at or after `from`: 1 found, 0 none, -1 error.
static int regex_search(const tok_regex *r, pcre2_match_data *md, const char *s, size_t n, size_t from,
                        size_t *ms, size_t *me, q_err *err) {
    int rc = -1;
    if (r->jit) rc = pcre2_jit_match(r->code, (PCRE2_SPTR)s, n, from, 0, md, NULL);
    // no JIT, or its stack ran out on a pathological input: the interpreter keeps going on the heap
    if (!r->jit || rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(r->code, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, md, NULL);
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return q_err_set(err, "regex match failed: %s", (char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

// ----------------------------------------------------------------------------
// NFC

// NFC of s[0..n): *out NULL when s is already NFC by the fast path (every
// code point below U+0300), else a malloc'd string.
static int nfc_apply(const char *s, size_t n, char **out, size_t *out_n, q_err *err) {
    *out = NULL;
    *out_n = n;
    size_t i = 0;
    while (i < n && (uint8_t)s[i] < 0xCC) i++;  // lead bytes from 0xCC start at U+0300
    if (i == n) return 0;
#ifdef QLORA_HAVE_UTF8PROC
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (r < 0) return q_err_set(err, "NFC normalization failed: %s", utf8proc_errmsg(r));
    *out = (char *)dst;
    *out_n = (size_t)r;
    return 0;
#else
    return q_err_set(err, "the NFC normalizer needs utf8proc, which this build lacks (apt install libutf8proc-dev)");
#endif
}

// ----------------------------------------------------------------------------
// added tokens: a trie for leftmost-longest matching

static int trie_add(tok_trie *tr, const char *s, size_t n, int32_t added) {
    if (!tr->nodes) {
        tr->cap = 64;
        tr->nodes = malloc((size_t)tr->cap * sizeof *tr->nodes);
        if (!tr->nodes) return -1;
        tr->nodes[0] = (trie_node){-1, -1, -1, 0};
        tr->n = 1;
    }
    int32_t cur = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = (uint8_t)s[i];
        int32_t c = tr->nodes[cur].child;
        while (c >= 0 && tr->nodes[c].byte != b) c = tr->nodes[c].sibling;
        if (c < 0) {
            if (tr->n == tr->cap) {
                trie_node *nn = realloc(tr->nodes, (size_t)tr->cap * 2 * sizeof *nn);
                if (!nn) return -1;
                tr->nodes = nn;
                tr->cap *= 2;
            }
            c = tr->n++;
            tr->nodes[c] = (trie_node){-1, tr->nodes[cur].child, -1, b};
            tr->nodes[cur].child = c;
        }
        cur = c;
    }
    if (n) tr->first[(uint8_t)s[0] >> 3] |= (uint8_t)(1u << ((uint8_t)s[0] & 7));
    tr->nodes[cur].added = added;  // the same content twice: the later token is matched
    return 0;
}

// Leftmost-longest match at or after `from`: the index of the added token and
// its span, or -1.
static int trie_find(const tok_trie *tr, const char *s, size_t n, size_t from, size_t *ms, size_t *me) {
    if (!tr->nodes) return -1;
    for (size_t p = from; p < n; p++) {
        uint8_t b0 = (uint8_t)s[p];
        if (!(tr->first[b0 >> 3] & (1u << (b0 & 7)))) continue;
        int32_t cur = 0, best = -1;
        size_t best_end = 0;
        for (size_t i = p; i < n; i++) {
            int32_t c = tr->nodes[cur].child;
            while (c >= 0 && tr->nodes[c].byte != (uint8_t)s[i]) c = tr->nodes[c].sibling;
            if (c < 0) break;
            cur = c;
            if (tr->nodes[cur].added >= 0) {
                best = tr->nodes[cur].added;
                best_end = i + 1;
            }
        }
        if (best >= 0) {
            *ms = p;
            *me = best_end;
            return best;
        }
    }
    return -1;
}

// ----------------------------------------------------------------------------
// BPE

typedef struct bpe_heap_item {
    uint32_t rank;
    int32_t pos, id;
} bpe_heap_item;

// Per-call scratch space (tok_encode's; the loader's for TOKEN_WHOLE).
typedef struct workspace {
    int32_t *sym, *next, *prev;
    uint32_t *rank;
    int32_t *merged;
    bpe_heap_item *heap;
    size_t cap, heap_cap;
    int32_t *out;  // the encoding
    int64_t n_out, cap_out;
    pcre2_match_data *md;
} workspace;

static void ws_free(workspace *w) {
    free(w->sym); free(w->next); free(w->prev); free(w->rank); free(w->merged); free(w->heap); free(w->out);
    if (w->md) pcre2_match_data_free(w->md);
    memset(w, 0, sizeof *w);
}

static int ws_reserve(workspace *w, size_t n) {
    if (n <= w->cap) return 0;
    size_t cap = w->cap ? w->cap : 64;
    while (cap < n) cap *= 2;
    int32_t *a = realloc(w->sym, cap * sizeof *a);
    if (a) w->sym = a;
    int32_t *b = realloc(w->next, cap * sizeof *b);
    if (b) w->next = b;
    int32_t *c = realloc(w->prev, cap * sizeof *c);
    if (c) w->prev = c;
    uint32_t *d = realloc(w->rank, cap * sizeof *d);
    if (d) w->rank = d;
    int32_t *e = realloc(w->merged, cap * sizeof *e);
    if (e) w->merged = e;
    if (!a || !b || !c || !d || !e) return -1;
    w->cap = cap;
    return 0;
}

static int out_push(workspace *w, int32_t id) {
    if (w->n_out == w->cap_out) {
        int64_t cap = w->cap_out ? 2 * w->cap_out : 256;
        int32_t *p = realloc(w->out, (size_t)cap * sizeof *p);
        if (!p) return -1;
        w->out = p;
        w->cap_out = cap;
    }
    w->out[w->n_out++] = id;
    return 0;
}

static inline uint32_t pair_rank(const tok_tokenizer *t, int32_t a, int32_t b, int32_t *id) {
    const merge_slot *m = merge_find(&t->merges, a, b);
    if (!m) return UINT32_MAX;
    *id = m->id;
    return m->rank;
}

// HF's heap order: lowest rank first, then leftmost.
static bool heap_less(bpe_heap_item a, bpe_heap_item b) { return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos); }

static int heap_push(workspace *w, size_t *n, bpe_heap_item it) {
    if (*n == w->heap_cap) {
        size_t cap = w->heap_cap ? 2 * w->heap_cap : 256;
        bpe_heap_item *h = realloc(w->heap, cap * sizeof *h);
        if (!h) return -1;
        w->heap = h;
        w->heap_cap = cap;
    }
    size_t i = (*n)++;
    while (i > 0 && heap_less(it, w->heap[(i - 1) / 2])) {
        w->heap[i] = w->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    w->heap[i] = it;
    return 0;
}

static bpe_heap_item heap_pop(workspace *w, size_t *n) {
    bpe_heap_item top = w->heap[0], last = w->heap[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(w->heap[c + 1], w->heap[c])) c++;
        if (!heap_less(w->heap[c], last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (*n) w->heap[i] = last;
    return top;
}

// Merges the bytes s[0..n) by rank and appends the resulting ids to w->out.
// Same result as HF's word.merge_all: always the lowest-rank pair, leftmost first.
static int bpe_merge(const tok_tokenizer *t, workspace *w, const uint8_t *s, size_t n) {
    if (ws_reserve(w, n)) return -1;
    int32_t *sym = w->sym;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0) {  // a byte the vocabulary lacks: unk (fused if asked), else dropped as HF does
            if (t->unk_id < 0 || (t->fuse_unk && m && sym[m - 1] == t->unk_id)) continue;
            id = t->unk_id;
        }
        sym[m++] = id;
    }
    if (m <= BPE_SCAN_MAX) {
        uint32_t *rank = w->rank;
        int32_t *merged = w->merged;
        for (size_t i = 0; i + 1 < m; i++) rank[i] = pair_rank(t, sym[i], sym[i + 1], &merged[i]);
        while (m > 1) {
            size_t best = 0;
            for (size_t i = 1; i + 1 < m; i++)
                if (rank[i] < rank[best]) best = i;
            if (rank[best] == UINT32_MAX) break;
            sym[best] = merged[best];
            m--;
            for (size_t i = best + 1; i < m; i++) sym[i] = sym[i + 1];
            for (size_t i = best + 1; i + 1 < m; i++) {
                rank[i] = rank[i + 1];
                merged[i] = merged[i + 1];
            }
            if (best > 0) rank[best - 1] = pair_rank(t, sym[best - 1], sym[best], &merged[best - 1]);
            if (best + 1 < m) rank[best] = pair_rank(t, sym[best], sym[best + 1], &merged[best]);
        }
        for (size_t i = 0; i < m; i++)
            if (out_push(w, sym[i])) return -1;
        return 0;
    }
    // long pieces: a linked list of symbols and a heap of candidate merges
    int32_t *next = w->next, *prev = w->prev;
    size_t hn = 0;
    for (size_t i = 0; i < m; i++) {
        next[i] = i + 1 < m ? (int32_t)i + 1 : -1;
        prev[i] = (int32_t)i - 1;
    }
    for (size_t i = 0; i + 1 < m; i++) {
        int32_t id = -1;
        uint32_t r = pair_rank(t, sym[i], sym[i + 1], &id);
        if (r != UINT32_MAX && heap_push(w, &hn, (bpe_heap_item){r, (int32_t)i, id})) return -1;
    }
    while (hn) {
        bpe_heap_item top = heap_pop(w, &hn);
        int32_t p = top.pos, q = next[p];
        if (sym[p] < 0 || q < 0) continue;  // merged away, or now the last symbol
        int32_t id = -1;
        if (pair_rank(t, sym[p], sym[q], &id) != top.rank || id != top.id) continue;  // stale entry
        sym[p] = id;
        sym[q] = -1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        uint32_t r;
        if (prev[p] >= 0 && (r = pair_rank(t, sym[prev[p]], sym[p], &id)) != UINT32_MAX &&
            heap_push(w, &hn, (bpe_heap_item){r, prev[p], id}))
            return -1;
        if (next[p] >= 0 && (r = pair_rank(t, sym[p], sym[next[p]], &id)) != UINT32_MAX &&
            heap_push(w, &hn, (bpe_heap_item){r, p, id}))
            return -1;
    }
    for (int32_t i = 0; i >= 0; i = next[i])
        if (out_push(w, sym[i])) return -1;
    return 0;
}

// One pre-token: a whole vocabulary entry when merges cannot split it, else BPE.
static int bpe_piece(const tok_tokenizer *t, workspace *w, const char *s, size_t n) {
    int32_t id = smap_get(&t->by_bytes, s, n);
    if (id >= 0 && (t->ignore_merges || (t->tokens[id].flags & TOKEN_WHOLE))) return out_push(w, id);
    return bpe_merge(t, w, (const uint8_t *)s, n);
}

// ----------------------------------------------------------------------------
// building (shared by both loaders)

static tok_tokenizer *tok_new(void) {
    tok_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->unk_id = t->bos = t->eos = t->byte_level_stage = -1;
    for (int i = 0; i < 256; i++) t->byte_id[i] = -1;
    return t;
}

void tok_free(tok_tokenizer *t) {
    if (!t) return;
    arena_free(&t->strings);
    free(t->tokens);
    free(t->by_text.slots);
    free(t->by_bytes.slots);
    free(t->merges.slots);
    free(t->added);
    free(t->trie_raw.nodes);
    free(t->trie_norm.nodes);
    regex_free(&t->word_re);
    for (int i = 0; i < t->n_stages; i++) regex_free(&t->stages[i].re);
    free(t);
}

static int vocab_alloc(tok_tokenizer *t, int64_t n_vocab, size_t n_text, size_t n_merges, q_err *err) {
    t->n_vocab = n_vocab;
    t->tokens = calloc((size_t)n_vocab, sizeof *t->tokens);
    if (!t->tokens || smap_init(&t->by_text, n_text) || smap_init(&t->by_bytes, n_text))
        return q_err_set(err, "out of memory for %lld tokens", (long long)n_vocab);
    size_t cap = 16;
    while (cap < 2 * n_merges) cap *= 2;
    t->merges.slots = calloc(cap, sizeof *t->merges.slots);
    t->merges.mask = cap - 1;
    return t->merges.slots ? 0 : q_err_set(err, "out of memory for %zu merges", n_merges);
}

// The raw bytes a byte-level spelling stands for; false when some character
// is outside the GPT-2 alphabet. out holds at least n bytes.
static bool byte_level_decode(const char *s, size_t n, char *out, size_t *out_n) {
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_decode((const uint8_t *)s + i, n - i, &cp);
        int b = bl_byte_of(cp);
        if (b < 0) return false;
        out[k++] = (char)b;
    }
    *out_n = k;
    return true;
}

// A model vocabulary entry. raw_if_not_byte_level: GGUF files may store
// tokens in plain UTF-8; transformers respells those, so their bytes are the text.
static int vocab_set(tok_tokenizer *t, int64_t id, const char *text, size_t n, bool raw_if_not_byte_level,
                     q_err *err) {
    if (id < 0 || id >= t->n_vocab) return q_err_set(err, "token id %lld out of range", (long long)id);
    if (n > TOK_MAX_TOKEN_BYTES) return q_err_set(err, "token %lld is %zu bytes long", (long long)id, n);
    if (utf8_check((const uint8_t *)text, n) != n) return q_err_set(err, "token %lld is not valid UTF-8", (long long)id);
    tok_entry *e = &t->tokens[id];
    if (e->text && !(e->flags & TOKEN_ADDED))
        return q_err_set(err, "token id %lld is used by \"%s\" and \"%.*s\"", (long long)id, e->text, (int)n, text);
    char *s = arena_dup(&t->strings, text, n), *b = arena_dup(&t->strings, NULL, n);
    if (!s || !b) return q_err_set(err, "out of memory");
    size_t nb;
    bool byte_level = byte_level_decode(text, n, b, &nb);
    if (!byte_level) {
        memcpy(b, text, n);
        nb = n;
    }
    e->text = s;
    e->text_len = (uint32_t)n;
    e->bytes = b;
    e->n_bytes = (uint32_t)nb;
    smap_put(&t->by_text, s, n, (int32_t)id);
    if (byte_level || raw_if_not_byte_level) smap_put(&t->by_bytes, b, nb, (int32_t)id);
    return 0;
}

// "a" + "b" -> merged token, rank = position in the list.
static int merge_add(tok_tokenizer *t, const char *a, size_t na, const char *b, size_t nb, uint32_t rank,
                     char **tmp, size_t *tmp_cap, q_err *err) {
    int32_t ia = smap_get(&t->by_text, a, na), ib = smap_get(&t->by_text, b, nb);
    if (ia < 0 || ib < 0)
        return q_err_set(err, "merge %u (\"%.*s\" \"%.*s\"): \"%.*s\" is not in the vocabulary", rank, (int)na, a,
                         (int)nb, b, ia < 0 ? (int)na : (int)nb, ia < 0 ? a : b);
    if (na + nb > *tmp_cap) {
        size_t cap = 2 * (na + nb) + 64;
        char *p = realloc(*tmp, cap);
        if (!p) return q_err_set(err, "out of memory");
        *tmp = p;
        *tmp_cap = cap;
    }
    memcpy(*tmp, a, na);
    memcpy(*tmp + na, b, nb);
    int32_t id = smap_get(&t->by_text, *tmp, na + nb);
    if (id < 0)
        return q_err_set(err, "merge %u: \"%.*s\" is not in the vocabulary", rank, (int)(na + nb), *tmp);
    merge_put(&t->merges, ia, ib, rank, id);
    return 0;
}

static int added_add(tok_tokenizer *t, tok_added a, q_err *err) {
    if (a.id < 0 || a.id >= t->n_vocab) return q_err_set(err, "added token id %d out of range", a.id);
    if (utf8_check((const uint8_t *)a.content, a.len) != a.len)
        return q_err_set(err, "added token %d is not valid UTF-8", a.id);
    if (t->n_added == t->cap_added) {
        int cap = t->cap_added ? 2 * t->cap_added : 32;
        tok_added *p = realloc(t->added, (size_t)cap * sizeof *p);
        if (!p) return q_err_set(err, "out of memory");
        t->added = p;
        t->cap_added = cap;
    }
    char *c = arena_dup(&t->strings, a.content, a.len), *b = arena_dup(&t->strings, NULL, a.len);
    if (!c || !b) return q_err_set(err, "out of memory");
    a.content = c;
    t->added[t->n_added++] = a;
    // decoding shows the content through the ByteLevel decoder: a token
    // spelled in the byte alphabet becomes those bytes, any other as it is
    tok_entry *e = &t->tokens[a.id];
    size_t nb;
    if (!byte_level_decode(c, a.len, b, &nb)) {
        memcpy(b, c, a.len);
        nb = a.len;
    }
    e->text = c;
    e->text_len = a.len;
    e->bytes = b;
    e->n_bytes = (uint32_t)nb;
    e->flags |= TOKEN_ADDED | (a.special ? TOKEN_SPECIAL : 0);
    return 0;
}

// Adds a pre-tokenizer stage: a regex split (pattern NULL: none).
static int stage_add(tok_tokenizer *t, const char *pattern, size_t n, bool literal, split_behavior behavior,
                     bool invert, bool prefix_space, q_err *err) {
    if (t->n_stages == TOK_MAX_STAGES) return q_err_set(err, "more than %d pre-tokenizer stages", TOK_MAX_STAGES);
    tok_stage *st = &t->stages[t->n_stages];
    memset(st, 0, sizeof *st);
    st->prefix_space = prefix_space;
    st->behavior = behavior;
    st->invert = invert;
    if (pattern) {
        if (regex_compile(&st->re, pattern, n, literal, err)) return -1;
        st->split = true;
    }
    t->n_stages++;
    return 0;
}

static int stage_byte_level(tok_tokenizer *t, bool add_prefix_space, bool use_regex, q_err *err) {
    if (t->byte_level_stage >= 0) return q_err_set(err, "two ByteLevel pre-tokenizers");
    t->byte_level_stage = t->n_stages;
    return stage_add(t, use_regex ? GPT2_REGEX : NULL, use_regex ? strlen(GPT2_REGEX) : 0, false, SPLIT_ISOLATED,
                     false, add_prefix_space, err);
}

static int stage_digits(tok_tokenizer *t, bool individual, q_err *err) {
    // HF: split on char::is_numeric (Nd, Nl, No = \p{N}), each digit alone or runs together
    const char *p = individual ? "\\p{N}" : "\\p{N}+";
    return stage_add(t, p, strlen(p), false, SPLIT_ISOLATED, false, false, err);
}

// After loading: the tries, single-byte ids and which entries BPE leaves whole.
static int tok_finish(tok_tokenizer *t, q_err *err) {
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        t->byte_id[b] = smap_get(&t->by_bytes, &c, 1);
    }
    bool single_word = false;
    for (int i = 0; i < t->n_added; i++) {
        tok_added *a = &t->added[i];
        if (!a->len) continue;  // HF ignores empty added tokens
        if (a->normalized && t->nfc) {  // matched against normalized text, so normalize it too
            char *nf;
            size_t nn;
            if (nfc_apply(a->content, a->len, &nf, &nn, err)) return -1;
            if (nf) {  // HF decodes such a token as its normalized content too
                tok_entry *e = &t->tokens[a->id];
                char *c = arena_dup(&t->strings, nf, nn), *b = arena_dup(&t->strings, NULL, nn);
                free(nf);
                if (!c || !b) return q_err_set(err, "out of memory");
                size_t nb;
                if (!byte_level_decode(c, nn, b, &nb)) memcpy(b, c, nb = nn);
                a->content = c;
                a->len = (uint32_t)nn;
                e->bytes = b;
                e->n_bytes = (uint32_t)nb;
            }
        }
        if (trie_add(a->normalized ? &t->trie_norm : &t->trie_raw, a->content, a->len, i))
            return q_err_set(err, "out of memory");
        single_word |= a->single_word;
    }
    if (single_word) {
        // Rust regex \w: alphabetic, marks, decimal digits, connector punctuation, joiners
        static const char w[] = "[\\p{L}\\p{Nl}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]";
        if (regex_compile(&t->word_re, w, strlen(w), false, err)) return -1;
    }
    if (!t->ignore_merges) {  // entries whose own bytes merge back to themselves skip BPE
        workspace w = {0};
        for (int64_t id = 0; id < t->n_vocab; id++) {
            tok_entry *e = &t->tokens[id];
            if (!e->text || smap_get(&t->by_bytes, e->bytes, e->n_bytes) != id) continue;
            w.n_out = 0;
            if (bpe_merge(t, &w, (const uint8_t *)e->bytes, e->n_bytes)) {
                ws_free(&w);
                return q_err_set(err, "out of memory");
            }
            if (w.n_out == 1 && w.out[0] == id) e->flags |= TOKEN_WHOLE;
        }
        ws_free(&w);
    }
    return 0;
}

// EOS by the fallback rule (see the top of the file).
static void eos_fallback(tok_tokenizer *t) {
    static const char *names[] = {"<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>"};
    for (size_t i = 0; i < sizeof names / sizeof *names && t->eos < 0; i++) t->eos = tok_token_id(t, names[i]);
}

// ----------------------------------------------------------------------------
// tokenizer.json

static const char *jstr(const q_json *o, const char *key) {
    const q_json *v = q_json_get(o, key);
    return v && v->type == Q_JSON_STRING ? v->string : NULL;
}

// A boolean field: def when absent or null; -1 when of another type.
static int jbool(const q_json *o, const char *key, bool def, bool *out, q_err *err) {
    const q_json *v = q_json_get(o, key);
    if (!v || v->type == Q_JSON_NULL) { *out = def; return 0; }
    if (v->type != Q_JSON_BOOL) return q_err_set(err, "\"%s\" must be true or false", key);
    *out = v->boolean;
    return 0;
}

static int json_pretokenizer(tok_tokenizer *t, const q_json *p, q_err *err) {
    if (!p || p->type == Q_JSON_NULL) return 0;
    const char *type = jstr(p, "type");
    if (p->type != Q_JSON_OBJECT || !type) return q_err_set(err, "pre_tokenizer: an object with a \"type\" expected");
    if (!strcmp(type, "Sequence")) {
        const q_json *list = q_json_get(p, "pretokenizers");
        if (!list || list->type != Q_JSON_ARRAY) return q_err_set(err, "pre_tokenizer Sequence: no \"pretokenizers\" list");
        for (size_t i = 0; i < list->count; i++)
            if (json_pretokenizer(t, &list->items[i], err)) return -1;
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        bool prefix = true, use_regex = true;
        if (jbool(p, "add_prefix_space", true, &prefix, err) || jbool(p, "use_regex", true, &use_regex, err))
            return q_err_wrap(err, "pre_tokenizer ByteLevel");
        return stage_byte_level(t, prefix, use_regex, err);
    }
    if (!strcmp(type, "Digits")) {
        bool individual = false;
        if (jbool(p, "individual_digits", false, &individual, err)) return q_err_wrap(err, "pre_tokenizer Digits");
        return stage_digits(t, individual, err);
    }
    if (!strcmp(type, "Split")) {
        const q_json *pat = q_json_get(p, "pattern");
        const q_json *re = pat ? q_json_get(pat, "Regex") : NULL, *lit = pat ? q_json_get(pat, "String") : NULL;
        const q_json *s = re ? re : lit;
        if (!s || s->type != Q_JSON_STRING)
            return q_err_set(err, "pre_tokenizer Split: \"pattern\" must be {\"Regex\": ...} or {\"String\": ...}");
        static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
        const char *beh = jstr(p, "behavior");
        int b = -1;
        for (int i = 0; i < 5 && beh; i++)
            if (!strcmp(beh, names[i])) b = i;
        if (b < 0) return q_err_set(err, "pre_tokenizer Split: unknown behavior \"%s\"", beh ? beh : "(none)");
        bool invert = false;
        if (jbool(p, "invert", false, &invert, err)) return q_err_wrap(err, "pre_tokenizer Split");
        if (stage_add(t, s->string, s->string_len, lit != NULL, (split_behavior)b, invert, false, err))
            return q_err_wrap(err, "pre_tokenizer Split");
        return 0;
    }
    return q_err_set(err, "unknown pre-tokenizer type \"%s\" (supported: Sequence, Split, ByteLevel, Digits)", type);
}

static int json_normalizer(tok_tokenizer *t, const q_json *n, q_err *err) {
    if (!n || n->type == Q_JSON_NULL) return 0;
    const char *type = jstr(n, "type");
    if (!type) return q_err_set(err, "normalizer: an object with a \"type\" expected");
    if (!strcmp(type, "NFC")) {
        t->nfc = true;
        return 0;
    }
    if (!strcmp(type, "Sequence")) {
        const q_json *list = q_json_get(n, "normalizers");
        if (!list || list->type != Q_JSON_ARRAY) return q_err_set(err, "normalizer Sequence: no \"normalizers\" list");
        for (size_t i = 0; i < list->count; i++)
            if (json_normalizer(t, &list->items[i], err)) return -1;
        return 0;
    }
    return q_err_set(err, "unsupported normalizer \"%s\" (supported: NFC)", type);
}

static int json_model(tok_tokenizer *t, const q_json *root, q_err *err) {
    const q_json *model = q_json_get(root, "model");
    if (!model || model->type != Q_JSON_OBJECT) return q_err_set(err, "no \"model\" object");
    const char *type = jstr(model, "type");
    if (type && strcmp(type, "BPE")) return q_err_set(err, "model type \"%s\" is not supported (only BPE)", type);
    const q_json *vocab = q_json_get(model, "vocab"), *merges = q_json_get(model, "merges");
    if (!vocab || vocab->type != Q_JSON_OBJECT) return q_err_set(err, "model: no \"vocab\" object");
    if (!merges || merges->type != Q_JSON_ARRAY) return q_err_set(err, "model: no \"merges\" list");
    bool byte_fallback = false;
    if (jbool(model, "ignore_merges", false, &t->ignore_merges, err) || jbool(model, "fuse_unk", false, &t->fuse_unk, err) ||
        jbool(model, "byte_fallback", false, &byte_fallback, err))
        return q_err_wrap(err, "model");
    if (byte_fallback) return q_err_set(err, "model: byte_fallback is not supported (SentencePiece-style BPE)");
    const char *prefix = jstr(model, "continuing_subword_prefix"), *suffix = jstr(model, "end_of_word_suffix");
    if ((prefix && *prefix) || (suffix && *suffix))
        return q_err_set(err, "model: continuing_subword_prefix / end_of_word_suffix are not supported");
    const q_json *dropout = q_json_get(model, "dropout");
    if (dropout && dropout->type == Q_JSON_NUMBER && dropout->number != 0)
        return q_err_set(err, "model: BPE dropout is not supported");

    // ids: the vocabulary and the added tokens share one id space
    int64_t max_id = -1;
    for (size_t i = 0; i < vocab->count; i++) {
        const q_json *v = &vocab->items[i];
        if (v->type != Q_JSON_NUMBER || !v->is_int || v->integer < 0 || v->integer >= TOK_MAX_VOCAB)
            return q_err_set(err, "model.vocab: \"%s\" needs an integer id in [0, %d)", vocab->keys[i], TOK_MAX_VOCAB);
        if (v->integer > max_id) max_id = v->integer;
    }
    const q_json *added = q_json_get(root, "added_tokens");
    if (added && added->type != Q_JSON_ARRAY && added->type != Q_JSON_NULL)
        return q_err_set(err, "\"added_tokens\" must be a list");
    for (size_t i = 0; added && added->type == Q_JSON_ARRAY && i < added->count; i++) {
        const q_json *id = q_json_get(&added->items[i], "id");
        if (!id || id->type != Q_JSON_NUMBER || !id->is_int || id->integer < 0 || id->integer >= TOK_MAX_VOCAB)
            return q_err_set(err, "added_tokens[%zu]: needs an integer \"id\" in [0, %d)", i, TOK_MAX_VOCAB);
        if (id->integer > max_id) max_id = id->integer;
    }
    if (vocab_alloc(t, max_id + 1, vocab->count, merges->count, err)) return -1;
    for (size_t i = 0; i < vocab->count; i++) {
        // q_json keeps the key's decoded bytes; keys cannot hold NUL here (the parser's keys are C strings)
        if (vocab_set(t, vocab->items[i].integer, vocab->keys[i], strlen(vocab->keys[i]), false, err))
            return q_err_wrap(err, "model.vocab");
    }

    char *tmp = NULL;
    size_t tmp_cap = 0;
    for (size_t i = 0; i < merges->count; i++) {
        const q_json *m = &merges->items[i];
        const char *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        if (m->type == Q_JSON_STRING) {  // "a b" (older files)
            const char *sp = memchr(m->string, ' ', m->string_len);
            if (sp && !memchr(sp + 1, ' ', m->string_len - (size_t)(sp + 1 - m->string))) {
                a = m->string;
                na = (size_t)(sp - m->string);
                b = sp + 1;
                nb = m->string_len - na - 1;
            }
        } else if (m->type == Q_JSON_ARRAY && m->count == 2 && m->items[0].type == Q_JSON_STRING &&
                   m->items[1].type == Q_JSON_STRING) {  // ["a", "b"] (newer files)
            a = m->items[0].string;
            na = m->items[0].string_len;
            b = m->items[1].string;
            nb = m->items[1].string_len;
        }
        if (!a) {
            free(tmp);
            return q_err_set(err, "model.merges[%zu]: expected \"a b\" or [\"a\", \"b\"]", i);
        }
        if (merge_add(t, a, na, b, nb, (uint32_t)i, &tmp, &tmp_cap, err)) {
            free(tmp);
            return q_err_wrap(err, "model.merges");
        }
    }
    free(tmp);

    const char *unk = jstr(model, "unk_token");
    if (unk && (t->unk_id = smap_get(&t->by_text, unk, strlen(unk))) < 0)
        return q_err_set(err, "model: unk_token \"%s\" is not in the vocabulary", unk);

    for (size_t i = 0; added && added->type == Q_JSON_ARRAY && i < added->count; i++) {
        const q_json *a = &added->items[i], *content = q_json_get(a, "content");
        if (!content || content->type != Q_JSON_STRING)
            return q_err_set(err, "added_tokens[%zu]: needs a string \"content\"", i);
        tok_added x = {content->string, (uint32_t)content->string_len, (int32_t)q_json_get(a, "id")->integer,
                       false, false, false, false, false};
        if (jbool(a, "special", false, &x.special, err) || jbool(a, "lstrip", false, &x.lstrip, err) ||
            jbool(a, "rstrip", false, &x.rstrip, err) || jbool(a, "single_word", false, &x.single_word, err) ||
            jbool(a, "normalized", !x.special, &x.normalized, err) || added_add(t, x, err))
            return q_err_wrap(err, "added_tokens[%zu]", i);
    }
    return 0;
}

// The leading special token of a TemplateProcessing (maybe inside a Sequence).
static int json_template_bos(tok_tokenizer *t, const q_json *pp, q_err *err) {
    const char *type = pp ? jstr(pp, "type") : NULL;
    if (!type) return 0;
    if (!strcmp(type, "Sequence")) {
        const q_json *list = q_json_get(pp, "processors");
        for (size_t i = 0; list && list->type == Q_JSON_ARRAY && i < list->count; i++)
            if (json_template_bos(t, &list->items[i], err)) return -1;
        return 0;
    }
    if (strcmp(type, "TemplateProcessing")) return 0;
    const q_json *single = q_json_get(pp, "single");
    const q_json *first = single && single->type == Q_JSON_ARRAY && single->count ? &single->items[0] : NULL;
    const q_json *sp = first ? q_json_get(first, "SpecialToken") : NULL;
    const char *name = sp ? jstr(sp, "id") : NULL;
    if (!name) return 0;
    const q_json *st = q_json_get(q_json_get(pp, "special_tokens"), name);
    const q_json *ids = st ? q_json_get(st, "ids") : NULL;
    if (!ids || ids->type != Q_JSON_ARRAY || ids->count != 1 || ids->items[0].type != Q_JSON_NUMBER ||
        !ids->items[0].is_int || ids->items[0].integer < 0 || ids->items[0].integer >= t->n_vocab)
        return q_err_set(err, "post_processor: special token \"%s\" needs one valid id", name);
    t->bos = (int32_t)ids->items[0].integer;
    t->add_bos = true;
    return 0;
}

// A token field of tokenizer_config.json: a string or {"content": ...}; -1 = null/absent.
static int config_token(const tok_tokenizer *t, const q_json *cfg, const char *key, int32_t *id, bool *present,
                        q_err *err) {
    const q_json *v = q_json_get(cfg, key);
    *present = v && v->type != Q_JSON_NULL;
    if (!*present) return 0;
    const char *s = v->type == Q_JSON_STRING ? v->string : jstr(v, "content");
    if (!s) return q_err_set(err, "\"%s\" must be a string or {\"content\": ...}", key);
    if ((*id = tok_token_id(t, s)) < 0) return q_err_set(err, "%s \"%s\" is not in the vocabulary", key, s);
    return 0;
}

static int json_config(tok_tokenizer *t, const char *path, q_err *err) {
    const char *slash = strrchr(path, '/');
    char cpath[4096];
    snprintf(cpath, sizeof cpath, "%.*stokenizer_config.json", slash ? (int)(slash - path + 1) : 0, path);
    if (!q_path_exists(cpath)) return 0;
    char *text;
    size_t size;
    q_json *cfg = NULL;
    if (q_file_read(cpath, &text, &size, err)) return -1;
    int rc = q_json_parse(text, size, &cfg, err);
    free(text);
    if (!rc && cfg->type != Q_JSON_OBJECT) rc = q_err_set(err, "not a JSON object");
    int32_t id = -1;
    bool present = false, add_bos = false;
    if (!rc) rc = config_token(t, cfg, "eos_token", &id, &present, err);
    if (!rc && present) t->eos = id;
    if (!rc && t->bos < 0) {
        rc = config_token(t, cfg, "bos_token", &id, &present, err);
        if (!rc && present) t->bos = id;
        if (!rc) rc = jbool(cfg, "add_bos_token", false, &add_bos, err);
        if (!rc) t->add_bos = add_bos && t->bos >= 0;
    }
    q_json_free(cfg);
    return rc ? q_err_wrap(err, "%s", cpath) : 0;
}

static int json_build(tok_tokenizer *t, const q_json *root, const char *path, q_err *err) {
    if (root->type != Q_JSON_OBJECT) return q_err_set(err, "not a JSON object");
    if (json_model(t, root, err) || json_normalizer(t, q_json_get(root, "normalizer"), err) ||
        json_pretokenizer(t, q_json_get(root, "pre_tokenizer"), err))
        return -1;
    // ByteLevel turns pieces into byte-alphabet strings; it must come last, since
    // we merge raw bytes and no later stage could see that spelling
    if (t->byte_level_stage < 0)
        return q_err_set(err, "no ByteLevel pre-tokenizer: only byte-level BPE is supported");
    if (t->byte_level_stage != t->n_stages - 1)
        return q_err_set(err, "pre_tokenizer: ByteLevel must be the last stage");
    const q_json *dec = q_json_get(root, "decoder");
    const char *dtype = dec ? jstr(dec, "type") : NULL;
    if (!dtype || strcmp(dtype, "ByteLevel"))
        return q_err_set(err, "decoder \"%s\" is not supported (only ByteLevel)", dtype ? dtype : "null");
    if (json_template_bos(t, q_json_get(root, "post_processor"), err) || tok_finish(t, err) ||
        json_config(t, path, err))
        return -1;
    if (t->eos < 0) eos_fallback(t);
    return 0;
}

int tok_load_json(tok_tokenizer **out, const char *path, q_err *err) {
    *out = NULL;
    char *text;
    size_t size;
    if (q_file_read(path, &text, &size, err)) return -1;
    q_json *root = NULL;
    int rc = q_json_parse(text, size, &root, err);
    free(text);
    if (rc) return q_err_wrap(err, "%s", path);
    tok_tokenizer *t = tok_new();
    if (!t) {
        q_json_free(root);
        return q_err_set(err, "%s: out of memory", path);
    }
    rc = json_build(t, root, path, err);
    q_json_free(root);
    if (rc) {
        tok_free(t);
        return q_err_wrap(err, "%s", path);
    }
    *out = t;
    return 0;
}

// ----------------------------------------------------------------------------
// GGUF (tokenizer.ggml.*, as llama.cpp writes them; docs: gguf.md 3.5)

typedef enum gguf_pre { PRE_GPT2, PRE_SMOLLM, PRE_LLAMA3, PRE_QWEN2 } gguf_pre;

static const struct {
    const char *name;
    gguf_pre pre;
} gguf_pres[] = {{"gpt2", PRE_GPT2},        {"smollm", PRE_SMOLLM},      {"llama-bpe", PRE_LLAMA3},
                 {"llama3", PRE_LLAMA3},    {"llama-v3", PRE_LLAMA3},    {"qwen2", PRE_QWEN2},
                 {"deepseek-r1-qwen", PRE_QWEN2}};

static int gguf_array(const q_gguf *g, const char *key, q_gguf_type elem, bool required, const q_gguf_kv **kv,
                      q_err *err) {
    *kv = q_gguf_find_kv(g, key);
    if (!*kv) return required ? q_err_set(err, "missing %s", key) : 0;
    if ((*kv)->type != Q_GGUF_ARRAY || (*kv)->elem_type != elem)
        return q_err_set(err, "%s: expected an array of %s", key, elem == Q_GGUF_STRING ? "strings" : "int32");
    return 0;
}

// An optional token id key: -1 when absent.
static int gguf_token_id(const q_gguf *g, const tok_tokenizer *t, const char *key, int32_t *id, q_err *err) {
    *id = -1;
    if (!q_gguf_find_kv(g, key)) return 0;
    int64_t v;
    if (q_gguf_get_int(g, key, &v, err)) return -1;
    if (v < 0 || v >= t->n_vocab) return q_err_set(err, "%s = %lld is outside the vocabulary", key, (long long)v);
    *id = (int32_t)v;
    return 0;
}

static int gguf_build(tok_tokenizer *t, const q_gguf *g, q_err *err) {
    const char *s;
    size_t n;
    if (q_gguf_get_string(g, "tokenizer.ggml.model", &s, &n, err)) return -1;
    if (n == 5 && !memcmp(s, "llama", 5))
        return q_err_set(err, "tokenizer.ggml.model \"llama\" (SentencePiece) is not supported yet: only \"gpt2\" "
                              "(byte-level BPE)");
    if (n != 4 || memcmp(s, "gpt2", 4))
        return q_err_set(err, "tokenizer.ggml.model \"%.*s\" is not supported: only \"gpt2\" (byte-level BPE)",
                         (int)(n > 64 ? 64 : n), s);
    if (!q_gguf_find_kv(g, "tokenizer.ggml.pre"))
        return q_err_set(err, "missing tokenizer.ggml.pre: cannot tell which pre-tokenizer the vocabulary needs");
    if (q_gguf_get_string(g, "tokenizer.ggml.pre", &s, &n, err)) return -1;
    int pre = -1;
    for (size_t i = 0; i < sizeof gguf_pres / sizeof *gguf_pres; i++)
        if (strlen(gguf_pres[i].name) == n && !memcmp(gguf_pres[i].name, s, n)) pre = (int)gguf_pres[i].pre;
    if (pre < 0)
        return q_err_set(err, "unknown tokenizer.ggml.pre \"%.*s\" (supported: gpt2, smollm, llama-bpe, qwen2)",
                         (int)(n > 64 ? 64 : n), s);

    const q_gguf_kv *tokens, *merges, *types;
    if (gguf_array(g, "tokenizer.ggml.tokens", Q_GGUF_STRING, true, &tokens, err) ||
        gguf_array(g, "tokenizer.ggml.merges", Q_GGUF_STRING, true, &merges, err) ||
        gguf_array(g, "tokenizer.ggml.token_type", Q_GGUF_I32, false, &types, err))
        return -1;
    if (!tokens->count || tokens->count > TOK_MAX_VOCAB)
        return q_err_set(err, "tokenizer.ggml.tokens: %llu tokens", (unsigned long long)tokens->count);
    if (types && types->count != tokens->count)
        return q_err_set(err, "tokenizer.ggml.token_type has %llu entries for %llu tokens",
                         (unsigned long long)types->count, (unsigned long long)tokens->count);
    if (vocab_alloc(t, (int64_t)tokens->count, tokens->count, merges->count, err)) return -1;

    q_gguf_string_iter it;
    q_gguf_string_iter_init(&it, tokens);
    for (int64_t id = 0; id < t->n_vocab; id++) {
        if (!q_gguf_string_iter_next(&it, &s, &n)) return q_err_set(err, "tokenizer.ggml.tokens: truncated");
        if (vocab_set(t, id, s, n, true, err)) return q_err_wrap(err, "tokenizer.ggml.tokens");
    }
    char *tmp = NULL;
    size_t tmp_cap = 0;
    q_gguf_string_iter_init(&it, merges);
    for (uint64_t i = 0; i < merges->count; i++) {
        const char *sp = NULL;
        if (!q_gguf_string_iter_next(&it, &s, &n)) {
            free(tmp);
            return q_err_set(err, "tokenizer.ggml.merges: truncated");
        }
        sp = memchr(s, ' ', n);
        if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp + 1 - s))) {
            free(tmp);
            return q_err_set(err, "tokenizer.ggml.merges[%llu]: expected \"a b\"", (unsigned long long)i);
        }
        if (merge_add(t, s, (size_t)(sp - s), sp + 1, n - (size_t)(sp - s) - 1, (uint32_t)i, &tmp, &tmp_cap, err)) {
            free(tmp);
            return q_err_wrap(err, "tokenizer.ggml.merges");
        }
    }
    free(tmp);

    // control (3) tokens are special added tokens, user-defined (4) plain added
    // ones, as transformers' GGUF loader adds them; a control token spelled
    // outside the byte alphabet is a llama.cpp mislabel it skips, and so do we
    for (int64_t id = 0; types && id < t->n_vocab; id++) {
        int32_t ty;
        memcpy(&ty, types->data + 4 * id, 4);
        const tok_entry *e = &t->tokens[id];
        if ((ty != 3 && ty != 4) || smap_get(&t->by_text, e->text, e->text_len) != id) continue;
        char *tmpb = malloc(e->text_len + 1);
        size_t nb;
        bool in_alphabet = tmpb && byte_level_decode(e->text, e->text_len, tmpb, &nb);
        free(tmpb);
        if (!in_alphabet) continue;
        tok_added a = {e->text, e->text_len, (int32_t)id, ty == 3, false, false, false, false};
        if (added_add(t, a, err)) return q_err_wrap(err, "tokenizer.ggml.tokens");
    }

    bool add_bos = pre == PRE_LLAMA3;
    int rc = 0;
    switch ((gguf_pre)pre) {
    case PRE_GPT2: rc = stage_byte_level(t, false, true, err); break;
    case PRE_SMOLLM: rc = stage_digits(t, true, err) || stage_byte_level(t, false, true, err); break;
    case PRE_LLAMA3:
        t->ignore_merges = true;
        rc = stage_add(t, LLAMA3_REGEX, strlen(LLAMA3_REGEX), false, SPLIT_ISOLATED, false, false, err) ||
             stage_byte_level(t, false, false, err);
        break;
    case PRE_QWEN2:  // HF's Qwen2 tokenizer normalizes to NFC; llama.cpp does not
        t->nfc = true;
        rc = stage_add(t, QWEN2_REGEX, strlen(QWEN2_REGEX), false, SPLIT_ISOLATED, false, false, err) ||
             stage_byte_level(t, false, false, err);
        break;
    }
    if (rc || gguf_token_id(g, t, "tokenizer.ggml.bos_token_id", &t->bos, err) ||
        gguf_token_id(g, t, "tokenizer.ggml.eos_token_id", &t->eos, err))
        return -1;
    if (q_gguf_find_kv(g, "tokenizer.ggml.add_bos_token") &&
        q_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos, err))
        return -1;
    t->add_bos = add_bos && t->bos >= 0;
    return tok_finish(t, err);
}

int tok_load_gguf(tok_tokenizer **out, const q_gguf *g, q_err *err) {
    *out = NULL;
    tok_tokenizer *t = tok_new();
    if (!t) return q_err_set(err, "%s: out of memory", g->path);
    if (gguf_build(t, g, err)) {
        tok_free(t);
        return q_err_wrap(err, "%s", g->path);
    }
    *out = t;
    return 0;
}

// ----------------------------------------------------------------------------
// encode

typedef struct enc {
    const tok_tokenizer *t;
    workspace *w;
    bool allow_special;
    q_err *err;
} enc;

typedef struct span {
    size_t start, end;
    bool match;
} span;

// The next match as Oniguruma's find_iter yields it (the iterator HF uses):
// an empty match right where the previous match ended is skipped by one character.
typedef struct match_iter {
    size_t pos, last_end;
    bool any;
} match_iter;

static int match_next(enc *e, const tok_regex *re, const char *s, size_t n, match_iter *it, size_t *ms, size_t *me) {
    while (it->pos <= n) {
        int r = regex_search(re, e->w->md, s, n, it->pos, ms, me, e->err);
        if (r <= 0) return r;
        if (*ms == *me && it->any && it->last_end == *me) {
            uint32_t cp;
            it->pos += it->pos < n ? utf8_decode((const uint8_t *)s + it->pos, n - it->pos, &cp) : 1;
            continue;
        }
        it->pos = it->last_end = *me;
        it->any = true;
        return 1;
    }
    return 0;
}

static int pretok_run(enc *e, int stage, const char *s, size_t n);

// One Split stage over s[0..n): HF's NormalizedString::split with a regex.
static int split_run(enc *e, int stage, const char *s, size_t n) {
    const tok_stage *st = &e->t->stages[stage];
    match_iter it = {0};
    size_t prev = 0, ms, me;
    int r;
    if (st->behavior == SPLIT_ISOLATED) {  // the common case, streamed: every gap and match is a piece
        while ((r = match_next(e, &st->re, s, n, &it, &ms, &me)) > 0) {
            if (pretok_run(e, stage + 1, s + prev, ms - prev) || pretok_run(e, stage + 1, s + ms, me - ms)) return -1;
            prev = me;
        }
        return r < 0 ? -1 : pretok_run(e, stage + 1, s + prev, n - prev);
    }
    span *sp = NULL;
    size_t ns = 0, cap = 0;
    for (;;) {  // spans covering s, matches flagged (inverted when asked)
        r = match_next(e, &st->re, s, n, &it, &ms, &me);
        if (r < 0) goto fail;
        size_t m_start = r ? ms : n, m_end = r ? me : n;
        for (int k = 0; k < 2; k++) {
            span x = k == 0 ? (span){prev, m_start, st->invert} : (span){m_start, m_end, !st->invert};
            if (k == 0 && prev == m_start) continue;
            if (k == 1 && !r) break;
            if (ns == cap) {
                cap = cap ? 2 * cap : 16;
                span *p = realloc(sp, cap * sizeof *p);
                if (!p) {
                    q_err_set(e->err, "out of memory");
                    goto fail;
                }
                sp = p;
            }
            sp[ns++] = x;
        }
        if (!r) break;
        prev = me;
    }
    // the delimiter behaviors, as HF folds the spans
    size_t k = 0;
    bool prev_match = false;
    if (st->behavior == SPLIT_MERGED_WITH_NEXT) {
        for (size_t i = ns; i-- > 0;) {
            span x = sp[i];
            if (x.match && !prev_match && k) sp[ns - k].start = x.start;  // joins the piece after it
            else sp[ns - 1 - k++] = (span){x.start, x.end, false};
            prev_match = x.match;
        }
        memmove(sp, sp + ns - k, k * sizeof *sp);
    } else {
        for (size_t i = 0; i < ns; i++) {
            span x = sp[i];
            bool join = st->behavior == SPLIT_CONTIGUOUS ? x.match == prev_match
                      : st->behavior == SPLIT_MERGED_WITH_PREVIOUS ? x.match && !prev_match : false;
            if (join && k) sp[k - 1].end = x.end;
            else sp[k++] = (span){x.start, x.end, st->behavior == SPLIT_REMOVED && x.match};
            prev_match = x.match;
        }
    }
    for (size_t i = 0; i < k; i++)
        if (!sp[i].match && pretok_run(e, stage + 1, s + sp[i].start, sp[i].end - sp[i].start)) goto fail;
    free(sp);
    return 0;
fail:
    free(sp);
    return -1;
}

static int stage_run(enc *e, int stage, const char *s, size_t n) {
    return e->t->stages[stage].split ? split_run(e, stage, s, n) : pretok_run(e, stage + 1, s, n);
}

// Pre-tokenizer stage `stage` onwards over one piece, then BPE.
static int pretok_run(enc *e, int stage, const char *s, size_t n) {
    if (!n) return 0;  // HF drops empty pieces
    const tok_tokenizer *t = e->t;
    if (stage == t->n_stages)
        return bpe_piece(t, e->w, s, n) ? q_err_set(e->err, "out of memory") : 0;
    if (t->stages[stage].prefix_space && s[0] != ' ') {  // ByteLevel add_prefix_space, on every piece as HF
        char *p = malloc(n + 1);
        if (!p) return q_err_set(e->err, "out of memory");
        p[0] = ' ';
        memcpy(p + 1, s, n);
        int rc = stage_run(e, stage, p, n + 1);
        free(p);
        return rc;
    }
    return stage_run(e, stage, s, n);
}

static bool word_char_at(const enc *e, const char *s, size_t n) {
    uint32_t cp;
    size_t l = utf8_decode((const uint8_t *)s, n, &cp);
    return pcre2_match(e->t->word_re.code, (PCRE2_SPTR)s, l, 0, PCRE2_NO_UTF_CHECK, e->w->md, NULL) >= 0;
}

typedef int (*text_fn)(enc *e, const char *s, size_t n);

// Cuts the added tokens of `tr` out of s[0..n) as HF's AddedVocabulary::find_matches
// does and hands the text between them to `text`.
static int added_split(enc *e, const tok_trie *tr, const char *s, size_t n, text_fn text) {
    const tok_tokenizer *t = e->t;
    size_t start_offset = 0, from = 0, ms, me;
    int k;
    while (from < n && (k = trie_find(tr, s, n, from, &ms, &me)) >= 0) {
        from = me;  // matching resumes after this one even when it is discarded
        const tok_added *a = &t->added[k];
        if (a->special && !e->allow_special) continue;  // spelled out as text
        if (a->single_word) {  // no word character may touch it on either side
            size_t b = ms ? ms - 1 : 0;
            while (b > 0 && ((uint8_t)s[b] & 0xC0) == 0x80) b--;
            if ((ms > 0 && word_char_at(e, s + b, ms - b)) || (me < n && word_char_at(e, s + me, n - me))) continue;
        }
        size_t start = ms, stop = me;
        if (a->lstrip) {  // swallow the white space before it (not what an earlier match took)
            size_t p = ms;
            while (p > start_offset) {
                size_t q = p - 1;
                while (q > 0 && ((uint8_t)s[q] & 0xC0) == 0x80) q--;
                uint32_t cp;
                utf8_decode((const uint8_t *)s + q, p - q, &cp);
                if (!is_white_space(cp)) break;
                p = q;
            }
            start = p;
        }
        if (a->rstrip) {
            while (stop < n) {
                uint32_t cp;
                size_t l = utf8_decode((const uint8_t *)s + stop, n - stop, &cp);
                if (!is_white_space(cp)) break;
                stop += l;
            }
        }
        if (start_offset < start && text(e, s + start_offset, start - start_offset)) return -1;
        if (out_push(e->w, a->id)) return q_err_set(e->err, "out of memory");
        start_offset = stop;
    }
    return start_offset < n ? text(e, s + start_offset, n - start_offset) : 0;
}

static int text_pretok(enc *e, const char *s, size_t n) { return pretok_run(e, 0, s, n); }

static int text_normalize(enc *e, const char *s, size_t n) {
    char *nf = NULL;
    size_t nn = n;
    if (e->t->nfc && nfc_apply(s, n, &nf, &nn, e->err)) return -1;
    int rc = added_split(e, &e->t->trie_norm, nf ? nf : s, nn, text_pretok);
    free(nf);
    return rc;
}

static int encode_ws(const tok_tokenizer *t, workspace *w, const char *text, size_t len, bool allow_special,
                     q_err *err) {
    size_t bad = utf8_check((const uint8_t *)text, len);
    if (bad != len) return q_err_set(err, "tok_encode: the text is not valid UTF-8 (byte %zu)", bad);
    if (!w->md && !(w->md = pcre2_match_data_create(1, NULL))) return q_err_set(err, "out of memory");
    enc e = {t, w, allow_special, err};
    return added_split(&e, &t->trie_raw, text, len, text_normalize);
}

int tok_encode(const tok_tokenizer *t, const char *text, size_t len, bool allow_special, int32_t **ids, int64_t *n,
               q_err *err) {
    *ids = NULL;
    *n = 0;
    workspace w = {0};
    if (encode_ws(t, &w, text, len, allow_special, err)) {
        ws_free(&w);
        return -1;
    }
    *ids = w.out ? w.out : malloc(sizeof **ids);  // never NULL on success
    *n = w.n_out;
    w.out = NULL;
    ws_free(&w);
    return *ids ? 0 : q_err_set(err, "out of memory");
}

// ----------------------------------------------------------------------------
// decode

// Bytes of the invalid sequence at s that Rust's from_utf8_lossy replaces
// with one U+FFFD: the longest prefix of a well-formed sequence, at least 1.
static size_t utf8_invalid_len(const uint8_t *s, size_t n) {
    uint8_t b = s[0];
    size_t len = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (!len || n < 2) return 1;
    uint8_t lo = 0x80, hi = 0xBF;
    if (b == 0xE0) lo = 0xA0;
    else if (b == 0xED) hi = 0x9F;
    else if (b == 0xF0) lo = 0x90;
    else if (b == 0xF4) hi = 0x8F;
    if (s[1] < lo || s[1] > hi) return 1;
    size_t k = 2;
    while (k < len && k < n && (s[k] & 0xC0) == 0x80) k++;
    return k;
}

int tok_decode(const tok_tokenizer *t, const int32_t *ids, int64_t n, char **text, size_t *len, q_err *err) {
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab || !t->tokens[ids[i]].text)
            return q_err_set(err, "tok_decode: id %d (position %lld) is not a token of this vocabulary (size %lld)",
                             ids[i], (long long)i, (long long)t->n_vocab);
        total += t->tokens[ids[i]].n_bytes;
    }
    uint8_t *raw = malloc(total + 1);
    char *out = malloc(3 * total + 1);  // every invalid byte may become a 3-byte U+FFFD
    if (!raw || !out) {
        free(raw);
        free(out);
        return q_err_set(err, "tok_decode: out of memory");
    }
    size_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const tok_entry *e = &t->tokens[ids[i]];
        memcpy(raw + k, e->bytes, e->n_bytes);
        k += e->n_bytes;
    }
    size_t o = 0;
    for (size_t i = 0; i < total;) {
        size_t l = raw[i] < 0x80 ? 1 : utf8_valid_len(raw + i, total - i);
        if (l) {
            memcpy(out + o, raw + i, l);
            o += l;
            i += l;
        } else {
            o += utf8_encode(0xFFFD, out + o);
            i += utf8_invalid_len(raw + i, total - i);
        }
    }
    out[o] = 0;
    free(raw);
    *text = out;
    *len = o;
    return 0;
}

// ----------------------------------------------------------------------------
// lookups

int64_t tok_vocab_size(const tok_tokenizer *t) { return t->n_vocab; }

int32_t tok_token_id(const tok_tokenizer *t, const char *token) {
    size_t n = strlen(token);
    for (int i = 0; i < t->n_added; i++) {  // added tokens first, as HF's token_to_id
        const tok_entry *e = &t->tokens[t->added[i].id];
        if (e->text_len == n && !memcmp(e->text, token, n)) return t->added[i].id;
    }
    return smap_get(&t->by_text, token, n);
}

int32_t tok_bos_id(const tok_tokenizer *t) { return t->bos; }
int32_t tok_eos_id(const tok_tokenizer *t) { return t->eos; }
bool tok_adds_bos(const tok_tokenizer *t) { return t->add_bos; }
