#!/usr/bin/env python3
"""One CPU training step (forward + backward): qlora beside PyTorch + PEFT, same model, same batch, same threads.

  .venv/bin/python bench/bench_step.py [--build build] [--threads 2] [--seq 512] [--batch 1] [--iters 3]
                                       [--layers 30] [--lora-r 16] [--checkpoint] [--workdir DIR]

The model is SmolLM2-135M's shape (Llama: hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536,
vocab 49152, tied embeddings), random init with a fixed seed, written as an HF folder (bf16); the batch is
random input_ids [B,T] with labels = input_ids. Each contender runs in its own process, so peak RSS
(getrusage ru_maxrss, load included) is its own:

  qlora           BUILD/qlora step --repeat ITERS: base quantized to NF4 + double quant at load, fp32 compute,
                  fresh all-linear LoRA (r, alpha 2r)
  torch nf4       transformers + bitsandbytes BitsAndBytesConfig(nf4, double quant, fp32 compute) on the CPU,
                  the rest fp32, sdpa attention, PEFT LoraConfig(r, alpha 2r, all-linear, dropout 0)
  torch fp32      the same without quantization: frozen fp32 base + PEFT, the fastest PyTorch CPU baseline

Each does one warm-up step, then ITERS timed steps of loss = model(ids, labels).loss; loss.backward();
tokens/s = B*T / mean step time. With --checkpoint, qlora gets --checkpoint and torch uses gradient
checkpointing (non-reentrant). Prints a table, the qlora/torch ratios, and one JSON line with every number.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--build", default="build")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--seq", type=int, default=512)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--iters", type=int, default=3)
ap.add_argument("--layers", type=int, default=30)
ap.add_argument("--lora-r", type=int, default=16)
ap.add_argument("--checkpoint", action="store_true")
ap.add_argument("--workdir", help="where the model and batch go (default: a temp dir, removed after)")
ap.add_argument("--torch-worker", choices=["nf4", "fp32"], help=argparse.SUPPRESS)  # internal: one torch run
args = ap.parse_args()
for var in ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]:
    os.environ[var] = str(args.threads)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(args.threads)

# SmolLM2-135M
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": args.layers, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
}


def write_model(d):
    """Random init (normal, std 0.02; norms 1), bf16, as an HF folder."""
    g = torch.Generator().manual_seed(0)
    c = CONFIG
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": w(c["vocab_size"], h),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "self_attn.q_proj.weight"] = w(h, h)
        t[p + "self_attn.k_proj.weight"] = w(kv, h)
        t[p + "self_attn.v_proj.weight"] = w(kv, h)
        t[p + "self_attn.o_proj.weight"] = w(h, h)
        t[p + "mlp.gate_proj.weight"] = w(c["intermediate_size"], h)
        t[p + "mlp.up_proj.weight"] = w(c["intermediate_size"], h)
        t[p + "mlp.down_proj.weight"] = w(h, c["intermediate_size"])
    os.makedirs(d, exist_ok=True)
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    return sum(x.numel() for x in t.values())


def write_batch(path):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), generator=g, dtype=torch.int64)
    save_file({"input_ids": ids, "labels": ids.clone()}, path)


def torch_worker(model_dir, batch_path):
    """One torch contender in this process; prints one JSON line."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {"dtype": torch.float32, "attn_implementation": "sdpa", "device_map": "cpu"}
    if args.torch_worker == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if args.checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    r = args.lora_r
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    load_s = time.perf_counter() - t0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n4 = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")

    b = load_file(batch_path)
    ids, labels = b["input_ids"], b["labels"]

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.iters)]
    dt = (time.perf_counter() - t0) / args.iters
    print(json.dumps({
        "tokens": ids.numel(), "step_s": dt, "tokens_per_s": ids.numel() / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mb": rss_load,
        "load_s": load_s, "loss": losses[-1], "linear4bit_modules": n4,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "attn": model.config._attn_implementation, "checkpoint": args.checkpoint}))


def run_json(cmd, what):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        return {"error": f"{what} failed: {e}"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        return {"error": f"{what} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()[-1500:]}"}
    return json.loads(lines[-1])


if args.torch_worker:
    torch_worker(os.path.join(args.workdir, "model"), os.path.join(args.workdir, "batch.safetensors"))
    sys.exit(0)

load_before = os.getloadavg()  # others on this machine skew the timings: recorded, and warned about
tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_step_")
work = args.workdir or tmp.name
model_dir, batch_path = os.path.join(work, "model"), os.path.join(work, "batch.safetensors")
n_params = write_model(model_dir)
write_batch(batch_path)

exe = os.path.join(args.build, "qlora")
qcmd = [exe, "step", model_dir, "--batch", batch_path, "--lora-r", str(args.lora_r), "--repeat", str(args.iters)]
if args.checkpoint:
    qcmd.append("--checkpoint")
me = [sys.executable, os.path.abspath(__file__), "--workdir", work, "--threads", str(args.threads),
      "--layers", str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch),
      "--iters", str(args.iters), "--lora-r", str(args.lora_r)] + (["--checkpoint"] if args.checkpoint else [])
rows = {"qlora": run_json(qcmd, "qlora step"),
        "torch_nf4": run_json(me + ["--torch-worker", "nf4"], "torch + bitsandbytes nf4"),
        "torch_fp32": run_json(me + ["--torch-worker", "fp32"], "torch fp32")}
if tmp:
    tmp.cleanup()

labels = {"qlora": "qlora (nf4+dq, fp32 compute)",
          "torch_nf4": "torch + bnb nf4+dq + peft",
          "torch_fp32": "torch fp32 base + peft"}
if "error" in rows["torch_nf4"]:
    labels["torch_fp32"] = "torch fp32 base (bnb 4-bit unavailable on CPU)"

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402

cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor())
print(f"train step (forward + backward), {n_params / 1e6:.1f}M-parameter Llama (SmolLM2-135M shape, "
      f"{args.layers} layers), batch {args.batch}x{args.seq}, LoRA r {args.lora_r} all-linear, "
      f"{args.threads} threads, checkpoint {'on' if args.checkpoint else 'off'}")
print(f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, bitsandbytes {bnb.__version__}, "
      f"torch attention: sdpa, qlora gemm: {rows['qlora'].get('gemm', '?')}")
print(f"{'':46} {'tokens/s':>9} {'step s':>8} {'peak RSS MB':>12} {'loss':>8}")
for k, r in rows.items():
    if "error" in r:
        print(f"{labels[k]:46} {'failed':>9}")
        continue
    print(f"{labels[k]:46} {r['tokens_per_s']:9.1f} {r['step_s']:8.3f} {r['peak_rss_mb']:12.1f} {r['loss']:8.4f}")
ratios = {}
q = rows["qlora"]
for k in ["torch_nf4", "torch_fp32"]:
    t = rows[k]
    if "error" in q or "error" in t:
        continue
    ratios[k] = {"tokens_per_s": q["tokens_per_s"] / t["tokens_per_s"], "peak_rss": q["peak_rss_mb"] / t["peak_rss_mb"]}
    print(f"qlora / {labels[k]:38} speed {ratios[k]['tokens_per_s']:5.2f}x   memory {ratios[k]['peak_rss']:5.2f}x")
for k, r in rows.items():
    if "error" in r:
        print(f"{k}: {r['error']}", file=sys.stderr)
if load_before[0] > 0.5:
    print(f"note: load average was {load_before[0]:.2f} before the runs (other processes on the machine); "
          f"timings may be skewed", file=sys.stderr)

print(json.dumps({
    "model": {"params": n_params, "layers": args.layers, "shape": "SmolLM2-135M", "init": "random, seed 0"},
    "batch": args.batch, "seq": args.seq, "iters": args.iters, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r,
    "checkpoint": args.checkpoint, "threads": args.threads, "cpu": cpu, "cores": os.cpu_count(),
    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                 "bitsandbytes": bnb.__version__, "python": platform.python_version()},
    "labels": labels, "rows": rows, "ratios_qlora_over": ratios}))
