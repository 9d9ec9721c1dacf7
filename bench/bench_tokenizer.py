#!/usr/bin/env python3
"""Tokenizer encode throughput: qlora beside HF `tokenizers`, one thread, same text, same ids.

  .venv/bin/python bench/bench_tokenizer.py [--build build] [--tokenizer T.json] [--text FILE] [--iters 5]

Defaults: the SmolLM2 tokenizer (tests/fixtures/tokenizers/smollm2/tokenizer.json) on
/work/shared/datasets/tinyshakespeare.txt. Both encode with add_special_tokens=False and
special tokens in the text treated as text (HF: encode_special_tokens=True; qlora:
allow_special=false), in two modes:
  whole  the file as one string (tok.encode / tok_encode)
  lines  line by line, each with its newline (HF: encode_batch on splitlines(keepends=True),
         one Rust call; qlora: one tok_encode per line)
HF runs single-threaded (TOKENIZERS_PARALLELISM=false, RAYON_NUM_THREADS=1). Prints MB/s and
tokens/s of both, the ratio, and whether the ids are identical in both modes.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ap = argparse.ArgumentParser()
ap.add_argument("--build", default=os.path.join(ROOT, "build"))
ap.add_argument("--tokenizer", default=os.path.join(ROOT, "tests/fixtures/tokenizers/smollm2/tokenizer.json"))
ap.add_argument("--text", default="/work/shared/datasets/tinyshakespeare.txt")
ap.add_argument("--iters", type=int, default=5)
args = ap.parse_args()

text = open(args.text, encoding="utf-8", newline="").read()
nbytes = len(text.encode("utf-8"))
lines = text.splitlines(keepends=True)
assert "".join(lines) == text
if any(not (line.endswith("\n") or line is lines[-1]) for line in lines):
    sys.exit("the text has line breaks other than \\n; qlora's line mode splits on \\n only")

tok = Tokenizer.from_file(args.tokenizer)
tok.encode_special_tokens = True


def timed(fn):
    ts, out = [], None
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


hf = {}
med, enc = timed(lambda: tok.encode(text, add_special_tokens=False).ids)
hf["whole"] = {"tokens": len(enc), "median_s": med, "MB_per_s": nbytes / med / 1e6, "tokens_per_s": len(enc) / med}
hf_whole = np.array(enc, dtype=np.int32)
med, encs = timed(lambda: [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)])
flat = [i for ids in encs for i in ids]
hf["lines"] = {"tokens": len(flat), "median_s": med, "MB_per_s": nbytes / med / 1e6, "tokens_per_s": len(flat) / med}
hf_lines = np.array(flat, dtype=np.int32)

with tempfile.TemporaryDirectory() as d:
    prefix = os.path.join(d, "ids")
    exe = os.path.join(args.build, "bench_tokenizer")
    res = subprocess.run([exe, args.tokenizer, args.text, str(args.iters), "--ids", prefix],
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{exe} failed: {res.stderr}")
    ours = json.loads(res.stdout)
    same = {m: np.array_equal(np.fromfile(f"{prefix}.{m}.i32", dtype=np.int32), ref)
            for m, ref in (("whole", hf_whole), ("lines", hf_lines))}

print(f"text: {args.text} ({nbytes} bytes, {len(lines)} lines); tokenizer: {args.tokenizer}")
print(f"HF tokenizers {tokenizers.__version__}, 1 thread; qlora load {ours['load_s'] * 1000:.1f} ms")
for m in ("whole", "lines"):
    h, q = hf[m], ours[m]
    print(f"  {m:5s}  HF {h['MB_per_s']:7.2f} MB/s {h['tokens_per_s'] / 1e6:6.2f} Mtok/s | "
          f"qlora {q['MB_per_s']:7.2f} MB/s {q['tokens_per_s'] / 1e6:6.2f} Mtok/s | "
          f"x{q['MB_per_s'] / h['MB_per_s']:.2f} | {q['tokens']} tokens, ids identical: {same[m]}")
print(json.dumps({"hf": hf, "qlora": {k: ours[k] for k in ("whole", "lines")}, "ids_identical": same,
                  "tokenizers_version": tokenizers.__version__}))
if not all(same.values()):
    sys.exit("ids differ from HF")
