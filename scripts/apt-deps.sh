#!/usr/bin/env bash
# Sourced by quickstart.sh and test.sh: installs the named Debian packages
# that are missing (apt, by name), with sudo when not root. The build's own
# libraries are listed once here.
QLORA_BUILD_DEPS=(cmake gcc make libomp-dev libopenblas-openmp-dev libyaml-dev libpcre2-dev libutf8proc-dev)
qlora_apt_install() {
  local need=() pkg
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
  [ ${#need[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  echo "== installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
}
