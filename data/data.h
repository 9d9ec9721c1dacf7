// data/data.h: text in, token batches out. The byte-level BPE tokenizer
// (from HF tokenizer.json or GGUF metadata), JSONL datasets in four formats,
// prompt templates, prompt masking, packing and deterministic batching.
// This room knows nothing of models or training; it calls only core/.
#ifndef QLORA_DATA_H
#define QLORA_DATA_H

#include "core/core.h"

#ifdef __cplusplus
extern "C" {
#endif

// ----------------------------------------------------------------------------
// tokenizer: byte-level BPE as HF `tokenizers` runs it for Llama 3, SmolLM
// (1/2) and Qwen2: normalizer (NFC where configured), added/special tokens
// split out first, the pre-tokenizer regexes (PCRE2 with Unicode
// properties), GPT-2 bytes_to_unicode, merges by rank.

typedef struct tok_tokenizer tok_tokenizer;  // opaque

int tok_load_json(tok_tokenizer **out, const char *path, q_err *err);  // tokenizer.json
int tok_load_gguf(tok_tokenizer **out, const q_gguf *g, q_err *err);   // tokenizer.ggml.* (model "gpt2")
void tok_free(tok_tokenizer *t);

// Encodes UTF-8 text exactly as HF's tokenizer.encode(text,
// add_special_tokens=False): no BOS/EOS added. With allow_special, added
// tokens written in the text ("<|im_end|>") become their ids; without it
// they are encoded as ordinary text (user content must never inject control
// tokens). *ids is malloc'd; the caller frees it.
int tok_encode(const tok_tokenizer *t, const char *text, size_t len, bool allow_special, int32_t **ids, int64_t *n,
               q_err *err);
// Decodes ids to UTF-8 (malloc'd, NUL-terminated), as HF's decode with
// skip_special_tokens=False. Invalid UTF-8 sequences become U+FFFD.
int tok_decode(const tok_tokenizer *t, const int32_t *ids, int64_t n, char **text, size_t *len, q_err *err);

int64_t tok_vocab_size(const tok_tokenizer *t);     // including added tokens
int32_t tok_token_id(const tok_tokenizer *t, const char *token);  // -1 when absent
int32_t tok_bos_id(const tok_tokenizer *t);         // -1 when none
int32_t tok_eos_id(const tok_tokenizer *t);         // -1 when none
bool tok_adds_bos(const tok_tokenizer *t);          // the model expects BOS first (post_processor / add_bos_token)

// ----------------------------------------------------------------------------
// datasets

typedef enum data_format {
    DATA_FORMAT_ALPACA,      // {"instruction", "input" (optional), "output"}
    DATA_FORMAT_CHAT,        // {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
    DATA_FORMAT_COMPLETION,  // {prompt_field, response_field}, e.g. GSM8K question/answer
    DATA_FORMAT_TEXT,        // {text_field}: every token is a target
} data_format;

typedef enum data_template {
    DATA_TEMPLATE_CHATML,    // <|im_start|>role\n...<|im_end|>\n (SmolLM2, Qwen2)
    DATA_TEMPLATE_LLAMA3,    // <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>
    DATA_TEMPLATE_ALPACA,    // "Below is an instruction ... ### Instruction: ... ### Response:\n"
    DATA_TEMPLATE_PLAIN,     // prompt, "\n", response
} data_template;

// Names as recipes spell them ("alpaca", "chatml", ...); -1 with the list of valid names.
int data_format_from_name(const char *name, data_format *out, q_err *err);
int data_template_from_name(const char *name, data_template *out, q_err *err);
const char *data_format_name(data_format f);
const char *data_template_name(data_template t);

typedef struct data_config {
    const char *path;            // JSONL file
    data_format format;
    data_template template;
    const char *prompt_field;    // completion: default "question"
    const char *response_field;  // completion: default "answer"
    const char *text_field;      // text: default "text"
    const char *system_prompt;   // chat templates: optional system message, NULL = none
    bool train_on_inputs;        // false (default): prompt tokens are not targets
    bool skip_bad_lines;         // false: a malformed line is an error with file:line
    int64_t seq_len;             // longer examples are truncated (and counted)
    int64_t max_examples;        // 0 = all lines
    double val_fraction;         // share held out for validation (deterministic by seed)
    int64_t val_max;             // cap on validation examples, 0 = no cap
    uint64_t seed;
} data_config;

// One tokenized example. target[i] says whether token i is trained on; the
// EOS (or the template's end-of-turn token) closing the response is a target.
typedef struct data_example {
    int32_t *ids;     // [n]
    uint8_t *target;  // [n]
    int64_t n;
} data_example;

typedef struct data_set {
    data_example *train, *val;  // [n_train], [n_val]
    int64_t n_train, n_val;
    int64_t n_lines;            // non-empty lines read
    int64_t n_skipped;          // malformed lines skipped (skip_bad_lines)
    int64_t n_truncated;        // examples cut to seq_len
    int64_t n_tokens;           // tokens over all kept examples
    int64_t n_target_tokens;
} data_set;

// Reads, validates, formats with the template and tokenizes every line,
// then splits train/validation with a seeded shuffle.
int data_load(data_set *d, const data_config *c, const tok_tokenizer *t, q_err *err);
void data_free(data_set *d);
// Formats and tokenizes one prompt for generation (the template up to where
// the response starts). *ids malloc'd.
int data_prompt_encode(const tok_tokenizer *t, data_template tmpl, const char *system_prompt, const char *prompt,
                       int32_t **ids, int64_t *n, q_err *err);

// ----------------------------------------------------------------------------
// batches

// Rows of T tokens. With packing, whole examples are placed one after
// another in a row while they fit (an example never spans two rows); without
// it, one example per row. The rest of a row is padding: id pad_id, label
// -100, its own document id. Labels follow HF's convention (unshifted:
// labels[t] = ids[t] when token t is a target, else -100); the first token of
// every document is never a target (nothing in its document predicts it).
// The order of examples is a seeded shuffle, redrawn every epoch.
typedef struct data_loader {
    const data_example *ex;
    int64_t n_ex;
    int64_t B, T;
    bool packing;
    int32_t pad_id;
    uint64_t seed;
    int64_t *order;   // [n_ex] this epoch's permutation
    // position: everything needed to resume exactly here
    int64_t epoch;
    int64_t cursor;   // next index into order
} data_loader;

int data_loader_init(data_loader *l, const data_example *ex, int64_t n_ex, int64_t B, int64_t T, bool packing,
                     int32_t pad_id, uint64_t seed, q_err *err);
// Sets the position (from a checkpoint) and redraws that epoch's order.
void data_loader_seek(data_loader *l, int64_t epoch, int64_t cursor);
// Fills one batch: ids, labels, doc_ids, each [B*T] row-major. Wraps into the
// next epoch when the examples run out. Returns the number of target tokens.
int64_t data_loader_next(data_loader *l, int64_t *ids, int64_t *labels, int64_t *doc_ids);
// Batches in one epoch (for schedules and ETA).
int64_t data_loader_batches_per_epoch(const data_loader *l);
void data_loader_free(data_loader *l);

#ifdef __cplusplus
}
#endif
#endif  // QLORA_DATA_H
