#!/usr/bin/env python3
"""Write a randomly initialised Llama-architecture model as an HF folder
(config.json + model.safetensors, bf16), shaped like SmolLM2-135M by default.

  python scripts/make_random_llama.py OUT_DIR [--layers 30] [--hidden 576] ...

Needs only numpy (the file is written here: numpy has no bfloat16). The quickstart uses it to have a model of a
real size to quantize until qlora reads the GGUF release of SmolLM2 itself.
"""
import argparse
import json
import os

import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--layers", type=int, default=30)
ap.add_argument("--hidden", type=int, default=576)
ap.add_argument("--intermediate", type=int, default=1536)
ap.add_argument("--heads", type=int, default=9)
ap.add_argument("--kv-heads", type=int, default=3)
ap.add_argument("--vocab", type=int, default=49152)
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()

rng = np.random.default_rng(a.seed)
hd = a.hidden // a.heads


def bf16(shape, std=0.02):
    # float32 -> bfloat16 bits, round to nearest even, stored as uint16 then viewed by safetensors as BF16
    x = (rng.standard_normal(shape, dtype=np.float32) * std).view(np.uint32)
    return ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype(np.uint16)


tensors = {"model.embed_tokens.weight": bf16((a.vocab, a.hidden)),
           "model.norm.weight": np.full(a.hidden, 0x3F80, np.uint16)}
for i in range(a.layers):
    p = f"model.layers.{i}."
    tensors[p + "input_layernorm.weight"] = np.full(a.hidden, 0x3F80, np.uint16)
    tensors[p + "post_attention_layernorm.weight"] = np.full(a.hidden, 0x3F80, np.uint16)
    tensors[p + "self_attn.q_proj.weight"] = bf16((a.heads * hd, a.hidden))
    tensors[p + "self_attn.k_proj.weight"] = bf16((a.kv_heads * hd, a.hidden))
    tensors[p + "self_attn.v_proj.weight"] = bf16((a.kv_heads * hd, a.hidden))
    tensors[p + "self_attn.o_proj.weight"] = bf16((a.hidden, a.heads * hd))
    tensors[p + "mlp.gate_proj.weight"] = bf16((a.intermediate, a.hidden))
    tensors[p + "mlp.up_proj.weight"] = bf16((a.intermediate, a.hidden))
    tensors[p + "mlp.down_proj.weight"] = bf16((a.hidden, a.intermediate))

os.makedirs(a.out, exist_ok=True)
# safetensors layout: u64 header length, JSON header padded to 8 bytes, raw data
path = os.path.join(a.out, "model.safetensors")
header, offset = {"__metadata__": {"format": "pt"}}, 0
for name in sorted(tensors):
    t = tensors[name]
    header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-(8 + len(h)) % 8)
with open(path, "wb") as f:
    f.write(len(h).to_bytes(8, "little"))
    f.write(h)
    for name in sorted(tensors):
        f.write(tensors[name].tobytes())
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
    "intermediate_size": a.intermediate, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
    "num_key_value_heads": a.kv_heads, "head_dim": hd, "vocab_size": a.vocab, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "hidden_act": "silu", "torch_dtype": "bfloat16",
}
with open(os.path.join(a.out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
print(f"wrote {a.out}: {sum(t.size for t in tensors.values()) / 1e6:.1f}M random parameters")
