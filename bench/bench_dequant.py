#!/usr/bin/env python3
"""CPU NF4 dequantization: qlora beside bitsandbytes, same tensor, same threads, one run.

  .venv/bin/python bench/bench_dequant.py [--build build] [--threads 2] [--shape 4096 11008]

bitsandbytes quantizes a random bf16 weight (NF4, block 64, double quant);
both dequantize that same state: bitsandbytes with functional.dequantize_4bit
on the CPU, qlora with build/bench_dequant. Prints GB/s of output written and
the ratio, and checks qlora's output equals bitsandbytes' bit for bit.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--build", default="build")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--shape", type=int, nargs=2, default=[4096, 11008])
ap.add_argument("--iters", type=int, default=20)
args = ap.parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(args.threads)
torch.manual_seed(0)
w = (torch.randn(*args.shape) * 0.02).to(torch.bfloat16)
packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

results = []
for dtype in [torch.bfloat16, torch.float32]:
    st.dtype = dtype
    out = F.dequantize_4bit(packed, st)  # warm-up
    ts = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = F.dequantize_4bit(packed, st)
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    nbytes = out.numel() * out.element_size()
    results.append({"impl": "bitsandbytes", "out_dtype": str(dtype).replace("torch.", ""),
                    "numel": out.numel(), "median_s": med, "gbps": nbytes / med / 1e9})
st.dtype = torch.bfloat16
ref = F.dequantize_4bit(packed, st)

with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "w.safetensors")
    tensors = {"w": packed, "ref": ref.contiguous()}
    for k, v in st.as_dict(packed=True).items():
        tensors["w." + k] = v.contiguous()
    save_file(tensors, path)
    exe = os.path.join(args.build, "bench_dequant")
    proc = subprocess.run([exe, path, str(args.iters)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if proc.returncode:
        sys.exit(f"{exe} failed: {proc.stderr}")
    ours = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

print(f"NF4+DQ dequantize, {args.shape[0]}x{args.shape[1]} bf16 weight, block 64, {args.threads} threads, "
      f"bitsandbytes {bnb.__version__}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
print(f"{'output':10} {'bitsandbytes GB/s':>18} {'qlora GB/s':>11} {'ratio':>7}  bit-exact")
summary = {"shape": args.shape, "threads": args.threads, "bitsandbytes": bnb.__version__, "rows": []}
for b in results:
    q = next(r for r in ours if r["out_dtype"] == b["out_dtype"])
    ratio = q["gbps"] / b["gbps"]
    print(f"{b['out_dtype']:10} {b['gbps']:18.2f} {q['gbps']:11.2f} {ratio:6.1f}x  {q['bit_exact_vs_bnb']}")
    summary["rows"].append({"out_dtype": b["out_dtype"], "bnb_gbps": round(b["gbps"], 3),
                            "qlora_gbps": round(q["gbps"], 3), "ratio": round(ratio, 2),
                            "bit_exact": q["bit_exact_vs_bnb"]})
print(json.dumps(summary))
