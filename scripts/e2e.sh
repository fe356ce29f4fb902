#!/usr/bin/env bash
# e2e.sh - the end-to-end tests (tests/e2e, pytest) against a real Kafka broker and redis-server
# (scripts/stack.sh), the fake LLM (build/fakellm) and the sanitized asyncllm (build/asan/asyncllm).
#
# Usage: scripts/e2e.sh [PYTEST ARGS...]   e.g.  scripts/e2e.sh -k polling -x
#                                                 scripts/e2e.sh tests/e2e/test_followup.py
#   `make e2e` builds the binaries first; run alone, build them with
#   make build/asan/asyncllm build/fakellm
#
# Brings the stack up (scripts/stack.sh up), runs `python3 -m pytest tests/e2e -v ARGS`, and brings
# the stack down again on exit, unless it was already running before (then it is left running).
# Exits with pytest's status; the last line of the output is pytest's summary.
#
# Environment:
#   ASYNCLLM_STACK_DIR, KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), REDIS_PORT (6390)
#                       where the stack lives and listens (see scripts/stack.sh); two runs with
#                       different values do not collide
#   ASYNCLLM_BIN        binary under test (default build/asan/asyncllm)
#   FAKELLM_BIN         fake LLM (default build/fakellm)
#   ASAN_OPTIONS, UBSAN_OPTIONS   default: leaks and errors fatal and reported in the process log
#   ASYNCLLM_E2E_KEEP_STACK=1     leave the stack running at the end
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_DIR"

export KAFKA_PORT=${KAFKA_PORT:-9092}
export KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
export REDIS_PORT=${REDIS_PORT:-6390}
if [[ -n "${ASYNCLLM_STACK_DIR:-}" ]]; then
  export ASYNCLLM_STACK_DIR
fi
export ASYNCLLM_BIN=${ASYNCLLM_BIN:-build/asan/asyncllm}
export FAKELLM_BIN=${FAKELLM_BIN:-build/fakellm}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:exitcode=23}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

log() { printf 'e2e: %s\n' "$*" >&2; }

for b in "$ASYNCLLM_BIN" "$FAKELLM_BIN"; do
  if [[ ! -x "$b" ]]; then
    log "ERROR: $b not found; build it first: make build/asan/asyncllm build/fakellm"
    exit 2
  fi
done
# Run directly (not through make e2e), the binary may predate the sources: say so rather than test old code.
if [[ "$ASYNCLLM_BIN" == build/asan/asyncllm ]]; then
  newer=$(find src -name '*.[ch]' -newer "$ASYNCLLM_BIN" 2>/dev/null | head -3 | tr '\n' ' ')
  newer=${newer% }
  [[ -z "$newer" ]] || log "WARNING: $ASYNCLLM_BIN is older than ${newer}: testing old code (make build/asan/asyncllm)"
fi
for tool in python3 kcat redis-cli; do
  command -v "$tool" >/dev/null || {
    log "ERROR: $tool not found; run scripts/deps.sh"
    exit 2
  }
done
python3 -c 'import pytest' 2>/dev/null || {
  log "ERROR: pytest is not installed for python3; run scripts/deps.sh"
  exit 2
}

# Leave a stack that someone else started running; bring down the one we start.
was_up=0
if scripts/stack.sh status >/dev/null 2>&1; then
  was_up=1
  log "the stack is already running (kafka $KAFKA_PORT, redis $REDIS_PORT): using it and leaving it running"
fi

down_log=$(mktemp "${TMPDIR:-/tmp}/asyncllm-e2e-down.XXXXXX")
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ $was_up == 0 && "${ASYNCLLM_E2E_KEEP_STACK:-0}" != 1 ]]; then
    # Quietly: the last line of the output stays pytest's summary.
    if ! scripts/stack.sh down >"$down_log" 2>&1; then
      cat "$down_log" >&2
      log "WARNING: scripts/stack.sh down failed"
    fi
  else
    # The broker-down test stops and restarts Kafka; make sure it is up as we found it.
    scripts/stack.sh up >"$down_log" 2>&1 || cat "$down_log" >&2
  fi
  rm -f "$down_log"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "bringing up the stack: kafka 127.0.0.1:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT), redis 127.0.0.1:$REDIS_PORT"
scripts/stack.sh up >/dev/null

# Test paths among the arguments (scripts/e2e.sh tests/e2e/test_cli.py) replace the default tests/e2e.
targets=(tests/e2e)
for a in "$@"; do
  if [[ "$a" != -* && ( -e "${a%%::*}" ) ]]; then
    targets=()
    break
  fi
done

log "running the end-to-end tests with $ASYNCLLM_BIN"
rc=0
python3 -m pytest "${targets[@]}" -v "$@" || rc=$?
exit "$rc"
