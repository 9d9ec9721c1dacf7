#!/usr/bin/env python3
"""Loads an adapter qlora trained into PEFT and compares one forward with qlora's.

  .venv/bin/python scripts/check_peft_adapter.py MODEL.gguf RUN_DIR/adapter [--qlora build/qlora]

transformers reads the GGUF base (dequantized to fp32), PEFT loads qlora's
adapter_config.json + adapter_model.safetensors (it must report no missing or
unexpected keys), and the script prints the loss of one GSM8K example with
and without the adapter, from PyTorch and from `qlora step` (qlora quantizes
the same GGUF weights to NF4, so the two differ by that quantization only).
Needs: torch, transformers, peft, gguf, safetensors (pip).
"""
import argparse
import json
import os
import subprocess
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("adapter")
ap.add_argument("--qlora", default="build/qlora")
args = ap.parse_args()

d, f = os.path.split(os.path.abspath(args.gguf))
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
row = json.loads(open("datasets/gsm8k/dev.jsonl").readline())
text = (f"<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n{row['answer']}<|im_end|>\n")
ids = torch.tensor([tok.encode(text)])
with torch.no_grad():
    base = model(ids, labels=ids).loss.item()
peft_model = PeftModel.from_pretrained(model, args.adapter)
sd = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
assert n_lora == len(sd), f"PEFT made {n_lora} LoRA tensors, the file holds {len(sd)}"
with torch.no_grad():
    tuned = peft_model(ids, labels=ids).loss.item()

with tempfile.TemporaryDirectory() as tmp:
    batch = os.path.join(tmp, "batch.safetensors")
    save_file({"input_ids": ids, "labels": ids.clone()}, batch)
    out = {}
    for name, extra in (("base", ["--lora-r", "1"]), ("tuned", ["--adapter", args.adapter])):
        o = os.path.join(tmp, name + ".safetensors")
        subprocess.run([args.qlora, "step", args.gguf, "--batch", batch, "--out", o] + extra, check=True,
                       capture_output=True)
        out[name] = load_file(o)["loss"].item()
print(f"PEFT loaded {len(sd)} LoRA tensors (no missing/unexpected keys)")
print(f"loss on one GSM8K dev example: torch base {base:.4f} -> with adapter {tuned:.4f}; "
      f"qlora base {out['base']:.4f} -> with adapter {out['tuned']:.4f}")
