#!/usr/bin/env bash
# bench/run.sh - asyncllm's benchmark (`make bench`), or a few-second smoke of every step (`make bench-smoke`).
#
# Usage: bench/run.sh [--smoke]
#
# Installs what is missing (scripts/deps.sh, bench/deps.sh), builds the optimised binaries, starts the bench's
# own Kafka (KRaft, acks=all) and redis-server on ports below 32768, runs bench/bench.py (nginx, asyncllm api
# and worker, the fake LLM, the load generator), then:
#   full:  writes bench/results/<UTC time>.json and regenerates docs/PERFORMANCE.md and its plots
#          (bench/results/*.png). Takes about 20 minutes.
#   smoke: writes everything into a scratch directory (deleted afterwards unless BENCH_KEEP=1), checks that
#          every step produced figures, and asserts nothing about performance.
# The stack's data is deleted at the end (BENCH_KEEP=1 keeps the stack running and the scratch directory).
#
# Environment (defaults: full / smoke):
#   BENCH_STACK_DIR            /tmp/asyncllm-bench-stack / /tmp/asyncllm-bench-smoke-stack
#   BENCH_PORT_BASE            the first free block of 21000 17000 18000 15000 19000 / 22000 12000 13000 11000
#                              14000: Kafka +92 (controller +93), Redis +390, api +80, nginx +81 and +82, fake
#                              LLM +89, worker metrics +64; all below the kernel's ephemeral ports (32768)
#   BENCH_ASYNCLLM, BENCH_FAKELLM   binaries to measure (default: `make build/asyncllm build/fakellm`)
#   BENCH_ONLY                 a partial run for experiments: the steps to run, comma-separated, among http,
#                              worker, memory, cpu. The results go to the scratch directory (printed), not to
#                              bench/results/, and docs/PERFORMANCE.md is left alone.
#   BENCH_WORKER               the worker step's (LLM latency ms:in-flight) pairs, e.g. 1000:4096,100:1024
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
cd "$REPO"

log() { printf 'bench: %s\n' "$*" >&2; }

SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  -h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit 0
    ;;
  *)
    echo "usage: bench/run.sh [--smoke]" >&2
    exit 2
    ;;
esac

# A block of ports: Kafka +92 (controller +93), Redis +390, api +80, nginx +81 and +82, fake LLM +89, worker
# metrics +64. Other people's stacks on this machine pick ports too: the first block with all of them free is
# taken, unless BENCH_PORT_BASE says which.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
block_free() {
  local b=$1 o
  for o in 64 80 81 82 89 92 93 390; do port_free $((b + o)) || return 1; done
}
if ((SMOKE)); then
  STACK_DIR=${BENCH_STACK_DIR:-/tmp/asyncllm-bench-smoke-stack}
  CANDIDATES=(22000 12000 13000 11000 14000)
else
  STACK_DIR=${BENCH_STACK_DIR:-/tmp/asyncllm-bench-stack}
  CANDIDATES=(21000 17000 18000 15000 19000)
fi
# our own stack from an earlier run may still hold its ports: stop it first
export ASYNCLLM_STACK_DIR=$STACK_DIR
"$REPO/scripts/stack.sh" down >/dev/null 2>&1 || true
if [[ -n "${BENCH_PORT_BASE:-}" ]]; then
  PBASE=$BENCH_PORT_BASE
else
  PBASE=
  for b in "${CANDIDATES[@]}"; do
    if block_free "$b"; then
      PBASE=$b
      break
    fi
  done
  [[ -n "$PBASE" ]] || {
    log "ERROR: no free block of ports among ${CANDIDATES[*]}; set BENCH_PORT_BASE"
    exit 1
  }
fi
if ! [[ "$PBASE" =~ ^[0-9]+$ ]] || ((PBASE < 1024 || PBASE + 390 >= 32768)); then
  log "ERROR: BENCH_PORT_BASE must be a number from 1024 to 32377 (below the kernel's ephemeral ports), got '$PBASE'"
  exit 2
fi
KPORT=$((PBASE + 92))
RPORT=$((PBASE + 390))
log "ports: kafka $KPORT, redis $RPORT, api $((PBASE + 80)), nginx $((PBASE + 81))/$((PBASE + 82)), fake LLM $((PBASE + 89))"

"$REPO/scripts/deps.sh"
"$BENCH_DIR/deps.sh"

# ---- build
if [[ -z "${BENCH_ASYNCLLM:-}" || -z "${BENCH_FAKELLM:-}" ]]; then
  make -s -C "$REPO" build/asyncllm build/fakellm
fi
ASYNCLLM=${BENCH_ASYNCLLM:-$REPO/build/asyncllm}
FAKELLM=${BENCH_FAKELLM:-$REPO/build/fakellm}
BIN="$REPO/build/bench"
mkdir -p "$BIN"
CFLAGS=(-std=c17 -D_GNU_SOURCE -O2 -g -Wall -Wextra -Werror)
if [[ ! -x "$BIN/loadgen" || "$BENCH_DIR/loadgen.c" -nt "$BIN/loadgen" ]]; then
  gcc "${CFLAGS[@]}" -o "$BIN/loadgen" "$BENCH_DIR/loadgen.c"
fi
if [[ ! -x "$BIN/kbench" || "$BENCH_DIR/kbench.c" -nt "$BIN/kbench" ]]; then
  # shellcheck disable=SC2046 # pkg-config prints several words
  gcc "${CFLAGS[@]}" -o "$BIN/kbench" "$BENCH_DIR/kbench.c" $(pkg-config --cflags --libs rdkafka)
fi

# ---- descriptors: 10,000 idle connections, 16,384 LLM calls in flight
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log "open files limit: $(ulimit -n)"

# ---- the stack
export ASYNCLLM_STACK_DIR=$STACK_DIR KAFKA_PORT=$KPORT KAFKA_CONTROLLER_PORT=$((KPORT + 1)) REDIS_PORT=$RPORT
WORK=$(mktemp -d /tmp/asyncllm-bench.XXXXXX)
cleanup() {
  local rc=$?
  set +e
  # the stack's logs (Kafka, Redis) go with the others, for a post-mortem
  [[ -d "$STACK_DIR/logs" ]] && cp -r "$STACK_DIR/logs" "$WORK/stack-logs" 2>/dev/null
  if [[ "${BENCH_KEEP:-0}" == 1 ]]; then
    log "kept: stack in $STACK_DIR (scripts/stack.sh down with the same environment), scratch in $WORK"
  else
    "$REPO/scripts/stack.sh" reset >/dev/null 2>&1
    if ((rc == 0 && SMOKE)); then rm -rf "$WORK"; else log "scratch directory with the logs: $WORK"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
"$REPO/scripts/stack.sh" reset >/dev/null 2>&1 || true
"$REPO/scripts/stack.sh" up >/dev/null

PARTIAL=0
[[ -n "${BENCH_ONLY:-}${BENCH_WORKER:-}" ]] && ((!SMOKE)) && PARTIAL=1
if ((SMOKE || PARTIAL)); then
  OUT="$WORK/results.json"
  DOC="$WORK/PERFORMANCE.md"
  PLOTS="$WORK"
else
  mkdir -p "$BENCH_DIR/results"
  OUT="$BENCH_DIR/results/$(date -u +%Y%m%dT%H%M%SZ).json"
  DOC="$REPO/docs/PERFORMANCE.md"
  PLOTS="$BENCH_DIR/results"
fi

args=(--work "$WORK" --out "$OUT" --asyncllm "$ASYNCLLM" --fakellm "$FAKELLM" --loadgen "$BIN/loadgen"
  --kbench "$BIN/kbench" --kafka-port "$KPORT" --redis-port "$RPORT" --stack-dir "$STACK_DIR" --port-base "$PBASE")
((SMOKE)) && args+=(--smoke)
[[ -n "${BENCH_ONLY:-}" ]] && args+=(--only "$BENCH_ONLY")
[[ -n "${BENCH_WORKER:-}" ]] && args+=(--worker "$BENCH_WORKER")
python3 "$BENCH_DIR/bench.py" "${args[@]}"
if ((PARTIAL)); then
  log "partial run: results in $OUT (bench/results/ and docs/PERFORMANCE.md left alone)"
  exit 0
fi
rargs=(--results "$OUT" --doc "$DOC" --plots "$PLOTS")
((SMOKE)) && rargs+=(--check)
python3 "$BENCH_DIR/report.py" "${rargs[@]}"
if ((SMOKE)); then
  log "smoke passed: every step ran and produced figures (performance is not asserted)"
else
  log "results: $OUT; docs/PERFORMANCE.md regenerated"
fi
