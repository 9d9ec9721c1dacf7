// train/recipe.c: YAML recipes. One table below lists every key: its name,
// type, where it lives in `recipe`, its range, its default and one line of
// documentation. Parsing, overrides, defaults, --help and the resolved-recipe
// writer all walk that table, so a key is added in exactly one place.
//
// A recipe may nest keys as mappings (`lora: {r: 16}`) or write them dotted
// at the top level (`lora.r: 16`); both reach the same typed setter that
// `--set lora.r=16` uses. Scalars are read as text and converted here (YAML
// 1.1 type tags are not trusted: `r: "16"` is 16, `r: sixteen` an error).
#define _GNU_SOURCE
#include "train.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <yaml.h>

// ----------------------------------------------------------------------------
// the key table

typedef enum key_type {
    KT_INT,       // int64_t
    KT_SEED,      // uint64_t
    KT_FLOAT,     // double
    KT_BOOL,      // bool
    KT_STRING,    // char[size]
    KT_CHOICE,    // one of `choices`, stored as text in char[size]
    KT_ONOFF,     // one of two `choices`, stored as bool (the second one = true)
    KT_FORMAT,    // data_format via data_format_from_name
    KT_TEMPLATE,  // data_template via data_template_from_name
    KT_TARGETS,   // uint32_t LoRA target bits via lora_targets_parse
} key_type;

enum {
    MIN_OPEN = 1u << 0,  // min is excluded: "> min"
    MAX_OPEN = 1u << 1,  // max is excluded: "< max"
    POW2 = 1u << 2,      // an integer power of two
    FIXED = 1u << 3,     // not stored: only the default is implemented
};

typedef struct key_def {
    const char *name;
    key_type type;
    size_t off, size;     // where the value lives in `recipe` (FIXED keys: nowhere)
    double min, max;      // numeric range, inclusive unless MIN_OPEN / MAX_OPEN
    unsigned flags;
    const char *def;      // the default, written as in a recipe
    const char *choices;  // KT_CHOICE / KT_ONOFF / FIXED: "a|b|c" accepted values
    const char *planned;  // "a|b": values we know of and mean to implement
    const char *doc;
} key_def;

// The field's offset, checked against the declared C type at compile time
// (_Generic has no association for any other type).
#define AT(f, T) _Generic(((recipe *)0)->f, T: offsetof(recipe, f)), sizeof(((recipe *)0)->f)
#define NOWHERE 0, 0
#define INF HUGE_VAL

#define INT(n, f, lo, hi, fl, d, doc) {n, KT_INT, AT(f, int64_t), lo, hi, fl, d, NULL, NULL, doc}
#define FLOAT(n, f, lo, hi, fl, d, doc) {n, KT_FLOAT, AT(f, double), lo, hi, fl, d, NULL, NULL, doc}
#define BOOL(n, f, d, doc) {n, KT_BOOL, AT(f, bool), 0, 0, 0, d, NULL, NULL, doc}
#define STRING(n, f, d, doc) {n, KT_STRING, AT(f, char *), 0, 0, 0, d, NULL, NULL, doc}
#define CHOICE(n, f, d, ch, pl, doc) {n, KT_CHOICE, AT(f, char *), 0, 0, 0, d, ch, pl, doc}

static const key_def keys[] = {
    {"seed", KT_SEED, AT(seed, uint64_t), 0, 0, 0, "42", NULL, NULL,
     "seeds LoRA init, dropout, data shuffle and the validation split"},

    STRING("run.dir", run_dir, "runs/qlora", "where metrics, checkpoints and the adapter are written"),

    STRING("model.path", model_path, "", "HF safetensors folder, bnb-4bit checkpoint or .gguf file"),
    STRING("model.tokenizer", tokenizer_path, "", "tokenizer.json; empty: beside the model, or the GGUF's own"),

    {"quant.base", KT_CHOICE, NOWHERE, 0, 0, FIXED, "nf4", "nf4", "fp4|int4",
     "4-bit format of the frozen base weights: NF4 with double-quantized block scales, as bitsandbytes"},
    INT("quant.block_size", quant_block_size, 32, 4096, POW2, "64", "NF4 block size (bitsandbytes: 64)"),
    {"quant.double_quant", KT_BOOL, NOWHERE, 0, 0, FIXED, "true", NULL, NULL,
     "block scales stored as 8 bits in groups of 256 (bnb_4bit_use_double_quant=True)"},

    INT("lora.r", lora_r, 1, 4096, 0, "64", "LoRA rank (QLoRA paper: 64)"),
    FLOAT("lora.alpha", lora_alpha, 0, INF, MIN_OPEN, "16", "scale numerator: scale = alpha / r (QLoRA: 16)"),
    FLOAT("lora.dropout", lora_dropout, 0, 1, MAX_OPEN, "0",
          "dropout on the adapter input (qlora.py: 0; the paper used 0.1 up to 13B, 0.05 above)"),
    BOOL("lora.rslora", lora_rslora, "false", "rank-stabilized scale alpha / sqrt(r)"),
    {"lora.targets", KT_TARGETS, AT(lora_targets, uint32_t), 0, 0, 0, "all-linear", NULL, NULL,
     "list of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear"},

    STRING("data.path", data_path, "", "JSONL training data, one example per line"),
    {"data.format", KT_FORMAT, AT(data_format, data_format), 0, 0, 0, "alpaca", "alpaca|chat|completion|text", NULL,
     "what each line holds: alpaca, chat (messages), completion (prompt/response fields) or text"},
    {"data.template", KT_TEMPLATE, AT(data_template, data_template), 0, 0, 0, "alpaca", "chatml|llama3|alpaca|plain",
     NULL, "prompt template: chatml (SmolLM2, Qwen2), llama3, alpaca or plain"},
    STRING("data.prompt_field", data_prompt_field, "question", "completion format: the prompt's JSON field"),
    STRING("data.response_field", data_response_field, "answer", "completion format: the response's JSON field"),
    STRING("data.text_field", data_text_field, "text", "text format: the JSON field holding the text"),
    STRING("data.system_prompt", data_system_prompt, "", "system message for chat templates; empty: none"),
    BOOL("data.train_on_inputs", data_train_on_inputs, "false",
         "also train on prompt tokens (default false, as axolotl and QLoRA; torchtune's default is true)"),
    BOOL("data.packing", data_packing, "false", "pack several whole examples per row (never splitting one)"),
    BOOL("data.skip_bad_lines", data_skip_bad_lines, "false", "skip and count malformed lines instead of failing"),
    INT("data.seq_len", data_seq_len, 8, 1 << 20, 0, "1024", "tokens per row; longer examples are truncated"),
    INT("data.max_examples", data_max_examples, 0, INF, 0, "0", "read at most this many lines; 0: all"),

    FLOAT("eval.split", eval_split, 0, 1, MAX_OPEN, "0", "fraction of examples held out for validation; 0: none"),
    INT("eval.max_examples", eval_max_examples, 0, INF, 0, "256", "cap on held-out examples; 0: no cap"),
    INT("eval.every_n_steps", eval_every_n_steps, 0, INF, 0, "0", "evaluate every N optimizer steps; 0: at the end only"),
    INT("eval.max_batches", eval_max_batches, 0, INF, 0, "0", "batches per evaluation; 0: the whole split"),

    INT("train.micro_batch_size", train_micro_batch_size, 1, 65536, 0, "1", "rows per forward/backward"),
    INT("train.gradient_accumulation_steps", train_gradient_accumulation_steps, 1, 65536, 0, "16",
        "micro-batches per optimizer step (QLoRA: 1 x 16)"),
    INT("train.epochs", train_epochs, 0, INF, 0, "1", "passes over the training examples"),
    INT("train.max_steps", train_max_steps, 0, INF, 0, "0", "stop after this many optimizer steps; 0: run the epochs"),
    {"train.recompute", KT_ONOFF, AT(train_recompute, bool), 0, 0, 0, "all", "none|all", "mlp",
     "activation checkpointing: none, or all (recompute every layer in the backward)"},
    INT("train.threads", train_threads, 0, 4096, 0, "0", "CPU threads; 0: all cores"),
    CHOICE("train.device", train_device, "cpu", "cpu|cuda", NULL,
           "where the step runs: cpu (the fp32 reference) or cuda (the first GPU; optimizer stays on the host)"),
    CHOICE("train.precision", train_precision, "bf16", "fp32|tf32|bf16|fp16", "fp8",
           "cuda only: math of the frozen-base and LM-head GEMMs (LoRA GEMMs are fp32); bf16 needs sm80+"),
    INT("train.log_every", train_log_every, 1, INF, 0, "1", "print a progress line every N steps"),

    {"optim.name", KT_CHOICE, NOWHERE, 0, 0, FIXED, "adamw", "adamw", "adamw8bit|paged_adamw8bit|paged_adamw",
     "optimizer: AdamW with fp32 state (8-bit and paged variants are planned)"},
    FLOAT("optim.lr", optim_lr, 0, INF, MIN_OPEN, "2e-4", "peak learning rate (QLoRA: 2e-4 up to 13B)"),
    FLOAT("optim.weight_decay", optim_weight_decay, 0, INF, 0, "0", "decoupled weight decay (QLoRA: 0)"),
    FLOAT("optim.beta1", optim_beta1, 0, 1, MAX_OPEN, "0.9", "AdamW beta1"),
    FLOAT("optim.beta2", optim_beta2, 0, 1, MAX_OPEN, "0.999", "AdamW beta2"),
    FLOAT("optim.eps", optim_eps, 0, INF, MIN_OPEN, "1e-8", "AdamW epsilon"),
    FLOAT("optim.max_grad_norm", optim_max_grad_norm, 0, INF, 0, "0.3",
          "clip the global gradient norm to this; 0: no clipping (QLoRA: 0.3)"),

    CHOICE("sched.name", sched_name, "constant", "constant|linear|cosine", "wsd",
           "learning-rate schedule after warmup (QLoRA: constant)"),
    INT("sched.warmup_steps", sched_warmup_steps, 0, INF, 0, "0", "linear warmup steps (exclusive with warmup_ratio)"),
    FLOAT("sched.warmup_ratio", sched_warmup_ratio, 0, 1, 0, "0.03",
          "warmup as a fraction of all steps (QLoRA: 0.03; exclusive with warmup_steps)"),
    FLOAT("sched.final_lr_frac", sched_final_lr_frac, 0, 1, 0, "0", "linear/cosine decay ends at lr * this"),

    INT("ckpt.every_n_steps", ckpt_every_n_steps, 0, INF, 0, "250", "checkpoint every N steps; 0: only at the end"),
    INT("ckpt.keep", ckpt_keep, 0, INF, 0, "3", "checkpoints kept (older ones deleted); 0: all"),

    INT("sample.count", sample_count, 0, 1000, 0, "3", "held-out prompts generated before and after training"),
    INT("sample.max_new_tokens", sample_max_new_tokens, 1, 1 << 20, 0, "128", "tokens generated per sample"),
};
#define N_KEYS ((int)(sizeof keys / sizeof keys[0]))

// Keys other trainers use (torchtune, axolotl, HF / qlora.py), for the
// "did you mean" of an unknown key. Matched against the whole key and its last part.
static const char *const aliases[][2] = {
    {"learning_rate", "optim.lr"}, {"lr", "optim.lr"},
    {"lora_r", "lora.r"}, {"lora_rank", "lora.r"}, {"rank", "lora.r"},
    {"lora_alpha", "lora.alpha"}, {"lora_dropout", "lora.dropout"},
    {"lora_target_modules", "lora.targets"}, {"target_modules", "lora.targets"},
    {"lora_attn_modules", "lora.targets"}, {"lora_target_linear", "lora.targets"},
    {"peft_use_rslora", "lora.rslora"}, {"use_rslora", "lora.rslora"},
    {"micro_batch_size", "train.micro_batch_size"}, {"batch_size", "train.micro_batch_size"},
    {"per_device_train_batch_size", "train.micro_batch_size"},
    {"gradient_accumulation_steps", "train.gradient_accumulation_steps"},
    {"num_epochs", "train.epochs"}, {"num_train_epochs", "train.epochs"}, {"epochs", "train.epochs"},
    {"max_steps", "train.max_steps"}, {"max_steps_per_epoch", "train.max_steps"},
    {"gradient_checkpointing", "train.recompute"}, {"enable_activation_checkpointing", "train.recompute"},
    {"logging_steps", "train.log_every"}, {"log_every_n_steps", "train.log_every"},
    {"sequence_len", "data.seq_len"}, {"max_seq_len", "data.seq_len"}, {"source_max_len", "data.seq_len"},
    {"sample_packing", "data.packing"}, {"packed", "data.packing"},
    {"train_on_inputs", "data.train_on_inputs"}, {"train_on_input", "data.train_on_inputs"},
    {"train_on_source", "data.train_on_inputs"},
    {"datasets", "data.path"}, {"dataset", "data.path"},
    {"val_set_size", "eval.split"}, {"eval_steps", "eval.every_n_steps"},
    {"run_val_every_n_steps", "eval.every_n_steps"},
    {"optimizer", "optim.name"}, {"weight_decay", "optim.weight_decay"},
    {"max_grad_norm", "optim.max_grad_norm"}, {"clip_grad_norm", "optim.max_grad_norm"},
    {"adam_beta1", "optim.beta1"}, {"adam_beta2", "optim.beta2"}, {"adam_epsilon", "optim.eps"},
    {"lr_scheduler", "sched.name"}, {"lr_scheduler_type", "sched.name"},
    {"warmup_ratio", "sched.warmup_ratio"}, {"warmup_steps", "sched.warmup_steps"},
    {"num_warmup_steps", "sched.warmup_steps"},
    {"save_steps", "ckpt.every_n_steps"}, {"save_every_n_steps", "ckpt.every_n_steps"},
    {"save_total_limit", "ckpt.keep"},
    {"output_dir", "run.dir"}, {"base_model", "model.path"}, {"model_name_or_path", "model.path"},
    {"load_in_4bit", "quant.base"}, {"bnb_4bit_quant_type", "quant.base"},
    {"bnb_4bit_use_double_quant", "quant.double_quant"}, {"double_quant", "quant.double_quant"},
};

// ----------------------------------------------------------------------------
// lookups and suggestions

static int key_find(const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].name, name) == 0) return i;
    return -1;
}

// True if name is a section ("lora") holding keys ("lora.r").
static bool is_section(const char *name) {
    const size_t n = strlen(name);
    for (int i = 0; i < N_KEYS; i++)
        if (strncmp(keys[i].name, name, n) == 0 && keys[i].name[n] == '.') return true;
    return false;
}

// "lora.r, lora.alpha, ..." for an error message.
static const char *section_keys(const char *section, char *out, size_t size) {
    const size_t n = strlen(section);
    size_t o = 0;
    out[0] = 0;
    for (int i = 0; i < N_KEYS; i++)
        if (strncmp(keys[i].name, section, n) == 0 && keys[i].name[n] == '.' && o < size)
            o += (size_t)snprintf(out + o, size - o, "%s%s", o ? ", " : "", keys[i].name);
    return out;
}

static const char *last_part(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot ? dot + 1 : name;
}

// Optimal string alignment distance (Levenshtein plus adjacent
// transpositions), case-insensitive; strings longer than 63 bytes are far.
static int edit_distance(const char *a, const char *b) {
    const int n = (int)strlen(a), m = (int)strlen(b);
    if (n > 63 || m > 63) return 1000;
    int d[64][64];
    for (int i = 0; i <= n; i++) d[i][0] = i;
    for (int j = 0; j <= m; j++) d[0][j] = j;
    for (int i = 1; i <= n; i++)
        for (int j = 1; j <= m; j++) {
            const int cost = tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]);
            int v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v) v = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < v) v = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == tolower((unsigned char)b[j - 1]) && d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    return d[n][m];
}

// The key most like an unknown name, or NULL. A known alias wins; otherwise
// the nearest key, comparing last parts within the same section ("lora.rank"
// -> "lora.r") and whole names across sections, if near enough to be a typo.
static const char *suggest(const char *name) {
    const char *tail = last_part(name);
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (strcasecmp(name, aliases[i][0]) == 0 || strcasecmp(tail, aliases[i][0]) == 0) return aliases[i][1];
    const size_t sect = (size_t)(tail - name);  // "lora." prefix length, 0 for none
    int best = -1, best_d = 1000;
    for (int i = 0; i < N_KEYS; i++) {
        const char *k = keys[i].name;
        int d = edit_distance(name, k);
        if (sect && strncmp(name, k, sect) == 0) {
            const int dt = edit_distance(tail, last_part(k));
            if (dt < d) d = dt;
        } else {
            const int dt = edit_distance(tail, last_part(k)) + 1;  // right key, wrong section
            if (dt < d) d = dt;
        }
        if (d < best_d) best_d = d, best = i;
    }
    const int limit = (int)strlen(tail) / 2 > 2 ? (int)strlen(tail) / 2 : 2;
    return best >= 0 && best_d <= limit + 1 ? keys[best].name : NULL;
}

static int unknown_key(q_err *err, const char *where, const char *name) {
    const char *s = suggest(name);
    if (s) return q_err_set(err, "%sunknown key '%s' (did you mean '%s'?)", where, name, s);
    return q_err_set(err, "%sunknown key '%s' (sections: seed, run, model, quant, lora, data, eval, train, optim, "
                     "sched, ckpt, sample; `qlora train --help` lists every key)", where, name);
}

// ----------------------------------------------------------------------------
// typed setters: text in, checked value out. Messages start with the key.

static bool is_null_text(const char *s) {
    return !*s || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 || strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0;
}

static void quote_for_error(char *out, size_t size, const char *s) {
    snprintf(out, size, "'%.60s%s'", s, strlen(s) > 60 ? "..." : "");
}

// "must be > 0", "must be in [0, 1)", "must be >= 1"
static void range_text(const key_def *k, char *out, size_t size) {
    char lo[32], hi[32];
    snprintf(lo, sizeof lo, "%.17g", k->min);
    snprintf(hi, sizeof hi, "%.17g", k->max);
    if (k->max == INF) snprintf(out, size, "%s %s", k->flags & MIN_OPEN ? ">" : ">=", lo);
    else snprintf(out, size, "in %c%s, %s%c", k->flags & MIN_OPEN ? '(' : '[', lo, hi, k->flags & MAX_OPEN ? ')' : ']');
}

static bool in_range(const key_def *k, double v) {
    if (k->flags & MIN_OPEN ? !(v > k->min) : !(v >= k->min)) return false;
    if (k->max != INF && (k->flags & MAX_OPEN ? !(v < k->max) : !(v <= k->max))) return false;
    return true;
}

// Index of s in "a|b|c", or -1.
static int choice_index(const char *choices, const char *s) {
    if (!choices) return -1;
    const size_t n = strlen(s);
    int i = 0;
    for (const char *p = choices;; i++) {
        const char *bar = strchr(p, '|');
        const size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, s, n) == 0) return i;
        if (!bar) return -1;
        p = bar + 1;
    }
}

// "a|b|c" -> "a, b, c"
static void choices_text(const char *choices, char *out, size_t size) {
    size_t o = 0;
    for (const char *p = choices; *p && o + 3 < size; p++) {
        if (*p == '|') out[o++] = ',', out[o++] = ' ';
        else out[o++] = *p;
    }
    out[o] = 0;
}

static int parse_int(const char *s, int64_t *v) {
    if (!*s) return -1;
    char *end;
    errno = 0;
    const long long x = strtoll(s, &end, 10);
    if (*end || errno) return -1;
    *v = x;
    return 0;
}

static int parse_float(const char *s, double *v) {
    if (!*s) return -1;
    for (const char *p = s; *p; p++)  // decimal only: no hex floats, inf or nan
        if (!isdigit((unsigned char)*p) && !strchr("+-.eE", *p)) return -1;
    char *end;
    errno = 0;
    const double x = strtod(s, &end);
    if (*end || !isfinite(x)) return -1;
    *v = x;
    return 0;
}

// YAML 1.1 booleans.
static int parse_bool(const char *s, bool *v) {
    static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no", "off"};
    for (int i = 0; i < 3; i++) {
        if (strcasecmp(s, yes[i]) == 0) return *v = true, 0;
        if (strcasecmp(s, no[i]) == 0) return *v = false, 0;
    }
    return -1;
}

static int set_targets_text(recipe *r, const key_def *k, const char *s, q_err *err) {
    // one name, "all-linear", or names separated by commas/spaces (command-line overrides)
    uint32_t bits = 0;
    char buf[512];
    if (strlen(s) >= sizeof buf) return q_err_set(err, "%s: value too long", k->name);
    strcpy(buf, s);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ", []", &save); tok; tok = strtok_r(NULL, ", []", &save))
        if (lora_targets_parse(tok, &bits, err)) return q_err_wrap(err, "%s", k->name);
    if (!bits) return q_err_set(err, "%s: no modules named (list some, or write all-linear)", k->name);
    *(uint32_t *)((char *)r + k->off) = bits;
    return 0;
}

// A key we read but do not store: only its default is implemented.
static int fixed_check(const key_def *k, const char *s, const char *shown, q_err *err) {
    bool ok;
    if (k->type == KT_BOOL) {
        bool v, d = false;
        if (parse_bool(s, &v)) return q_err_set(err, "%s: expected true or false, got %s", k->name, shown);
        parse_bool(k->def, &d);
        ok = v == d;
    } else {
        ok = strcmp(s, k->def) == 0;
    }
    if (ok) return 0;
    if (choice_index(k->planned, s) >= 0)
        return q_err_set(err, "%s: %s is planned but not implemented yet; only %s is (%s)", k->name, shown, k->def,
                         k->doc);
    return q_err_set(err, "%s: %s is not supported; only %s is implemented (%s)", k->name, shown, k->def, k->doc);
}

// Sets key k from the scalar text s. `quoted`: s was a quoted YAML scalar,
// so "" or "null" are text, not an absent value.
static int key_set(recipe *r, const key_def *k, const char *s, bool quoted, q_err *err) {
    char shown[80];
    quote_for_error(shown, sizeof shown, s);
    void *field = (char *)r + k->off;
    const bool null = !quoted && is_null_text(s);
    if (k->flags & FIXED) return fixed_check(k, s, null ? "nothing" : shown, err);
    switch (k->type) {
    case KT_INT: {
        int64_t v;
        if (null || parse_int(s, &v))
            return q_err_set(err, "%s: expected an integer, got %s", k->name, null ? "nothing" : shown);
        char range[96];
        range_text(k, range, sizeof range);
        const bool pow2 = v > 0 && !(v & (v - 1));
        if (!in_range(k, (double)v) || (k->flags & POW2 && !pow2))
            return q_err_set(err, "%s must be %s%s, got %lld", k->name, k->flags & POW2 ? "a power of 2 " : "", range,
                             (long long)v);
        *(int64_t *)field = v;
        return 0;
    }
    case KT_SEED: {
        char *end;
        errno = 0;
        const unsigned long long v = strtoull(s, &end, 10);
        if (null || !isdigit((unsigned char)*s) || *end || errno)
            return q_err_set(err, "%s: expected a non-negative integer below 2^64, got %s", k->name,
                             null ? "nothing" : shown);
        *(uint64_t *)field = v;
        return 0;
    }
    case KT_FLOAT: {
        double v;
        if (null || parse_float(s, &v))
            return q_err_set(err, "%s: expected a number, got %s", k->name, null ? "nothing" : shown);
        if (!in_range(k, v)) {
            char range[96];
            range_text(k, range, sizeof range);
            return q_err_set(err, "%s must be %s, got %s", k->name, range, s);
        }
        *(double *)field = v;
        return 0;
    }
    case KT_BOOL: {
        bool v;
        if (null || parse_bool(s, &v))
            return q_err_set(err, "%s: expected true or false, got %s", k->name, null ? "nothing" : shown);
        *(bool *)field = v;
        return 0;
    }
    case KT_STRING: {
        if (null) s = "";
        if (strlen(s) >= k->size)
            return q_err_set(err, "%s: longer than %zu bytes", k->name, k->size - 1);
        memset(field, 0, k->size);  // whole buffer, so that equal recipes compare equal byte for byte
        memcpy(field, s, strlen(s));
        return 0;
    }
    case KT_CHOICE:
    case KT_ONOFF: {
        const int i = choice_index(k->choices, s);
        if (i < 0) {
            char ok[128];
            choices_text(k->choices, ok, sizeof ok);
            if (choice_index(k->planned, s) >= 0)
                return q_err_set(err, "%s: %s is planned but not implemented yet (available: %s)", k->name, shown, ok);
            char later[128] = "";
            if (k->planned) {
                char pl[96];
                choices_text(k->planned, pl, sizeof pl);
                snprintf(later, sizeof later, "; planned: %s", pl);
            }
            return q_err_set(err, "%s: expected one of %s, got %s%s", k->name, ok, null ? "nothing" : shown, later);
        }
        if (k->type == KT_ONOFF) {
            *(bool *)field = i == 1;
        } else {
            memset(field, 0, k->size);
            memcpy(field, s, strlen(s));
        }
        return 0;
    }
    case KT_FORMAT:
        if (data_format_from_name(s, (data_format *)field, err)) return q_err_wrap(err, "%s", k->name);
        return 0;
    case KT_TEMPLATE:
        if (data_template_from_name(s, (data_template *)field, err)) return q_err_wrap(err, "%s", k->name);
        return 0;
    case KT_TARGETS:
        return set_targets_text(r, k, s, err);
    }
    return q_err_set(err, "%s: bad key type", k->name);
}

// ----------------------------------------------------------------------------
// defaults and cross-field checks

void recipe_defaults(recipe *r) {
    memset(r, 0, sizeof *r);
    for (int i = 0; i < N_KEYS; i++) {
        q_err err;
        // cannot fail unless the table is wrong; the recipe tests check every default
        (void)key_set(r, &keys[i], keys[i].def, false, &err);
    }
}

// "name:line" for a key set in a file, "name" otherwise (overrides, defaults).
static const char *loc(char *buf, size_t size, const char *name, int line) {
    if (line > 0) snprintf(buf, size, "%s:%d", name, line);
    else snprintf(buf, size, "%s", name);
    return buf;
}

// Checks that span keys, after a file. line[i] > 0 for each key the file set
// (at that line).
static int recipe_check(recipe *r, const int *line, const char *where, q_err *err) {
    char at[300];
    const int ws = key_find("sched.warmup_steps"), wr = key_find("sched.warmup_ratio");
    // The two warmups exclude each other: setting one replaces the other's default.
    if (line[ws] && line[wr] && r->sched_warmup_steps > 0 && r->sched_warmup_ratio > 0)
        return q_err_set(err, "%s: sched.warmup_steps and sched.warmup_ratio are both set; set only one",
                         loc(at, sizeof at, where, line[wr] > line[ws] ? line[wr] : line[ws]));
    if (line[ws] && !line[wr] && r->sched_warmup_steps > 0) r->sched_warmup_ratio = 0;
    if (line[wr] && !line[ws] && r->sched_warmup_ratio > 0) r->sched_warmup_steps = 0;

    if (r->train_epochs == 0 && r->train_max_steps == 0)
        return q_err_set(err, "%s: train.epochs and train.max_steps are both 0: nothing to train", where);
    if (r->train_max_steps > 0 && r->sched_warmup_steps > r->train_max_steps)
        return q_err_set(err, "%s: sched.warmup_steps (%lld) exceeds train.max_steps (%lld)", where,
                         (long long)r->sched_warmup_steps, (long long)r->train_max_steps);
    if (r->data_format == DATA_FORMAT_COMPLETION && (!r->data_prompt_field[0] || !r->data_response_field[0]))
        return q_err_set(err, "%s: data.format completion needs data.prompt_field and data.response_field", where);
    if (r->data_format == DATA_FORMAT_CHAT && r->data_template != DATA_TEMPLATE_CHATML &&
        r->data_template != DATA_TEMPLATE_LLAMA3)
        return q_err_set(err, "%s: data.format chat needs a chat template (data.template chatml or llama3), not %s",
                         where, data_template_name(r->data_template));
    if (r->data_format == DATA_FORMAT_TEXT && !r->data_text_field[0])
        return q_err_set(err, "%s: data.format text needs data.text_field", where);
    const int ev = key_find("eval.every_n_steps");
    if (line[ev] && r->eval_every_n_steps > 0 && r->eval_split == 0)
        return q_err_set(err, "%s: eval.every_n_steps is set but eval.split is 0: nothing is held out to evaluate",
                         loc(at, sizeof at, where, line[ev]));
    return 0;
}

// ----------------------------------------------------------------------------
// YAML

typedef struct parse_ctx {
    yaml_document_t *doc;
    const char *name;
    recipe *r;
    int line[N_KEYS];  // where each key was set in this file, 0 = not
    q_err *err;
} parse_ctx;

static int node_line(const yaml_node_t *n) { return (int)n->start_mark.line + 1; }

static const char *node_kind(const yaml_node_t *n) {
    return n->type == YAML_MAPPING_NODE ? "a mapping" : n->type == YAML_SEQUENCE_NODE ? "a list" : "a value";
}

static const char *expected_kind(const key_def *k) {
    switch (k->type) {
    case KT_INT: case KT_SEED: return "an integer";
    case KT_FLOAT: return "a number";
    case KT_BOOL: return "true or false";
    case KT_TARGETS: return "a list of module names or all-linear";
    default: return "a single value";
    }
}

// Scalar text as a NUL-terminated string (a NUL inside is an error).
static int scalar_text(parse_ctx *c, const yaml_node_t *n, const char *key, const char **s) {
    if (strlen((const char *)n->data.scalar.value) != n->data.scalar.length)
        return q_err_set(c->err, "%s:%d: %s: the value contains a NUL byte", c->name, node_line(n), key);
    *s = (const char *)n->data.scalar.value;
    return 0;
}

static int set_from_node(parse_ctx *c, int ki, const yaml_node_t *v) {
    const key_def *k = &keys[ki];
    const int at = node_line(v);
    if (v->type == YAML_SEQUENCE_NODE && k->type == KT_TARGETS) {
        uint32_t bits = 0;
        for (yaml_node_item_t *it = v->data.sequence.items.start; it < v->data.sequence.items.top; it++) {
            const yaml_node_t *item = yaml_document_get_node(c->doc, *it);
            const char *s = NULL;
            if (item->type != YAML_SCALAR_NODE)
                return q_err_set(c->err, "%s:%d: %s: expected module names, got %s", c->name, node_line(item),
                                 k->name, node_kind(item));
            if (scalar_text(c, item, k->name, &s)) return -1;
            if (lora_targets_parse(s, &bits, c->err)) return q_err_wrap(c->err, "%s:%d: %s", c->name, node_line(item), k->name);
        }
        if (!bits) return q_err_set(c->err, "%s:%d: %s: empty list (name some modules, or write all-linear)", c->name, at, k->name);
        *(uint32_t *)((char *)c->r + k->off) = bits;
        return 0;
    }
    if (v->type != YAML_SCALAR_NODE)
        return q_err_set(c->err, "%s:%d: %s: expected %s, got %s", c->name, at, k->name, expected_kind(k), node_kind(v));
    const char *s = NULL;
    if (scalar_text(c, v, k->name, &s)) return -1;
    if (key_set(c->r, k, s, v->data.scalar.style != YAML_PLAIN_SCALAR_STYLE, c->err)) return q_err_wrap(c->err, "%s:%d", c->name, at);
    return 0;
}

static int walk_mapping(parse_ctx *c, const yaml_node_t *m, const char *prefix) {
    for (yaml_node_pair_t *p = m->data.mapping.pairs.start; p < m->data.mapping.pairs.top; p++) {
        const yaml_node_t *kn = yaml_document_get_node(c->doc, p->key);
        const yaml_node_t *vn = yaml_document_get_node(c->doc, p->value);
        const int at = node_line(kn);
        if (kn->type != YAML_SCALAR_NODE)
            return q_err_set(c->err, "%s:%d: keys must be plain names, got %s", c->name, at, node_kind(kn));
        char name[256];
        const char *kt = (const char *)kn->data.scalar.value;
        if ((size_t)snprintf(name, sizeof name, "%s%s%s", prefix, *prefix ? "." : "", kt) >= sizeof name)
            return q_err_set(c->err, "%s:%d: key too long", c->name, at);
        char where[300];
        snprintf(where, sizeof where, "%s:%d: ", c->name, at);

        const int ki = key_find(name);
        if (ki >= 0) {
            if (c->line[ki])
                return q_err_set(c->err, "%s:%d: duplicate key '%s' (first set at line %d)", c->name, at, name,
                                 c->line[ki]);
            c->line[ki] = at;
            if (set_from_node(c, ki, vn)) return -1;
        } else if (is_section(name)) {
            if (vn->type == YAML_MAPPING_NODE) {
                if (walk_mapping(c, vn, name)) return -1;
            } else if (!(vn->type == YAML_SCALAR_NODE && vn->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
                         is_null_text((const char *)vn->data.scalar.value))) {  // "lora:" alone is an empty section
                char list[256];
                return q_err_set(c->err, "%s:%d: '%s' is a section: write its keys under it (%s), not %s",
                                 c->name, at, name, section_keys(name, list, sizeof list), node_kind(vn));
            }
        } else {
            return unknown_key(c->err, where, name);
        }
    }
    return 0;
}

int recipe_parse(recipe *r, const char *yaml, size_t len, const char *name, q_err *err) {
    if (!name) name = "<recipe>";
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser)) return q_err_set(err, "%s: out of memory", name);
    yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, len);
    if (!yaml_parser_load(&parser, &doc)) {
        const yaml_mark_t *m = parser.problem_mark.line || parser.problem_mark.column ? &parser.problem_mark
                                                                                      : &parser.context_mark;
        q_err_set(err, "%s:%d: YAML syntax error: %s%s%s (column %d)", name, (int)m->line + 1,
                  parser.problem ? parser.problem : "unknown problem", parser.context ? " " : "",
                  parser.context ? parser.context : "", (int)m->column + 1);
        yaml_parser_delete(&parser);
        return -1;
    }
    recipe work = *r;  // a failed parse leaves *r untouched
    parse_ctx c = {.doc = &doc, .name = name, .r = &work, .err = err};
    int rc = 0;
    const yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        // an empty file sets nothing
    } else if (root->type == YAML_MAPPING_NODE) {
        rc = walk_mapping(&c, root, "");
    } else if (!(root->type == YAML_SCALAR_NODE && is_null_text((const char *)root->data.scalar.value))) {
        rc = q_err_set(err, "%s:%d: a recipe is a mapping of keys (lora.r: 16, ...), got %s", name, node_line(root),
                       node_kind(root));
    }
    yaml_document_delete(&doc);
    if (rc == 0) {  // a second document would be silently ignored: refuse it
        yaml_document_t next;
        if (!yaml_parser_load(&parser, &next)) {
            rc = q_err_set(err, "%s:%d: YAML syntax error: %s", name, (int)parser.problem_mark.line + 1,
                           parser.problem ? parser.problem : "unknown problem");
        } else {
            const yaml_node_t *n = yaml_document_get_root_node(&next);
            if (n) rc = q_err_set(err, "%s:%d: more than one YAML document; a recipe is one", name, node_line(n));
            yaml_document_delete(&next);
        }
    }
    yaml_parser_delete(&parser);
    if (rc == 0) rc = recipe_check(&work, c.line, name, err);
    if (rc == 0) *r = work;
    return rc;
}

int recipe_load(recipe *r, const char *path, q_err *err) {
    char *text;
    size_t size;
    if (q_file_read(path, &text, &size, err)) return -1;
    const int rc = recipe_parse(r, text, size, path, err);
    free(text);
    return rc;
}

int recipe_override(recipe *r, const char *assignment, q_err *err) {
    const char *eq = strchr(assignment, '=');
    if (!eq) return q_err_set(err, "override '%s': expected key=value (for example lora.r=32)", assignment);
    char name[256];
    const size_t n = (size_t)(eq - assignment);
    if (n == 0 || n >= sizeof name) return q_err_set(err, "override '%s': expected key=value", assignment);
    memcpy(name, assignment, n);
    name[n] = 0;
    char where[300];
    snprintf(where, sizeof where, "override '%s': ", assignment);
    const int ki = key_find(name);
    if (ki < 0) return unknown_key(err, where, name);
    recipe work = *r;
    if (key_set(&work, &keys[ki], eq + 1, false, err)) return q_err_wrap(err, "override '%.200s'", assignment);
    // An override of sched.warmup_steps replaces the recipe's warmup_ratio and
    // vice versa. Checks spanning several keys are not run here: overrides come
    // one key at a time, and `data.format=chat data.template=chatml` must not
    // depend on its order.
    const int ws = key_find("sched.warmup_steps"), wr = key_find("sched.warmup_ratio");
    if (ki == ws && work.sched_warmup_steps > 0) work.sched_warmup_ratio = 0;
    if (ki == wr && work.sched_warmup_ratio > 0) work.sched_warmup_steps = 0;
    *r = work;
    return 0;
}

// ----------------------------------------------------------------------------
// writing

// A YAML double-quoted string: escapes for quotes, backslashes and controls;
// UTF-8 passes through.
static int yaml_quoted(q_buf *b, const char *s) {
    if (q_buf_append(b, "\"", 1)) return -1;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        int rc;
        if (*p == '"' || *p == '\\') rc = q_buf_printf(b, "\\%c", *p);
        else if (*p == '\n') rc = q_buf_append(b, "\\n", 2);
        else if (*p == '\t') rc = q_buf_append(b, "\\t", 2);
        else if (*p < 0x20 || *p == 0x7f) rc = q_buf_printf(b, "\\x%02x", *p);
        else rc = q_buf_append(b, p, 1);
        if (rc) return -1;
    }
    return q_buf_append(b, "\"", 1);
}

// Key k's current value as YAML text.
static int write_value(q_buf *b, const recipe *r, const key_def *k) {
    const void *field = (const char *)r + k->off;
    if (k->flags & FIXED) return q_buf_printf(b, "%s", k->def);
    switch (k->type) {
    case KT_INT: return q_buf_printf(b, "%lld", (long long)*(const int64_t *)field);
    case KT_SEED: return q_buf_printf(b, "%llu", (unsigned long long)*(const uint64_t *)field);
    case KT_FLOAT: {
        char v[64];
        q_format_float_repr(*(const double *)field, v, sizeof v);  // shortest text that reads back the same
        return q_buf_printf(b, "%s", v);
    }
    case KT_BOOL: return q_buf_printf(b, "%s", *(const bool *)field ? "true" : "false");
    case KT_STRING: return yaml_quoted(b, (const char *)field);
    case KT_CHOICE: return q_buf_printf(b, "%s", (const char *)field);
    case KT_ONOFF: {
        const char *bar = strchr(k->choices, '|');
        return *(const bool *)field ? q_buf_printf(b, "%s", bar + 1)
                                    : q_buf_printf(b, "%.*s", (int)(bar - k->choices), k->choices);
    }
    case KT_FORMAT: return q_buf_printf(b, "%s", data_format_name(*(const data_format *)field));
    case KT_TEMPLATE: return q_buf_printf(b, "%s", data_template_name(*(const data_template *)field));
    case KT_TARGETS: {
        const uint32_t bits = *(const uint32_t *)field;
        if (bits == (1u << LIN_COUNT) - 1) return q_buf_printf(b, "all-linear");
        int rc = q_buf_append(b, "[", 1);
        bool first = true;
        for (int i = 0; i < LIN_COUNT && !rc; i++)
            if (bits & (1u << i)) rc = q_buf_printf(b, "%s%s", first ? "" : ", ", model_linear_names[i]), first = false;
        return rc ? -1 : q_buf_append(b, "]", 1);
    }
    }
    return -1;
}

int recipe_write_yaml(const recipe *r, q_buf *out) {
    if (q_buf_printf(out, "# qlora recipe, resolved: every key with the value this run used.\n")) return -1;
    char section[32] = "";
    for (int i = 0; i < N_KEYS; i++) {
        const key_def *k = &keys[i];
        const char *dot = strchr(k->name, '.');
        const size_t sl = dot ? (size_t)(dot - k->name) : 0;
        if (dot && (strlen(section) != sl || strncmp(section, k->name, sl) != 0)) {
            snprintf(section, sizeof section, "%.*s", (int)sl, k->name);
            if (q_buf_printf(out, "\n%s:\n", section)) return -1;
        } else if (!dot) {
            section[0] = 0;
        }
        const size_t start = out->len;
        if (q_buf_printf(out, "%s%s: ", dot ? "  " : "", dot ? dot + 1 : k->name) || write_value(out, r, k)) return -1;
        const int width = (int)(out->len - start);
        if (q_buf_printf(out, "%*s# %s\n", width < 40 ? 40 - width : 1, "", k->doc)) return -1;
    }
    return 0;
}

static const char *type_name(const key_def *k) {
    switch (k->type) {
    case KT_INT: case KT_SEED: return "int";
    case KT_FLOAT: return "float";
    case KT_BOOL: return "bool";
    case KT_STRING: return "string";
    case KT_TARGETS: return "list";
    default: return "enum";
    }
}

void recipe_print_keys(FILE *f) {
    fprintf(f, "Recipe keys (YAML, nested `lora: {r: 16}` or dotted `lora.r: 16`; override with key=value):\n\n");
    fprintf(f, "  %-36s %-6s %-12s %s\n", "key", "type", "default", "meaning");
    for (int i = 0; i < N_KEYS; i++) {
        const key_def *k = &keys[i];
        char def[64];
        snprintf(def, sizeof def, "%s", *k->def ? k->def : "\"\"");
        fprintf(f, "  %-36s %-6s %-12s %s", k->name, type_name(k), def, k->doc);
        if (k->choices && !(k->flags & FIXED)) {
            char ch[128];
            choices_text(k->choices, ch, sizeof ch);
            fprintf(f, " [%s]", ch);
        }
        if (k->type == KT_INT || k->type == KT_FLOAT) {
            char range[96];
            range_text(k, range, sizeof range);
            fprintf(f, " (%s%s)", k->flags & POW2 ? "power of 2 " : "", range);
        }
        fputc('\n', f);
    }
}

// After command-line overrides: the same checks, with no key "set in a file"
// (so the warmup pair is judged by value only).
int recipe_validate(recipe *r, q_err *err) {
    int line[N_KEYS];
    memset(line, 0, sizeof line);
    return recipe_check(r, line, "recipe", err);
}
