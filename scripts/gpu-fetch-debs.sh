#!/usr/bin/env bash
# Run HERE (a machine with Debian's archive), before a GPU check: the GPU
# machine is bare and reaches nothing, so the libraries the build needs travel
# as .deb files in .debs/ (git-ignored through .git/info/exclude). Then:
#   device run, carry [".debs"], command "bash scripts/gpu-check.sh"
# gpu-check.sh unpacks them into /tmp/sysroot (never into /) and builds against it.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.debs/' "$exclude" 2>/dev/null || echo '/.debs/' >> "$exclude"
mkdir -p .debs
cd .debs
apt-get update -qq
apt-get download -qq libcunit1 libcunit1-dev libopenblas0-openmp libopenblas-openmp-dev libopenblas-dev \
  libyaml-0-2 libyaml-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libpcre2-dev \
  libutf8proc2 libutf8proc-dev
ls -la
