#!/usr/bin/env bash
# bench/callgrind.sh - user-space instructions per request of `asyncllm api` (all its threads), counted by
# valgrind's callgrind only while a closed-loop load runs: a figure that does not move with the machine's load,
# for comparing two builds on a shared machine (bench/ANALYSIS.md).
#
# Usage: KPORT=<kafka port> RPORT=<redis port> bench/callgrind.sh BIN API_PORT N LABEL [LOADGEN ARGS...] PATH
#   e.g. KPORT=24092 RPORT=24390 bench/callgrind.sh build/asyncllm 24081 3000 answer \
#          -m POST -H 'Content-Type: application/json' -b '{"prompt":"hi"}' /answer
# Needs a stack on those ports:
#   ASYNCLLM_STACK_DIR=/tmp/cg-stack KAFKA_PORT=24092 KAFKA_CONTROLLER_PORT=24093 REDIS_PORT=24390 scripts/stack.sh up
# and build/bench/loadgen. EXTRA="..." adds flags to the api (topics are mp, mr, md). Prints the instructions
# per request and leaves the profile in /tmp/cg.<API_PORT>.* (callgrind_annotate --inclusive=yes FILE).
set -uo pipefail
bin=$1 port=$2 n=$3 label=$4
shift 4
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
loadgen=$repo/build/bench/loadgen
pkill -f "api --http-port=$port " 2>/dev/null
sleep 0.3
rm -f /tmp/cg."$port".*
# shellcheck disable=SC2086
valgrind --tool=callgrind --callgrind-out-file=/tmp/cg."$port".%p --instr-atstart=no "$bin" api \
    --http-port="$port" --kafka-brokers=127.0.0.1:"${KPORT:?}" --redis-host=127.0.0.1 --redis-port="${RPORT:?}" \
    --topic-prompts=mp --topic-responses=mr --topic-dlq=md --conversation-ttl-s=3600 --log-level=warn \
    --llm-base-url=http://127.0.0.1:1/v1 --llm-model=fake ${EXTRA:-} >/tmp/cg-"$port".log 2>&1 &
pid=$!
for _ in $(seq 150); do curl -sf "localhost:$port/readyz" >/dev/null && break; sleep 0.2; done
args=("$@")
url=${args[-1]}
unset 'args[-1]'
"$loadgen" -c 16 -n 200 "${args[@]}" "http://127.0.0.1:$port$url" >/dev/null # warm-up
callgrind_control -i on "$pid" >/dev/null 2>&1
out=$("$loadgen" -c 64 -n "$n" "${args[@]}" "http://127.0.0.1:$port$url")
sleep 0.5
callgrind_control -i off "$pid" >/dev/null 2>&1
callgrind_control -d "$pid" >/dev/null 2>&1
sleep 0.5
kill "$pid"
wait "$pid" 2>/dev/null
total=$(cat /tmp/cg."$port".* 2>/dev/null | grep -h '^summary:\|^totals:' | awk '{s += $2} END {print s}')
status=$(echo "$out" | tail -1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')
echo "$label: answers $status, user-space instructions per request: $((total / n))"
