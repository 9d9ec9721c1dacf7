// train/train.h: the top room. Checkpoint formats and the CLI subcommands.
// It may use every other room; nothing includes it but the binary and tests.
#ifndef QLORA_TRAIN_H
#define QLORA_TRAIN_H

#include "autograd/autograd.h"
#include "core/core.h"
#include "data/data.h"
#include "nf4/nf4.h"

#include <stdio.h>

// ----------------------------------------------------------------------------
// bnb-4bit checkpoints (formats.md section 4): a quantized linear weight P.weight
// is stored as six tensors
//   P.weight                                   U8  [ceil(n/2), 1]  packed codes
//   P.weight.absmax                            U8  [nblocks] (nested) or F32
//   P.weight.quant_map                         F32 [16]
//   P.weight.nested_absmax                     F32 [ceil(nblocks/256)]  (nested)
//   P.weight.nested_quant_map                  F32 [256]                (nested)
//   P.weight.quant_state.bitsandbytes__nf4     U8  [len] JSON, as bitsandbytes writes it

#define BNB4_MAX_ENTRIES 6

// The JSON object of quant_state, byte for byte what Python's json.dumps of
// QuantState.as_dict writes.
int bnb4_quant_state_json(const nf4_tensor *t, q_buf *out);

// The safetensors entries of one quantized weight `name` (for example
// "model.layers.0.self_attn.q_proj.weight"); they point into the tensor and
// into this record, so both must outlive the write.
typedef struct bnb4_record {
    int n;
    q_st_entry entries[BNB4_MAX_ENTRIES];
    char names[BNB4_MAX_ENTRIES][512];
    q_buf json;
} bnb4_record;

int bnb4_record_init(bnb4_record *r, const char *name, const nf4_tensor *t, q_err *err);
void bnb4_record_free(bnb4_record *r);

// True if `name` has a quant_state tensor beside it in the model.
bool bnb4_is_quantized(const q_st_model *m, const char *name);
// Loads quantized weight `name` into a host nf4_tensor (copies), validating
// every size against the quant_state JSON.
int bnb4_load(const q_st_model *m, const char *name, nf4_tensor *t, q_err *err);

// Which weights `qlora quantize` turns into NF4, as transformers does for a
// Llama-family model: the linear layers inside the transformer blocks, never
// embeddings, norms or lm_head.
bool bnb4_should_quantize(const char *name, const q_st_tensor *t);

// ----------------------------------------------------------------------------
// model: a Llama-family causal LM with a frozen NF4 + double-quant base

typedef enum model_arch { MODEL_ARCH_LLAMA, MODEL_ARCH_MISTRAL, MODEL_ARCH_QWEN2 } model_arch;
// "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM": for error messages.
extern const char *const model_supported_architectures;

typedef struct model_config {
    model_arch arch;
    int64_t vocab, hidden, intermediate, n_layers, n_heads, n_kv_heads, head_dim;
    int64_t max_position;
    int64_t sliding_window;       // Mistral; 0 = none
    float rms_eps;
    double rope_theta;
    ag_rope_scaling rope_scaling;  // factor 0 = none
    bool tie_embeddings;
    bool attn_bias;                // q/k/v biases (Qwen2, Llama attention_bias)
    bool o_bias, mlp_bias;         // Llama attention_bias / mlp_bias
    q_dtype dtype;                 // torch_dtype of the checkpoint
} model_config;

// Parses an HF config.json (transformers 4.x rope_scaling or 5.x rope_parameters).
int model_config_parse(model_config *c, const char *json_text, size_t len, const char *name, q_err *err);
int model_config_load(model_config *c, const char *dir, q_err *err);

// The seven linears of a block, in PEFT's module names.
typedef enum model_linear_id {
    LIN_Q, LIN_K, LIN_V, LIN_O, LIN_GATE, LIN_UP, LIN_DOWN, LIN_COUNT
} model_linear_id;
extern const char *const model_linear_names[LIN_COUNT];  // "q_proj", ...
extern const char *const model_linear_parents[LIN_COUNT];  // "self_attn", "mlp"

typedef struct model_layer {
    float *attn_norm;               // [D]
    float *mlp_norm;                // [D]
    nf4_tensor w[LIN_COUNT];        // frozen base: q [H*hd,D], k/v [Hkv*hd,D], o [D,H*hd], gate/up [F,D], down [D,F]
    float *bias[LIN_COUNT];         // [out] or NULL
} model_layer;

typedef struct model {
    model_config cfg;
    float *embed;        // [V,D]
    float *final_norm;   // [D]
    float *lm_head;      // [V,D]; == embed when tied
    model_layer *layers; // [n_layers]
    float *inv_freq;     // [hd/2]
    bool prequantized;   // loaded from a bnb-4bit checkpoint
} model;

// Loads an HF safetensors folder (linear weights quantized to NF4 + double
// quant at `blocksize`), a bnb-4bit checkpoint (used as stored) or a .gguf
// file (model_load_gguf).
int model_load(model *m, const char *path, int64_t blocksize, q_err *err);
// GGUF (llama architecture): F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors dequantized to
// fp32, the Q/K row permutation of convert_hf_to_gguf undone (gguf.md 3.8),
// then the block linears quantized to NF4 + double quant. dtype is F32 (the
// dequantized values are what the file holds).
int model_load_gguf(model *m, const q_gguf *g, int64_t blocksize, q_err *err);
int model_config_from_gguf(model_config *c, const q_gguf *g, q_err *err);
void model_free(model *m);
void model_linear_shape(const model_config *c, model_linear_id id, int64_t *out, int64_t *in);
int64_t model_max_linear_numel(const model_config *c);

// ----------------------------------------------------------------------------
// LoRA adapters: fp16 storage, fp32 compute copies and gradients

typedef struct lora_config {
    int64_t r;
    float alpha;
    float dropout;
    bool rslora;
    uint32_t targets;  // bit (1 << model_linear_id) per targeted module
    uint64_t seed;     // init and dropout
} lora_config;

typedef struct lora_module {
    int64_t r, in, out;
    uint16_t *A16, *B16;  // [r,I], [O,r] the adapter as stored (fp16)
    float *A, *B;         // [r,I], [O,r] fp32 values of A16, B16
    float *dA, *dB;       // [r,I], [O,r] gradients
} lora_module;

typedef struct lora {
    lora_config cfg;
    float scale;
    int64_t n_layers;
    lora_module *mods;    // [n_layers * LIN_COUNT]; r == 0 where not targeted
} lora;

static inline lora_module *lora_mod(const lora *l, int64_t layer, model_linear_id id) {
    return &l->mods[layer * LIN_COUNT + id];
}
// "q_proj"/"q", ..., "all-linear" -> target bits; -1 with an error listing the names.
int lora_targets_parse(const char *name, uint32_t *bits, q_err *err);
// PEFT's default init, seeded: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0.
int lora_init(lora *l, const model *m, const lora_config *c, q_err *err);
// Reads a PEFT folder (adapter_config.json + adapter_model.safetensors).
int lora_load_peft(lora *l, const model *m, const char *dir, q_err *err);
// Writes a PEFT folder (adapter_config.json + adapter_model.safetensors, fp16).
int lora_save_peft(const lora *l, const char *dir, const char *base_model, q_err *err);
// Refreshes the fp32 copies from the fp16 weights.
void lora_sync(lora *l);
void lora_zero_grad(lora *l);
void lora_free(lora *l);
// PEFT's on-disk name of a module's weight: "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight".
void lora_peft_name(char *out, size_t size, int64_t layer, model_linear_id id, char which);

// ----------------------------------------------------------------------------
// one training step

// A batch of B rows of T tokens, flattened to N = B*T.
typedef struct model_batch {
    int64_t B, T, N;
    int32_t *ids;      // [N]
    int32_t *targets;  // [N] the token predicted at each position, AG_IGNORE_INDEX if none
    int32_t *pos;      // [N] position in its document (restarts per document)
    int32_t *start;    // [N] flat index of the first token of its document
} model_batch;

// From HF-style tensors: labels unshifted (labels[t] is the target of
// position t-1, -100 = masked), doc_ids per token (a change of id starts a
// new document; NULL = one document per row). Ids are checked against V.
int model_batch_init(model_batch *b, int64_t B, int64_t T, const int64_t *ids, const int64_t *labels,
                     const int64_t *doc_ids, int64_t vocab, q_err *err);
// From a safetensors file: input_ids [B,T], optional labels (default input_ids)
// and doc_ids, I64 or I32.
int model_batch_load(model_batch *b, const char *path, int64_t vocab, q_err *err);
void model_batch_free(model_batch *b);

typedef struct model_step_opts {
    bool checkpoint;        // recompute each layer in the backward
    int64_t token_chunk;    // cross-entropy chunking (0 = defaults)
    int64_t vocab_chunk;
    float grad_scale;       // 0: 1 / valid targets of this batch
    uint64_t step;          // mixes into the dropout seeds
} model_step_opts;

typedef struct model_step_result {
    double loss;            // mean over valid targets
    double loss_sum;
    int64_t n_valid;
    int64_t peak_bytes;     // activation memory the tapes held at most
} model_step_result;

// The tensors a pass reads, wherever they live: model_weights_host points
// into the model, model_cuda into its device copies. Shapes from the config.
typedef struct model_layer_weights {
    const float *attn_norm, *mlp_norm;   // [D]
    nf4_view w[LIN_COUNT];               // frozen base (arrays on the same side)
    q_dtype w_dtype[LIN_COUNT];          // what the base was quantized from
    const float *bias[LIN_COUNT];        // [out] or NULL
} model_layer_weights;

typedef struct model_weights {
    const model_config *cfg;
    const float *embed, *final_norm, *lm_head;  // [V,D], [D], [V,D]
    const float *inv_freq;                      // [hd/2]
    model_layer_weights *layers;                // [n_layers] (host array)
} model_weights;

// Where one pass runs: the CPU (cuda NULL; batch arrays on the host) or a
// CUDA context (weights, LoRA A/B/dA/dB and batch arrays on the device).
typedef struct model_pass {
    const model_weights *w;
    const lora *l;              // may be NULL; its A, B, dA, dB on the pass's side
    ag_cuda_ctx *cuda;
    const int32_t *ids, *targets, *pos, *start;  // [N] each, on the pass's side
    const model_batch *b;       // the host batch (shape, target count)
} model_pass;

int model_weights_host(model_weights *w, const model *m, q_err *err);  // views into m; free with model_weights_free
void model_weights_free(model_weights *w);
// One pass: forward (and, when training, the backward into the LoRA's
// gradients); logits[N,V] (host memory, CPU passes only) when not NULL.
int model_pass_run(const model_pass *p, const model_step_opts *o, bool training, float *logits,
                   model_step_result *r, q_err *err);

// Forward and backward: LoRA gradients are accumulated into l's dA/dB.
int model_step(const model *m, lora *l, const model_batch *b, const model_step_opts *o, model_step_result *r,
               q_err *err);
// Forward only; logits[N,V] when not NULL, loss when b has targets.
int model_forward(const model *m, const lora *l, const model_batch *b, float *logits, model_step_result *r,
                  q_err *err);

// ----------------------------------------------------------------------------
// the model on a CUDA device (model_cuda.c). The NF4 weights (still 4-bit),
// norms, embedding and LM head are copied to the device once; a step uploads
// the batch and the adapter's current A/B, runs the pass there and adds the
// LoRA gradients into the host adapter's dA/dB, so the optimizer,
// checkpoints and exports are the CPU trainer's own.

typedef struct model_cuda {
    ag_cuda_ctx *ctx;
    model_weights w;            // device pointers (layers: a host array)
    lora l;                     // the adapter's shape, its A/B/dA/dB on the device (no fp16 copies)
    float *lora_dev;            // [2 * lora_numel] A/B values then gradients, one device buffer
    float *lora_host;           // [lora_numel] staging for uploads and downloads
    int64_t lora_numel;         // floats of all A and B together
    int32_t *batch_dev;         // [4 * batch_cap] ids | targets | pos | start
    int64_t batch_cap;
    void **bufs;                // every other device allocation, freed together
    int64_t n_bufs, cap_bufs;
    int64_t weight_bytes;       // device bytes of the uploaded weights
} model_cuda;

// Copies m to the device and makes room for adapters shaped like l (NULL: no
// adapter). Precision of the base and LM-head GEMMs: prec.
int model_cuda_upload(model_cuda *d, const model *m, const lora *l, ag_precision prec, q_err *err);
// As model_step / model_forward (no logits), on the device. l must have the
// shape given to model_cuda_upload.
int model_cuda_step(model_cuda *d, lora *l, const model_batch *b, const model_step_opts *o, model_step_result *r,
                    q_err *err);
int model_cuda_forward(model_cuda *d, const lora *l, const model_batch *b, model_step_result *r, q_err *err);
void model_cuda_free(model_cuda *d);

// ----------------------------------------------------------------------------
// generation: a KV-cached forward, greedy or temperature / top-p sampling

typedef struct gen_opts {
    int64_t max_new_tokens;
    float temperature;     // 0 = greedy
    float top_p;           // 1 = off
    uint64_t seed;
    int32_t stop_id;       // stop after emitting this id (EOS / end of turn), -1 = none
} gen_opts;

// Appends up to max_new_tokens ids after prompt[0..n_prompt) (l may be NULL:
// the base model). *out (malloc'd) holds only the new ids.
int gen_generate(const model *m, const lora *l, const int32_t *prompt, int64_t n_prompt, const gen_opts *o,
                 int32_t **out, int64_t *n_out, q_err *err);
// Logits [n, V] of ids[0..n) as generation computes them: ids[0..n_prefill)
// in one prefill pass, then one decode step per id through the KV cache.
// Tests hold it against model_forward.
int gen_forward_logits(const model *m, const lora *l, const int32_t *ids, int64_t n, int64_t n_prefill,
                       float *logits, q_err *err);

// ----------------------------------------------------------------------------
// recipes: YAML files of dotted keys (recipes-and-qat.md B3). Every key, its
// type, range and default is one row of the table in recipe.c.

typedef struct recipe {
    uint64_t seed;
    char run_dir[1024];          // run.dir: where metrics, checkpoints and the adapter go
    // model
    char model_path[1024];       // model.path: HF folder, bnb-4bit checkpoint or .gguf file
    char tokenizer_path[1024];   // model.tokenizer: tokenizer.json (default: beside the model / in the GGUF)
    // quant
    int64_t quant_block_size;    // quant.block_size
    // lora
    int64_t lora_r;
    double lora_alpha, lora_dropout;
    bool lora_rslora;
    uint32_t lora_targets;       // lora.targets: list of names or "all-linear"
    // data
    char data_path[1024];
    data_format data_format;
    data_template data_template;
    char data_prompt_field[64], data_response_field[64], data_text_field[64];
    char data_system_prompt[1024];
    bool data_train_on_inputs, data_packing, data_skip_bad_lines;
    int64_t data_seq_len, data_max_examples;
    // eval
    double eval_split;
    int64_t eval_max_examples, eval_every_n_steps, eval_max_batches;
    // train
    int64_t train_micro_batch_size, train_gradient_accumulation_steps, train_epochs, train_max_steps;
    bool train_recompute;        // train.recompute: none | all
    int64_t train_threads;       // 0 = all cores
    char train_device[8];        // cpu | cuda
    char train_precision[8];     // fp32 | tf32 | bf16 | fp16: the device's base and LM-head GEMMs
    int64_t train_log_every;
    // optim
    double optim_lr, optim_weight_decay, optim_beta1, optim_beta2, optim_eps, optim_max_grad_norm;
    // sched
    char sched_name[16];         // constant | linear | cosine
    int64_t sched_warmup_steps;
    double sched_warmup_ratio, sched_final_lr_frac;
    // ckpt
    int64_t ckpt_every_n_steps, ckpt_keep;
    // samples: prompts generated from before and after training
    int64_t sample_count, sample_max_new_tokens;
} recipe;

void recipe_defaults(recipe *r);
// Parses YAML text (nested mappings or dotted keys), applied over the
// current values. Unknown keys fail with a "did you mean" suggestion; types
// and ranges are checked; errors name file:line.
int recipe_parse(recipe *r, const char *yaml, size_t len, const char *name, q_err *err);
int recipe_load(recipe *r, const char *path, q_err *err);
// One "key=value" override from the command line (same per-key checks; the
// checks across keys wait for recipe_validate, so overrides may come in any order).
int recipe_override(recipe *r, const char *assignment, q_err *err);
// The checks across keys (warmup_steps vs warmup_ratio, epochs/max_steps, a
// format's fields, ...). recipe_parse runs them; call after overrides.
int recipe_validate(recipe *r, q_err *err);
// The resolved recipe as YAML (every key, grouped), parseable by recipe_parse.
int recipe_write_yaml(const recipe *r, q_buf *out);
// The key table as documentation (key, type, default, meaning), for --help.
void recipe_print_keys(FILE *f);

// ----------------------------------------------------------------------------
// the trainer (trainer.c): runs a recipe into its run folder; with resume it
// continues from the newest loadable checkpoint there. stop_after > 0 pauses
// after that many updates (a checkpoint is written; --resume continues).
int train_run(const recipe *r, bool resume, int64_t stop_after, q_err *err);

// ----------------------------------------------------------------------------
// CLI subcommands: parse their own arguments, print, return an exit code.

int cmd_quantize(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_dequantize(int argc, char **argv);
int cmd_step(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_generate(int argc, char **argv);

#endif  // QLORA_TRAIN_H
