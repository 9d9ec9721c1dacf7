#!/usr/bin/env bash
# The README's quickstart. Today it installs what qlora needs, builds it,
# makes a SmolLM2-135M-shaped model (random weights) and quantizes it to NF4
# with double quantization, then prints the checkpoint's summary. The
# fine-tune on GSM8K joins it when training lands (see the issues).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in cmake gcc make libomp-dev libopenblas-dev python3-venv; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== building qlora"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target qlora

model=models/smollm2-135m-shaped-random
if [ ! -f "$model/model.safetensors" ]; then
  echo "== writing a SmolLM2-135M-shaped model with random weights to $model"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q numpy
  .venv/bin/python scripts/make_random_llama.py "$model"
fi

echo "== quantizing to NF4 + double quantization"
rm -rf "$model-nf4"
./build/qlora quantize "$model" "$model-nf4"
echo "== the checkpoint"
./build/qlora inspect "$model-nf4" --summary
