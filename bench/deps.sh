#!/usr/bin/env bash
# bench/deps.sh - Debian packages the benchmark needs beyond scripts/deps.sh (idempotent, fast when present):
#   nginx-light  the reference HTTP server (a fixed 200) for the HTTP ceiling
#   gnuplot-nox  the PNG plots of docs/PERFORMANCE.md
# Installing nginx does not start it here (policy-rc.d or no init); bench.py runs its own instances.
set -euo pipefail

log() { printf 'bench-deps: %s\n' "$*" >&2; }

PACKAGES=(nginx-light gnuplot-nox)

SUDO=()
if [[ $(id -u) != 0 ]]; then
  command -v sudo >/dev/null || {
    log "ERROR: not root and no sudo: cannot install ${PACKAGES[*]}"
    exit 1
  }
  SUDO=(sudo)
fi

is_installed() {
  [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
  is_installed "$p" || missing+=("$p")
done
# nginx-full or nginx-extras also provide the binary
if [[ " ${missing[*]} " == *" nginx-light "* ]] && command -v nginx >/dev/null; then
  missing=("${missing[@]/nginx-light/}")
fi
if [[ " ${missing[*]} " == *" gnuplot-nox "* ]] && command -v gnuplot >/dev/null; then
  missing=("${missing[@]/gnuplot-nox/}")
fi
read -r -a missing <<<"${missing[*]:-}"
if ((${#missing[@]} > 0)); then
  log "apt-get update"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  log "installing: ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}"
fi
# Debian's package may have started a system nginx on port 80 where services do start; ours use their own ports.
