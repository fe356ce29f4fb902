#!/usr/bin/env bash
# chaos.sh - the chaos test (tests/e2e/test_chaos.py): under continuous submissions, SIGKILL the worker
# several times, restart the Kafka broker once and redis-server once; then every prompt that got a 202 must
# be in a terminal state with exactly one stored result per turn, in order. Prints accepted, rejected (503),
# completed, failed, LLM calls and duplicated LLM calls.
#
# Usage: scripts/chaos.sh [--short] [PYTEST ARGS...]
#   --short   about a minute in all (submissions for ASYNCLLM_CHAOS_SHORT_SECONDS, default 40 s), for
#             `make test`; without it, submissions for ASYNCLLM_CHAOS_SECONDS (default 180 s)
#   Build first: make build/asan/asyncllm build/fakellm (`make chaos` does)
#
# It runs against a stack of its own (scripts/stack.sh via scripts/e2e.sh, brought up and down here, with
# fresh data each time), because it kills and restarts that stack's Kafka and Redis. Its environment, not
# the e2e one (a KAFKA_PORT or REDIS_PORT exported for another stack is ignored: that stack is never touched):
#   ASYNCLLM_CHAOS_STACK_DIR            default <repo>/.stack/chaos
#   ASYNCLLM_CHAOS_KAFKA_PORT           default 19092
#   ASYNCLLM_CHAOS_KAFKA_CONTROLLER_PORT  default 19093
#   ASYNCLLM_CHAOS_REDIS_PORT           default 16390
#   ASYNCLLM_CHAOS_KAFKA=kill|stop      how the broker goes down (default kill: SIGKILL)
#   ASYNCLLM_CHAOS_REDIS=stop|kill      how redis-server goes down (default stop: graceful, AOF saved;
#                                       kill: SIGKILL, see test_chaos.py)
#   ASYNCLLM_CHAOS_SEED                 seed of the submissions (default 1)
#   ASYNCLLM_BIN, FAKELLM_BIN, ASAN_OPTIONS, UBSAN_OPTIONS as for scripts/e2e.sh
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_DIR"

seconds=${ASYNCLLM_CHAOS_SECONDS:-180}
if [[ "${1:-}" == --short ]]; then
  seconds=${ASYNCLLM_CHAOS_SHORT_SECONDS:-40}
  shift
fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || ((seconds < 20)); then
  printf 'chaos: ERROR: the duration must be a whole number of seconds, at least 20 (got %s)\n' "$seconds" >&2
  exit 2
fi
export ASYNCLLM_CHAOS_SECONDS=$seconds

export ASYNCLLM_STACK_DIR=${ASYNCLLM_CHAOS_STACK_DIR:-$REPO_DIR/.stack/chaos}
export KAFKA_PORT=${ASYNCLLM_CHAOS_KAFKA_PORT:-19092}
export KAFKA_CONTROLLER_PORT=${ASYNCLLM_CHAOS_KAFKA_CONTROLLER_PORT:-19093}
export REDIS_PORT=${ASYNCLLM_CHAOS_REDIS_PORT:-16390}
unset ASYNCLLM_E2E_KEEP_STACK

# A fresh cluster each time (unless this stack is running already): the topics of earlier runs would make
# each broker restart slower (a killed broker recovers every partition's log).
if ! "$SCRIPT_DIR/stack.sh" status >/dev/null 2>&1; then
  "$SCRIPT_DIR/stack.sh" reset >/dev/null 2>&1 || true
fi

printf 'chaos: %s s of submissions; stack %s (kafka %s, redis %s)\n' "$seconds" "$ASYNCLLM_STACK_DIR" \
  "$KAFKA_PORT" "$REDIS_PORT" >&2
exec "$SCRIPT_DIR/e2e.sh" tests/e2e/test_chaos.py -s -rA "$@"
