#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA for the local GPU, run every test
# (the CUDA suites under compute-sanitizer, then normally), run the GPU
# benchmarks, and write the log to $OUT (or ./gpu-check-out). Commit the log
# under bench/results/ with its date, commit and device.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
log="$out/gpu-check-$(date -u +%Y%m%d)-$(git rev-parse --short HEAD 2>/dev/null || echo nogit).log"
exec > >(tee "$log") 2>&1

echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
nvcc --version | tail -n 1

command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
# Libraries: installed, or carried as .deb files (scripts/gpu-fetch-debs.sh;
# the GPU machine reaches no archive) and unpacked into /tmp/sysroot.
cmake_extra=()
if [ -d .debs ] && ls .debs/*.deb >/dev/null 2>&1; then
  for f in .debs/*.deb; do dpkg -x "$f" /tmp/sysroot; done
  arch=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
  export LD_LIBRARY_PATH="/tmp/sysroot/usr/lib/$arch/openblas-openmp:/tmp/sysroot/usr/lib/$arch:${LD_LIBRARY_PATH:-}"
  cmake_extra+=(-DCMAKE_PREFIX_PATH=/tmp/sysroot/usr)
  echo "libraries: from .debs via /tmp/sysroot"
fi

status=0
rm -rf build-gpu
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native "${cmake_extra[@]}" >/dev/null \
  && cmake --build build-gpu -j "$(nproc)" || { echo "BUILD FAILED"; exit 1; }

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
# the suites that launch CUDA kernels (the rest are CPU-only and run below)
cuda_suites="test_nf4 test_ops_cuda test_attention_cuda test_loss_cuda test_linear_cuda test_model_cuda"
for t in $cuda_suites; do
  [ -x "build-gpu/$t" ] || { echo "MISSING build-gpu/$t"; status=1; continue; }
  if [ -n "$sanitizer" ]; then
    echo "== $t under compute-sanitizer (memcheck)"
    "$sanitizer" --tool memcheck --error-exitcode 99 "build-gpu/$t" || status=1
  fi
done
# the kernels that share memory between threads: races and barrier misuse
for t in test_attention_cuda test_loss_cuda test_ops_cuda; do
  [ -n "$sanitizer" ] && [ -x "build-gpu/$t" ] || continue
  for tool in racecheck synccheck; do
    echo "== $t under compute-sanitizer ($tool)"
    "$sanitizer" --tool "$tool" --error-exitcode 99 "build-gpu/$t" 2>&1 | tail -n 20 || { echo "$tool FAILED on $t"; status=1; }
  done
done
echo "== all tests"
(cd build-gpu && ctest --output-on-failure) || status=1

echo "== benchmarks"
if [ -x build-gpu/bench_dequant_cuda ]; then build-gpu/bench_dequant_cuda || status=1; fi
if [ -x build-gpu/bench_step_cuda ]; then build-gpu/bench_step_cuda --cpu-steps 1 --gpu-steps 5 || status=1; fi
echo "== gpu-check finished with status $status"
exit $status
