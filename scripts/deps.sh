#!/usr/bin/env bash
# deps.sh - install what asyncllm needs to build, test and run its local stack (Debian 12, root or sudo).
#
# Idempotent and fast: every package is checked with dpkg-query first, and `apt-get update` +
# `apt-get install -y` run only for what is missing (printed before installing).
#   build:  gcc make pkg-config librdkafka-dev libhiredis-dev libevent-dev libcurl4-openssl-dev libssl-dev
#           libjansson-dev libcmocka-dev clang-format
#   stack:  redis-server redis-tools kcat maven, openjdk-17-jre-headless (only when no java >= 17
#           is on PATH); the Kafka jars themselves come from Maven Central (scripts/kafka-fetch.sh)
#   tests:  python3 and pytest (Debian's python3-pytest, or `pip install pytest` as a fallback); from PyPI
#           with pip, into the python3 that runs pytest: openai (the official SDK, with the Responses API's
#           stream resume), schemathesis 4 and openapi-spec-validator (tests of docs/openapi.yaml)
# Installing Debian's redis-server may start a system redis on 6379; it is left alone (our stack
# uses REDIS_PORT=6390).
set -euo pipefail

log() { printf 'deps: %s\n' "$*" >&2; }

PACKAGES=(
  gcc make pkg-config
  librdkafka-dev libhiredis-dev libevent-dev libcurl4-openssl-dev libssl-dev libjansson-dev libcmocka-dev
  clang-format
  redis-server redis-tools kcat maven
  python3
)

SUDO=()
if [[ $(id -u) != 0 ]]; then
  command -v sudo >/dev/null || {
    log "ERROR: not root and no sudo: cannot install packages"
    exit 1
  }
  SUDO=(sudo)
fi

is_installed() {
  [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

# Major version of the java on PATH, or 0.
java_major() {
  local out
  command -v java >/dev/null || {
    echo 0
    return
  }
  out=$(java -version 2>&1) || true
  if [[ "$out" =~ version\ \"(1\.)?([0-9]+) ]]; then
    echo "${BASH_REMATCH[2]}"
  else
    echo 0
  fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  is_installed "$p" || missing+=("$p")
done
if (($(java_major) < 17)); then
  is_installed openjdk-17-jre-headless || missing+=(openjdk-17-jre-headless)
fi

apt_updated=0
apt_install() {
  if ((apt_updated == 0)); then
    log "apt-get update"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "installing: $*"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "$@"
}

if ((${#missing[@]} > 0)); then
  apt_install "${missing[@]}"
fi

if ! python3 -c 'import pytest' 2>/dev/null; then
  if ! apt_install python3-pytest || ! python3 -c 'import pytest' 2>/dev/null; then
    log "python3-pytest did not work; trying pip install pytest"
    if ! python3 -m pip --version >/dev/null 2>&1; then
      apt_install python3-pip
    fi
    # Debian 12 marks its Python as externally managed (PEP 668).
    python3 -m pip install --quiet pytest ||
      python3 -m pip install --quiet --break-system-packages pytest
  fi
fi

# Python packages from PyPI for the e2e tests, checked from their installed metadata (quick, no import) and,
# for the SDK, the feature the tests use (resuming a stream: retrieve(..., starting_after=N)); a second run
# installs nothing.
py_missing() {
  python3 - <<'PY' 2>/dev/null
import importlib.metadata as md
import importlib.util
import pathlib


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


need = []
spec = importlib.util.find_spec("openai")
src = pathlib.Path(spec.origin).parent / "resources" / "responses" / "responses.py" if spec and spec.origin else None
if not (version("openai") and src and src.exists() and "starting_after" in src.read_text()):
    need.append("openai>=1.100")
if not (version("schemathesis") or "").startswith("4."):
    need.append("schemathesis>=4,<5")
if not (version("openapi-spec-validator") and version("jsonschema") and version("PyYAML")):
    need.append("openapi-spec-validator")
print(" ".join(need))
PY
}
pip_install() {
  if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip
  fi
  log "pip install: $*"
  # Debian 12 marks its Python as externally managed (PEP 668); and pip cannot upgrade a package that Debian
  # installed (no RECORD file), hence the last form, which installs over it into /usr/local.
  python3 -m pip install --quiet "$@" ||
    python3 -m pip install --quiet --break-system-packages "$@" ||
    python3 -m pip install --quiet --break-system-packages --ignore-installed "$@"
}
py_need=$(py_missing) || py_need="openai>=1.100 schemathesis>=4,<5 openapi-spec-validator"
if [[ -n "$py_need" ]]; then
  # shellcheck disable=SC2086 # one word per requirement
  pip_install -U $py_need
  py_need=$(py_missing)
  if [[ -n "$py_need" ]]; then
    log "ERROR: still missing for python3 after pip install: $py_need"
    exit 1
  fi
fi

if ((${#missing[@]} == 0)); then
  log "all packages present"
fi
if (($(java_major) < 17)); then
  log "WARNING: java on PATH is older than 17; Kafka 4 needs 17+ (try update-alternatives --config java)"
fi
