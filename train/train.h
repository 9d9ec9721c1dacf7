// train/train.h: the top room. Checkpoint formats and the CLI subcommands.
// It may use every other room; nothing includes it but the binary and tests.
#ifndef QLORA_TRAIN_H
#define QLORA_TRAIN_H

#include "core/core.h"
#include "nf4/nf4.h"

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
// CLI subcommands: parse their own arguments, print, return an exit code.

int cmd_quantize(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_dequantize(int argc, char **argv);

#endif  // QLORA_TRAIN_H
