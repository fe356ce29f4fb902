#!/usr/bin/env bash
# run.sh - what `make run` calls after building (make has already run scripts/deps.sh).
#
#   1. scripts/stack.sh up: the local Kafka and Redis (see that script for ports and logs);
#   2. unless ASYNCLLM_LLM_BASE_URL or OPENAI_API_KEY is set, starts the FAKE echo LLM
#      (build/fakellm on 127.0.0.1:${ASYNCLLM_FAKELLM_PORT:-8089}) and points asyncllm at it;
#   3. runs `build/asyncllm all [ARGS...]` in the foreground, with ASYNCLLM_KAFKA_BROKERS,
#      ASYNCLLM_REDIS_HOST and ASYNCLLM_REDIS_PORT set to the local stack.
# Ctrl-C or SIGTERM (or asyncllm exiting by itself) stops asyncllm (SIGTERM, then SIGKILL after
# 20 s), the fake LLM and the stack (stack.sh down): the stack is left down when run.sh ends.
# Exit status: asyncllm's, or 130/143 after Ctrl-C/SIGTERM.
#
# Usage: scripts/run.sh [extra asyncllm flags, e.g. --http-port=8081]
# Environment: everything stack.sh honours (ASYNCLLM_STACK_DIR, KAFKA_PORT, KAFKA_CONTROLLER_PORT,
# REDIS_PORT), the ASYNCLLM_* settings of docs/CONTRACTS.md, ASYNCLLM_BUILD_DIR (default
# <repo>/build) and ASYNCLLM_FAKELLM_PORT (default 8089).

# shellcheck disable=SC2317 # cleanup and stop_child are called from traps
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
BUILD_DIR=${ASYNCLLM_BUILD_DIR:-$REPO_DIR/build}
APP_BIN="$BUILD_DIR/asyncllm"
FAKE_BIN="$BUILD_DIR/fakellm"
FAKE_PORT=${ASYNCLLM_FAKELLM_PORT:-8089}
HTTP_PORT=${ASYNCLLM_HTTP_PORT:-8080}
KAFKA_PORT=${KAFKA_PORT:-9092}
REDIS_PORT=${REDIS_PORT:-6390}
APP_STOP_TIMEOUT=20

log() { printf 'run: %s\n' "$*" >&2 || true; } # never fail: stderr may be a closed pipe
die() {
  log "ERROR: $*"
  exit 1
}

[[ -x "$APP_BIN" ]] || die "$APP_BIN not found: build it first (make)"

# True if the pid exists and is not a zombie.
alive() {
  local stat
  [[ -n "$1" ]] || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat%% *}" != Z ]]
}

# stop_child NAME PID TIMEOUT: SIGTERM, wait up to TIMEOUT s, then SIGKILL; reaps the child.
stop_child() {
  local name=$1 pid=$2 timeout=$3 i
  if alive "$pid"; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "$name did not stop within $timeout s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

app_pid="" fake_pid="" cleaned=0
cleanup() {
  ((cleaned == 0)) || return 0
  cleaned=1
  # A second Ctrl-C must not cut the shutdown short, nor a closed terminal or pipe (make run | tee) whose
  # reader is gone: the log lines below would otherwise kill this script with SIGPIPE before it cleaned up.
  trap '' INT TERM HUP PIPE
  # If the terminal or pipe is gone, later output (ours and stack.sh's, which would stop at its first failed
  # write under set -e) goes nowhere instead.
  { printf 'run: shutting down\n' >&2; } 2>/dev/null || exec >/dev/null 2>&1
  [[ -z "$app_pid" ]] || stop_child asyncllm "$app_pid" "$APP_STOP_TIMEOUT"
  [[ -z "$fake_pid" ]] || stop_child fakellm "$fake_pid" 5
  log "stopping the stack"
  "$SCRIPT_DIR/stack.sh" down || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

main() {
  # 1. Kafka + Redis.
  "$SCRIPT_DIR/stack.sh" up >/dev/null

  export ASYNCLLM_KAFKA_BROKERS="localhost:$KAFKA_PORT"
  export ASYNCLLM_REDIS_HOST=127.0.0.1
  export ASYNCLLM_REDIS_PORT="$REDIS_PORT"

  # 2. The LLM: a real one when configured, else the fake echo LLM.
  if [[ -z "${ASYNCLLM_LLM_BASE_URL:-}" && -z "${OPENAI_API_KEY:-}" ]]; then
    [[ -x "$FAKE_BIN" ]] || die "$FAKE_BIN not found: build it first (make)"
    if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$FAKE_PORT" 2>/dev/null; then
      die "port $FAKE_PORT is taken; set ASYNCLLM_FAKELLM_PORT to a free port"
    fi
    # Own session, like asyncllm below: Ctrl-C reaches only this script, which stops things in order.
    setsid "$FAKE_BIN" --host 127.0.0.1 --port "$FAKE_PORT" </dev/null &
    fake_pid=$!
    for ((i = 0; i < 100; i++)); do
      alive "$fake_pid" || die "fakellm exited at start-up"
      timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$FAKE_PORT" 2>/dev/null && break
      sleep 0.1
    done
    ((i < 100)) || die "fakellm does not listen on 127.0.0.1:$FAKE_PORT after 10 s"
    export ASYNCLLM_LLM_BASE_URL="http://127.0.0.1:$FAKE_PORT/v1"
    export ASYNCLLM_LLM_MODEL=fake
    llm_line="LLM: the FAKE echo LLM at $ASYNCLLM_LLM_BASE_URL (model \"fake\"): answers are NOT from a real model."
    llm_hint=$(
      cat <<'EOF'
 For a real model: OPENAI_API_KEY=sk-... make run                      (OpenAI, gpt-4o-mini)
   or ASYNCLLM_LLM_BASE_URL=http://HOST:PORT/v1 ASYNCLLM_LLM_MODEL=NAME \
      [ASYNCLLM_LLM_API_KEY=KEY] make run                           (vLLM, Ollama, any OpenAI-compatible API)
EOF
    )
  else
    llm_line="LLM: ${ASYNCLLM_LLM_BASE_URL:-https://api.openai.com/v1}, model ${ASYNCLLM_LLM_MODEL:-gpt-4o-mini}"
    llm_hint=""
  fi

  cat <<EOF
==========================================================================================
 asyncllm: http://127.0.0.1:$HTTP_PORT
 $llm_line
${llm_hint:+$llm_hint
}
 Kafka localhost:$KAFKA_PORT, Redis 127.0.0.1:$REDIS_PORT, their logs in ${ASYNCLLM_STACK_DIR:-$REPO_DIR/.stack}/logs
 Try:
   curl -s -X POST localhost:$HTTP_PORT/answer -H 'content-type: application/json' -d '{"prompt":"Hello"}'
   curl -s 'localhost:$HTTP_PORT/polling?conversationId=<id>'
 Ctrl-C stops asyncllm${fake_pid:+, the fake LLM} and the Kafka/Redis stack.
==========================================================================================
EOF

  # 3. asyncllm in the foreground (in its own session, waited for so that traps run at once).
  setsid "$APP_BIN" all "$@" </dev/null &
  app_pid=$!
  rc=0
  wait "$app_pid" || rc=$?
  app_pid="" # reaped: nothing left to stop
  log "asyncllm exited with status $rc"
  exit "$rc"
}

# One line, read whole before it runs: an edit of this file during a long run cannot derail it.
main "$@"; exit
