#!/usr/bin/env bash
# The README's test command. On a fresh Debian/Ubuntu machine it installs what
# the tests need (apt, by name), builds from scratch and runs every test:
#   1. the normal build (CUDA compiled when nvcc is present; CUDA tests skip
#      with a notice when no GPU is), all CTest suites;
#   2. the AddressSanitizer + UndefinedBehaviorSanitizer build, all suites;
#   3. the safetensors reader under libFuzzer for a bounded time.
# Environment: QLORA_FUZZ_SECONDS (default 60), QLORA_JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${QLORA_JOBS:-$(nproc)}
FUZZ_SECONDS=${QLORA_FUZZ_SECONDS:-60}

# ---------------------------------------------------------------------------
# dependencies (apt, by name; skipped when already installed)
source scripts/apt-deps.sh
qlora_apt_install "${QLORA_BUILD_DEPS[@]}" libcunit1-dev clang libclang-rt-14-dev

# ---------------------------------------------------------------------------
echo "== build (release$(command -v nvcc >/dev/null && echo ', with CUDA'))"
rm -rf build build-asan build-fuzz
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$JOBS"
echo "== tests"
(cd build && ctest --output-on-failure)

echo "== sanitizer build (ASan + UBSan)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DQLORA_SANITIZE=ON -DQLORA_CUDA=OFF >/dev/null
cmake --build build-asan -j "$JOBS"
echo "== tests under ASan + UBSan"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure)

echo "== fuzz the safetensors and GGUF readers for ${FUZZ_SECONDS}s each"
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DQLORA_FUZZ=ON -DQLORA_CUDA=OFF >/dev/null
cmake --build build-fuzz -j "$JOBS" --target fuzz_safetensors fuzz_gguf
corpus=$(mktemp -d)
cp tests/fuzz/corpus/* "$corpus"/
./build-fuzz/fuzz_safetensors -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 "$corpus" 2>&1 | tail -n 12
rm -rf "$corpus"
corpus=$(mktemp -d)
cp tests/fixtures/gguf/types.gguf tests/fixtures/gguf/llama_gqa_tied_q8_0.gguf "$corpus"/
./build-fuzz/fuzz_gguf -max_total_time="$FUZZ_SECONDS" -max_len=65536 -print_final_stats=1 "$corpus" 2>&1 | tail -n 6
rm -rf "$corpus"
echo "== all tests passed"
