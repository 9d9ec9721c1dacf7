// data/dataset.c: JSONL datasets, prompt templates, prompt masking, packing
// and deterministic batches (the contract is in data.h).
//
// An example is rendered as a sequence of pieces: special tokens of the
// template (inserted by id, so they exist only where the template puts them)
// and text runs. A text run is template text and user content together,
// encoded as one string with allow_special=false, exactly as HF tokenizes
// the rendered template between its special tokens: content can never
// inject a control token, and ids match HF's apply_chat_template + encode.
// A run whose head is prompt and whose tail is response ("assistant\n" +
// answer) is split for masking at the longest common prefix of
// encode(head) and encode(head + tail): a token straddling the boundary
// carries response text, so it is a target.
//
// Templates (HF's renderings; the first line shows what a system prompt adds):
//   chatml   <|im_start|>system\n{sys}<|im_end|>\n
//            <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n
//            (SmolLM2's template also inserts a default system prompt when none is
//            given; here there is none unless data.system_prompt says so)
//   llama3   <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{sys}<|eot_id|>
//            <|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>
//            <|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>
//            (contents trimmed of surrounding whitespace, as Llama 3's template does)
//   alpaca   the Stanford Alpaca prompt (with or without "### Input:"), then {response}
//   plain    {prompt}\n{response}
// BOS first when the tokenizer adds one (tok_adds_bos); EOS after the last
// response when it differs from the template's end-of-turn token. Targets:
// each response, its end-of-turn token and that EOS; with train_on_inputs,
// every token.
#define _GNU_SOURCE
#include "data.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>

// ----------------------------------------------------------------------------
// names

static const char *const format_names[] = {"alpaca", "chat", "completion", "text"};
static const char *const template_names[] = {"chatml", "llama3", "alpaca", "plain"};
#define N_FORMATS ((int)(sizeof format_names / sizeof format_names[0]))
#define N_TEMPLATES ((int)(sizeof template_names / sizeof template_names[0]))

int data_format_from_name(const char *name, data_format *out, q_err *err) {
    for (int i = 0; i < N_FORMATS; i++)
        if (strcmp(name, format_names[i]) == 0) return *out = (data_format)i, 0;
    return q_err_set(err, "unknown data format '%.100s' (use alpaca, chat, completion or text)", name);
}

int data_template_from_name(const char *name, data_template *out, q_err *err) {
    for (int i = 0; i < N_TEMPLATES; i++)
        if (strcmp(name, template_names[i]) == 0) return *out = (data_template)i, 0;
    return q_err_set(err, "unknown template '%.100s' (use chatml, llama3, alpaca or plain)", name);
}

const char *data_format_name(data_format f) {
    return (int)f >= 0 && (int)f < N_FORMATS ? format_names[f] : "?";
}

const char *data_template_name(data_template t) {
    return (int)t >= 0 && (int)t < N_TEMPLATES ? template_names[t] : "?";
}

// ----------------------------------------------------------------------------
// seeded randomness: splitmix64, unbiased bounded draws, Fisher-Yates

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Uniform in [0, n), n > 0 (Lemire's multiply-shift with rejection).
static uint64_t rand_below(uint64_t *s, uint64_t n) {
    __uint128_t m = (__uint128_t)splitmix64(s) * n;
    uint64_t lo = (uint64_t)m;
    if (lo < n) {
        const uint64_t threshold = -n % n;
        while (lo < threshold) {
            m = (__uint128_t)splitmix64(s) * n;
            lo = (uint64_t)m;
        }
    }
    return (uint64_t)(m >> 64);
}

// order = a permutation of 0..n-1 drawn from seed alone.
static void shuffle_identity(int64_t *order, int64_t n, uint64_t seed) {
    uint64_t s = seed;
    for (int64_t i = 0; i < n; i++) order[i] = i;
    for (int64_t i = n - 1; i > 0; i--) {
        const int64_t j = (int64_t)rand_below(&s, (uint64_t)i + 1);
        const int64_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

// ----------------------------------------------------------------------------
// building one example: ids and target flags, appended piece by piece

typedef struct builder {
    const tok_tokenizer *tok;
    int32_t *ids;     // [cap]
    uint8_t *target;  // [cap]
    int64_t n, cap;
} builder;

static int b_reserve(builder *b, int64_t more, q_err *err) {
    if (b->n + more <= b->cap) return 0;
    int64_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + more) cap *= 2;
    int32_t *ids = realloc(b->ids, (size_t)cap * sizeof *ids);
    if (!ids) return q_err_set(err, "out of memory");
    b->ids = ids;
    uint8_t *tg = realloc(b->target, (size_t)cap);
    if (!tg) return q_err_set(err, "out of memory");
    b->target = tg;
    b->cap = cap;
    return 0;
}

static int b_push(builder *b, int32_t id, bool target, q_err *err) {
    if (b_reserve(b, 1, err)) return -1;
    b->ids[b->n] = id;
    b->target[b->n++] = target;
    return 0;
}

// A special token of the template, by name.
static int b_special(builder *b, const char *name, bool target, q_err *err) {
    const int32_t id = tok_token_id(b->tok, name);
    if (id < 0) return q_err_set(err, "the tokenizer has no %s token", name);
    return b_push(b, id, target, err);
}

// One text run: head (template text and prompt content) then tail
// (response content), encoded together; see the top of the file.
static int b_run(builder *b, const char *head, size_t head_len, const char *tail, size_t tail_len, bool head_target,
                 bool tail_target, q_err *err) {
    char *text = malloc(head_len + tail_len + 1);
    if (!text) return q_err_set(err, "out of memory");
    memcpy(text, head, head_len);
    memcpy(text + head_len, tail, tail_len);
    text[head_len + tail_len] = 0;
    int32_t *ids = NULL, *hids = NULL;
    int64_t n = 0, nh = 0;
    int rc = tok_encode(b->tok, text, head_len + tail_len, false, &ids, &n, err);
    int64_t split = n;  // tokens [0, split) carry the head's flag
    if (rc == 0 && head_target != tail_target && head_len && tail_len) {
        rc = tok_encode(b->tok, head, head_len, false, &hids, &nh, err);
        split = 0;
        while (rc == 0 && split < nh && split < n && hids[split] == ids[split]) split++;
    } else if (!head_len) {
        split = 0;
    }
    if (rc == 0) rc = b_reserve(b, n, err);
    if (rc == 0) {
        for (int64_t i = 0; i < n; i++) {
            b->ids[b->n + i] = ids[i];
            b->target[b->n + i] = i < split ? head_target : tail_target;
        }
        b->n += n;
    }
    free(text);
    free(ids);
    free(hids);
    return rc;
}

static int b_text(builder *b, const char *s, bool target, q_err *err) {
    return b_run(b, s, strlen(s), "", 0, target, target, err);
}

// ----------------------------------------------------------------------------
// templates

typedef enum role { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT } role;
static const char *const role_names[] = {"system", "user", "assistant"};

typedef struct turn {
    role role;
    const char *content;
} turn;

// One record, whatever its format: turns, plus alpaca's optional input (which
// the alpaca template shows as its own section; chat templates append it to
// the instruction).
typedef struct record {
    turn *turns;  // [n_turns]
    int64_t n_turns;
    const char *input;  // alpaca format only, NULL = none
    const char *text;   // text format only
} record;

static const char *const alpaca_header_input =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n";
static const char *const alpaca_header =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n";

// Llama 3's template trims each message (Jinja's |trim: leading and trailing whitespace).
static void trimmed(const char *s, const char **start, size_t *len) {
    size_t n = strlen(s);
    while (n && isspace((unsigned char)*s)) s++, n--;
    while (n && isspace((unsigned char)s[n - 1])) n--;
    *start = s;
    *len = n;
}

// Appends `a` + `b` (+ `c`) into a malloc'd string.
static char *concat3(const char *a, const char *b, const char *c) {
    const size_t na = strlen(a), nb = strlen(b), nc = c ? strlen(c) : 0;
    char *s = malloc(na + nb + nc + 1);
    if (!s) return NULL;
    memcpy(s, a, na);
    memcpy(s + na, b, nb);
    if (c) memcpy(s + na + nb, c, nc);
    s[na + nb + nc] = 0;
    return s;
}

// One chat turn. `generation`: stop after the assistant header (a prompt for generate).
static int render_turn(builder *b, data_template tmpl, role r, const char *content, bool all_targets, bool generation,
                       q_err *err) {
    const bool head_t = all_targets, body_t = all_targets || r == ROLE_ASSISTANT;
    if (tmpl == DATA_TEMPLATE_CHATML) {
        char head[32];
        snprintf(head, sizeof head, "%s\n", role_names[r]);
        if (b_special(b, "<|im_start|>", head_t, err)) return -1;
        if (generation) return b_text(b, head, head_t, err);
        if (b_run(b, head, strlen(head), content, strlen(content), head_t, body_t, err)) return -1;
        if (b_special(b, "<|im_end|>", body_t, err)) return -1;
        return b_text(b, "\n", all_targets, err);
    }
    // llama3
    if (b_special(b, "<|start_header_id|>", head_t, err) || b_text(b, role_names[r], head_t, err) ||
        b_special(b, "<|end_header_id|>", head_t, err))
        return -1;
    if (generation) return b_text(b, "\n\n", head_t, err);
    const char *c;
    size_t n;
    trimmed(content, &c, &n);
    if (b_run(b, "\n\n", 2, c, n, head_t, body_t, err)) return -1;
    return b_special(b, "<|eot_id|>", body_t, err);
}

// The EOS after the final response, unless the template's end of turn is already it.
static int render_eos(builder *b, data_template tmpl, q_err *err) {
    const int32_t eos = tok_eos_id(b->tok);
    if (eos < 0) return 0;
    const char *eot = tmpl == DATA_TEMPLATE_CHATML ? "<|im_end|>" : tmpl == DATA_TEMPLATE_LLAMA3 ? "<|eot_id|>" : NULL;
    if (eot && tok_token_id(b->tok, eot) == eos) return 0;
    return b_push(b, eos, true, err);
}

static int render_bos(builder *b, bool target, q_err *err) {
    if (!tok_adds_bos(b->tok) || tok_bos_id(b->tok) < 0) return 0;
    return b_push(b, tok_bos_id(b->tok), target, err);
}

// The whole record. `generation`: the prompt only, up to where the response starts.
static int render(builder *b, data_template tmpl, data_format fmt, const record *rec, const char *system_prompt,
                  bool train_on_inputs, bool generation, q_err *err) {
    const bool all = train_on_inputs;
    if (render_bos(b, all, err)) return -1;
    if (fmt == DATA_FORMAT_TEXT) {
        if (b_text(b, rec->text, true, err)) return -1;
        return render_eos(b, DATA_TEMPLATE_PLAIN, err);
    }
    if (tmpl == DATA_TEMPLATE_CHATML || tmpl == DATA_TEMPLATE_LLAMA3) {
        const bool has_system = rec->n_turns && rec->turns[0].role == ROLE_SYSTEM;
        if (system_prompt && *system_prompt && !has_system &&
            render_turn(b, tmpl, ROLE_SYSTEM, system_prompt, all, false, err))
            return -1;
        for (int64_t i = 0; i < rec->n_turns; i++) {
            const turn *t = &rec->turns[i];
            char *joined = NULL;  // alpaca's input joins the instruction
            const char *content = t->content;
            if (t->role == ROLE_USER && rec->input && *rec->input) {
                if (!(joined = concat3(t->content, "\n\n", rec->input))) return q_err_set(err, "out of memory");
                content = joined;
            }
            const int rc = render_turn(b, tmpl, t->role, content, all, false, err);
            free(joined);
            if (rc) return -1;
        }
        if (generation) return render_turn(b, tmpl, ROLE_ASSISTANT, "", all, true, err);
        if (!rec->n_turns || rec->turns[rec->n_turns - 1].role != ROLE_ASSISTANT) return 0;
        return render_eos(b, tmpl, err);
    }
    // alpaca and plain: one prompt, one response
    const char *prompt = rec->turns[0].content, *response = generation ? "" : rec->turns[1].content;
    const char *input = rec->input && *rec->input ? rec->input : NULL;
    q_buf head = {0};
    int rc;
    if (tmpl == DATA_TEMPLATE_ALPACA)
        rc = q_buf_printf(&head, "%s%s", input ? alpaca_header_input : alpaca_header, prompt) ||
             (input && q_buf_printf(&head, "\n\n### Input:\n%s", input)) || q_buf_printf(&head, "\n\n### Response:\n");
    else  // plain: alpaca's input, if any, as its own paragraph
        rc = input ? q_buf_printf(&head, "%s\n\n%s\n", prompt, input) : q_buf_printf(&head, "%s\n", prompt);
    if (rc) {
        q_buf_free(&head);
        return q_err_set(err, "out of memory");
    }
    rc = b_run(b, head.data, head.len, response, strlen(response), all, true, err);
    q_buf_free(&head);
    if (rc || generation) return rc;
    return render_eos(b, tmpl, err);
}

static bool template_is_chat(data_template t) { return t == DATA_TEMPLATE_CHATML || t == DATA_TEMPLATE_LLAMA3; }

// The template's special tokens must exist in the tokenizer.
static int check_template_tokens(const tok_tokenizer *t, data_template tmpl, q_err *err) {
    static const char *const chatml[] = {"<|im_start|>", "<|im_end|>", NULL};
    static const char *const llama3[] = {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", NULL};
    const char *const *need = tmpl == DATA_TEMPLATE_CHATML ? chatml : tmpl == DATA_TEMPLATE_LLAMA3 ? llama3 : NULL;
    for (; need && *need; need++)
        if (tok_token_id(t, *need) < 0)
            return q_err_set(err, "template %s needs the token %s, which this tokenizer does not have (pick the "
                             "model's own template: chatml, llama3, or alpaca/plain, which need none)",
                             data_template_name(tmpl), *need);
    return 0;
}

int data_prompt_encode(const tok_tokenizer *t, data_template tmpl, const char *system_prompt, const char *prompt,
                       int32_t **ids, int64_t *n, q_err *err) {
    if (check_template_tokens(t, tmpl, err)) return -1;
    turn turns[1] = {{ROLE_USER, prompt}};
    record rec = {.turns = turns, .n_turns = 1};
    builder b = {.tok = t};
    if (render(&b, tmpl, DATA_FORMAT_COMPLETION, &rec, system_prompt, false, true, err)) {
        free(b.ids);
        free(b.target);
        return -1;
    }
    free(b.target);
    *ids = b.ids;
    *n = b.n;
    return 0;
}

// ----------------------------------------------------------------------------
// reading records from JSON lines

static const char *json_type_name(q_json_type t) {
    static const char *const names[] = {"null", "a boolean", "a number", "a string", "an array", "an object"};
    return names[t];
}

// A string field; `optional`: missing or null gives NULL.
static int get_string(const q_json *obj, const char *key, bool optional, const char *what, const char **out,
                      q_err *err) {
    const q_json *v = q_json_get(obj, key);
    *out = NULL;
    if (!v || (optional && v->type == Q_JSON_NULL)) return optional ? 0 : q_err_set(err, "%smissing \"%s\"", what, key);
    if (v->type != Q_JSON_STRING)
        return q_err_set(err, "%s\"%s\" must be a string, got %s", what, key, json_type_name(v->type));
    if (strlen(v->string) != v->string_len) return q_err_set(err, "%s\"%s\" contains a NUL character", what, key);
    *out = v->string;
    return 0;
}

// Fills rec (turns malloc'd, strings pointing into j) from one parsed line.
static int read_record(const q_json *j, const data_config *c, record *rec, q_err *err) {
    memset(rec, 0, sizeof *rec);
    if (j->type != Q_JSON_OBJECT) return q_err_set(err, "expected a JSON object, got %s", json_type_name(j->type));
    if (c->format == DATA_FORMAT_TEXT) return get_string(j, c->text_field ? c->text_field : "text", false, "", &rec->text, err);
    if (c->format == DATA_FORMAT_CHAT) {
        const q_json *m = q_json_get(j, "messages");
        if (!m) return q_err_set(err, "missing \"messages\"");
        if (m->type != Q_JSON_ARRAY) return q_err_set(err, "\"messages\" must be an array, got %s", json_type_name(m->type));
        if (m->count == 0) return q_err_set(err, "\"messages\" is empty");
        rec->turns = calloc(m->count, sizeof *rec->turns);
        if (!rec->turns) return q_err_set(err, "out of memory");
        rec->n_turns = (int64_t)m->count;
        bool any_assistant = false;
        for (size_t i = 0; i < m->count; i++) {
            const q_json *msg = &m->items[i];
            char what[48];
            snprintf(what, sizeof what, "messages[%zu]: ", i);
            if (msg->type != Q_JSON_OBJECT)
                return q_err_set(err, "%sexpected an object, got %s", what, json_type_name(msg->type));
            const char *r, *content;
            if (get_string(msg, "role", false, what, &r, err) || get_string(msg, "content", false, what, &content, err))
                return -1;
            int k = -1;
            for (int x = 0; x < 3; x++)
                if (strcmp(r, role_names[x]) == 0) k = x;
            if (k < 0) return q_err_set(err, "%srole must be system, user or assistant, got \"%.40s\"", what, r);
            rec->turns[i] = (turn){(role)k, content};
            any_assistant |= k == ROLE_ASSISTANT;
        }
        if (!any_assistant) return q_err_set(err, "no assistant message: nothing to train on");
        return 0;
    }
    // alpaca and completion: a prompt and a response
    const char *prompt, *response, *input = NULL;
    if (c->format == DATA_FORMAT_ALPACA) {
        if (get_string(j, "instruction", false, "", &prompt, err) || get_string(j, "input", true, "", &input, err) ||
            get_string(j, "output", false, "", &response, err))
            return -1;
    } else {
        if (get_string(j, c->prompt_field ? c->prompt_field : "question", false, "", &prompt, err) ||
            get_string(j, c->response_field ? c->response_field : "answer", false, "", &response, err))
            return -1;
    }
    rec->turns = calloc(2, sizeof *rec->turns);
    if (!rec->turns) return q_err_set(err, "out of memory");
    rec->turns[0] = (turn){ROLE_USER, prompt};
    rec->turns[1] = (turn){ROLE_ASSISTANT, response};
    rec->n_turns = 2;
    rec->input = input;
    return 0;
}

// ----------------------------------------------------------------------------
// loading

void data_free(data_set *d) {
    for (int64_t i = 0; i < d->n_train; i++) free(d->train[i].ids), free(d->train[i].target);
    for (int64_t i = 0; i < d->n_val; i++) free(d->val[i].ids), free(d->val[i].target);
    free(d->train);
    free(d->val);
    memset(d, 0, sizeof *d);
}

// One line: parse, validate, render, tokenize. A problem with the line
// itself returns 1 (skippable); anything else (out of memory, tokenizer) -1.
static int load_line(const char *line, size_t len, const data_config *c, const tok_tokenizer *t, data_example *ex,
                     q_err *err) {
    q_json *j = NULL;
    if (q_json_parse(line, len, &j, err)) {
        // the parser counts lines within this one line: keep only the column
        const char *m = strncmp(err->msg, "line 1, ", 8) == 0 ? err->msg + 8 : err->msg;
        char msg[sizeof err->msg];
        snprintf(msg, sizeof msg, "%s", m);
        q_err_set(err, "invalid JSON: %s", msg);
        return 1;
    }
    record rec;
    int rc = read_record(j, c, &rec, err) ? 1 : 0;
    builder b = {.tok = t};
    if (rc == 0 && render(&b, c->template, c->format, &rec, c->system_prompt, c->train_on_inputs, false, err)) rc = -1;
    free(rec.turns);
    q_json_free(j);
    if (rc) {
        free(b.ids);
        free(b.target);
        return rc;
    }
    ex->ids = b.ids;
    ex->target = b.target;
    ex->n = b.n;
    return 0;
}

int data_load(data_set *d, const data_config *c, const tok_tokenizer *t, q_err *err) {
    memset(d, 0, sizeof *d);
    if (c->seq_len < 2) return q_err_set(err, "%s: seq_len must be at least 2, got %lld", c->path, (long long)c->seq_len);
    if (!(c->val_fraction >= 0 && c->val_fraction < 1))
        return q_err_set(err, "%s: validation fraction must be in [0, 1), got %g", c->path, c->val_fraction);
    if (c->format == DATA_FORMAT_CHAT && !template_is_chat(c->template))
        return q_err_set(err, "%s: chat data needs a chat template (chatml or llama3), not %s", c->path,
                         data_template_name(c->template));
    if (c->format != DATA_FORMAT_TEXT && check_template_tokens(t, c->template, err))
        return q_err_wrap(err, "%s", c->path);
    char *text;
    size_t size;
    if (q_file_read(c->path, &text, &size, err)) return -1;

    data_example *all = NULL;
    int64_t n = 0, cap = 0, lineno = 0;
    int rc = 0;
    const char *p = text, *end = text + size;
    if (size >= 3 && memcmp(p, "\xef\xbb\xbf", 3) == 0) p += 3;  // UTF-8 byte order mark
    while (p < end && (c->max_examples <= 0 || n < c->max_examples)) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *stop = nl ? nl : end;
        size_t len = (size_t)(stop - p);
        if (len && p[len - 1] == '\r') len--;
        const char *line = p;
        p = nl ? nl + 1 : end;
        lineno++;
        bool blank = true;
        for (size_t i = 0; i < len && blank; i++) blank = isspace((unsigned char)line[i]);
        if (blank) continue;
        d->n_lines++;
        if (n == cap) {
            cap = cap ? cap * 2 : 1024;
            data_example *grown = realloc(all, (size_t)cap * sizeof *all);
            if (!grown) {
                rc = q_err_set(err, "%s: out of memory", c->path);
                break;
            }
            all = grown;
        }
        data_example ex;
        const int r = load_line(line, len, c, t, &ex, err);
        if (r == 1 && c->skip_bad_lines) {
            d->n_skipped++;
            continue;
        }
        if (r) {
            rc = q_err_wrap(err, "%s:%lld", c->path, (long long)lineno);
            break;
        }
        if (ex.n > c->seq_len) {
            ex.n = c->seq_len;  // keep the head
            d->n_truncated++;
        }
        // give back the builder's spare room (realloc to a smaller size does not fail in practice;
        // if it does, the larger block stays)
        int32_t *fit_ids = realloc(ex.ids, (size_t)(ex.n ? ex.n : 1) * sizeof *ex.ids);
        uint8_t *fit_tg = realloc(ex.target, (size_t)(ex.n ? ex.n : 1));
        if (fit_ids) ex.ids = fit_ids;
        if (fit_tg) ex.target = fit_tg;
        for (int64_t i = 0; i < ex.n; i++) d->n_target_tokens += ex.target[i];
        d->n_tokens += ex.n;
        all[n++] = ex;
    }
    free(text);
    if (rc) {
        for (int64_t i = 0; i < n; i++) free(all[i].ids), free(all[i].target);
        free(all);
        memset(d, 0, sizeof *d);
        return -1;
    }

    // validation split: a seeded shuffle picks which examples are held out;
    // both sides keep file order
    int64_t n_val = 0;
    if (c->val_fraction > 0 && n > 1) {
        n_val = (int64_t)(c->val_fraction * (double)n);
        if (n_val < 1) n_val = 1;
        if (c->val_max > 0 && n_val > c->val_max) n_val = c->val_max;
        if (n_val > n - 1) n_val = n - 1;
    }
    int64_t *perm = malloc((size_t)(n ? n : 1) * sizeof *perm);
    uint8_t *held = calloc((size_t)(n ? n : 1), 1);
    d->train = malloc((size_t)(n - n_val ? n - n_val : 1) * sizeof *d->train);
    d->val = malloc((size_t)(n_val ? n_val : 1) * sizeof *d->val);
    if (!perm || !held || !d->train || !d->val) {
        free(perm), free(held), free(d->train), free(d->val);
        for (int64_t i = 0; i < n; i++) free(all[i].ids), free(all[i].target);
        free(all);
        memset(d, 0, sizeof *d);
        return q_err_set(err, "%s: out of memory", c->path);
    }
    uint64_t s = c->seed ^ 0x76616c5f73706c74ull;  // "val_splt": independent of the epoch orders
    shuffle_identity(perm, n, splitmix64(&s));
    for (int64_t i = 0; i < n_val; i++) held[perm[i]] = 1;
    for (int64_t i = 0; i < n; i++) {
        if (held[i]) d->val[d->n_val++] = all[i];
        else d->train[d->n_train++] = all[i];
    }
    free(perm);
    free(held);
    free(all);
    return 0;
}

// ----------------------------------------------------------------------------
// batches

// The permutation of an epoch depends only on (seed, epoch), so a position
// (epoch, cursor) is all a checkpoint needs.
static void draw_order(data_loader *l) {
    uint64_t s = l->seed ^ (0xd1b54a32d192ed03ull * (uint64_t)(l->epoch + 1));
    shuffle_identity(l->order, l->n_ex, splitmix64(&s));
}

int data_loader_init(data_loader *l, const data_example *ex, int64_t n_ex, int64_t B, int64_t T, bool packing,
                     int32_t pad_id, uint64_t seed, q_err *err) {
    memset(l, 0, sizeof *l);
    if (B < 1 || T < 2) return q_err_set(err, "data loader: need B >= 1 and T >= 2, got B %lld, T %lld", (long long)B,
                                         (long long)T);
    if (n_ex < 0) return q_err_set(err, "data loader: negative example count");
    *l = (data_loader){.ex = ex, .n_ex = n_ex, .B = B, .T = T, .packing = packing, .pad_id = pad_id, .seed = seed};
    l->order = malloc((size_t)(n_ex ? n_ex : 1) * sizeof *l->order);
    if (!l->order) return q_err_set(err, "data loader: out of memory");
    draw_order(l);
    return 0;
}

void data_loader_seek(data_loader *l, int64_t epoch, int64_t cursor) {
    l->epoch = epoch < 0 ? 0 : epoch;
    l->cursor = cursor < 0 ? 0 : cursor > l->n_ex ? l->n_ex : cursor;
    draw_order(l);
}

// The next example in order, moving into the next epoch when this one is done.
static const data_example *peek(data_loader *l) {
    if (l->cursor >= l->n_ex) {
        l->epoch++;
        l->cursor = 0;
        draw_order(l);
    }
    return &l->ex[l->order[l->cursor]];
}

int64_t data_loader_next(data_loader *l, int64_t *ids, int64_t *labels, int64_t *doc_ids) {
    const int64_t T = l->T;
    int64_t n_targets = 0, doc = 0;
    for (int64_t row = 0; row < l->B; row++) {
        int64_t *rid = ids + row * T, *rlab = labels + row * T, *rdoc = doc_ids + row * T;
        int64_t used = 0;
        while (l->n_ex > 0) {
            const data_example *e = peek(l);
            int64_t n = e->n < T ? e->n : T;  // longer than a row: its head (only ever alone in a row)
            if (used > 0 && (!l->packing || used + n > T)) break;
            for (int64_t i = 0; i < n; i++) {
                rid[used + i] = e->ids[i];
                // the first token of a document is never a target: nothing before it in its document
                const bool target = i > 0 && e->target[i];
                rlab[used + i] = target ? e->ids[i] : -100;
                rdoc[used + i] = doc;
                n_targets += target;
            }
            used += n;
            doc++;
            l->cursor++;
            if (!l->packing || used == T) break;
        }
        // padding: its own document, never a target
        for (int64_t i = used; i < T; i++) rid[i] = l->pad_id, rlab[i] = -100, rdoc[i] = doc;
        if (used < T) doc++;
    }
    return n_targets;
}

int64_t data_loader_batches_per_epoch(const data_loader *l) {
    if (l->n_ex == 0) return 0;
    int64_t rows = l->n_ex;
    if (l->packing) {  // greedy packing of this epoch's order, as data_loader_next does it
        rows = 0;
        int64_t used = 0;
        for (int64_t i = 0; i < l->n_ex; i++) {
            const int64_t ne = l->ex[l->order[i]].n, n = ne < l->T ? ne : l->T;
            if (used > 0 && used + n > l->T) rows++, used = 0;
            used += n;
            if (used == l->T) rows++, used = 0;
        }
        if (used) rows++;
    }
    return (rows + l->B - 1) / l->B;
}

void data_loader_free(data_loader *l) {
    free(l->order);
    memset(l, 0, sizeof *l);
}
