#!/usr/bin/env bash
# stack.sh - the real local stack of asyncllm: one Apache Kafka node (KRaft, broker+controller) and
# one redis-server, both started from this machine's packages / the Maven cache, no containers.
#
# Usage: scripts/stack.sh COMMAND
#   up            start Kafka and Redis (what is not running yet), wait until both answer, print a
#                 summary and `export` lines:  eval "$(scripts/stack.sh up)"
#   down          stop both gracefully (SIGTERM, up to 20 s, then SIGKILL)
#   status        one line per service; exit 0 when both run, 3 otherwise
#   env           print the `export` lines only
#   kafka-start | kafka-stop | kafka-kill      for failure tests: start waits until ready and keeps
#   redis-start | redis-stop | redis-kill      the data; stop is graceful; kill is SIGKILL
#   reset         down, then delete all data, logs and pid files (a fresh cluster next time)
#
# Environment (docs/CONTRACTS.md); two stacks with different values run side by side:
#   ASYNCLLM_STACK_DIR     default <repo>/.stack: data, logs (logs/) and pid files (run/)
#   KAFKA_PORT             default 9092, PLAINTEXT listener on 127.0.0.1
#   KAFKA_CONTROLLER_PORT  default 9093, KRaft controller listener on 127.0.0.1
#   REDIS_PORT             default 6390 (not 6379: a system redis-server may own that one)
# Tuning: ASYNCLLM_STACK_TIMEOUT (readiness wait, default 90 s), KAFKA_HEAP_OPTS (default
#   "-Xms512m -Xmx512m"), KAFKA_GC_OPTS (default G1 with a 20 ms pause goal, as Kafka's own scripts;
#   every collection is logged to logs/kafka-gc.log, two files of 10 MB at most),
#   KAFKA_JVM_OPTS (extra JVM flags), ASYNCLLM_KAFKA_CDS=0 (no class-data
#   sharing archive), ASYNCLLM_KAFKA_VERSION and ASYNCLLM_CACHE (see kafka-fetch.sh).
#
# Topics are not created here: asyncllm creates them at start-up (auto-creation is off).
# Kafka and Redis run in their own sessions (setsid) under a keeper (`stack.sh __keep`) that reaps
# them and notes their exit status in the log; Ctrl-C in the calling terminal does not reach them.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

STACK_DIR=${ASYNCLLM_STACK_DIR:-$REPO_DIR/.stack}
[[ "$STACK_DIR" == /* ]] || STACK_DIR="$PWD/$STACK_DIR"
STACK_DIR=${STACK_DIR%/}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
REDIS_PORT=${REDIS_PORT:-6390}
TIMEOUT=${ASYNCLLM_STACK_TIMEOUT:-90}
STOP_TIMEOUT=20
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}
KAFKA_GC_OPTS=${KAFKA_GC_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent}
KAFKA_JVM_OPTS=${KAFKA_JVM_OPTS:-}

KAFKA_DIR="$STACK_DIR/kafka"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
REDIS_DIR="$STACK_DIR/redis"
REDIS_DATA="$REDIS_DIR/data"
REDIS_CONF="$REDIS_DIR/redis.conf"
LOG_DIR="$STACK_DIR/logs"
RUN_DIR="$STACK_DIR/run"
KAFKA_PID="$RUN_DIR/kafka.pid"
REDIS_PID="$RUN_DIR/redis.pid"
KAFKA_OUT="$LOG_DIR/kafka.out"
KAFKA_LOG="$LOG_DIR/kafka-server.log"
REDIS_LOG="$LOG_DIR/redis.log"

log() { printf 'stack: %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

for v in KAFKA_PORT KAFKA_CONTROLLER_PORT REDIS_PORT TIMEOUT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
done

# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------

# The pid in a pid file, or nothing.
read_pid() {
  if [[ -s "$1" ]]; then tr -dc '0-9' <"$1"; fi
}

# True if the pid exists and is not a zombie (PID 1 here may not reap orphans).
alive() {
  local pid=$1 stat
  [[ -n "$pid" ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ "${stat%% *}" != Z ]]
}

# Our Kafka: a live java running kafka.Kafka with this stack's server.properties.
kafka_is_ours() {
  local pid=$1 cmdline
  alive "$pid" || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"kafka.Kafka $KAFKA_PROPS"* ]]
}

# Our Redis: a live redis-server whose working directory is this stack's data dir.
redis_is_ours() {
  local pid=$1
  alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == redis-server* ]] &&
    [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$REDIS_DATA" ]]
}

# Something accepts TCP connections on 127.0.0.1:port.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

kafka_ready() {
  local md
  port_open "$KAFKA_PORT" || return 1
  md=$(kcat -L -b "127.0.0.1:$KAFKA_PORT" -m 2 2>/dev/null) || return 1
  [[ "$md" == *"broker 1 at"* ]]
}

redis_ready() {
  [[ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]
}

# mark_logs FILES...: remember the current ends of log files, so that show_logs prints only what
# the latest start wrote to them.
declare -A LOG_MARK=()
mark_logs() {
  local f
  for f in "$@"; do
    LOG_MARK[$f]=$(stat -c %s "$f" 2>/dev/null || echo 0)
  done
}

show_logs() { # files...
  local f off
  for f in "$@"; do
    [[ -s "$f" ]] || continue
    off=${LOG_MARK[$f]:-0}
    (($(stat -c %s "$f") >= off)) || off=0 # rolled over
    printf -- '----- last lines of %s -----\n' "$f" >&2
    tail -c "+$((off + 1))" "$f" | tail -n 30 >&2
  done
}

# spawn NAME PIDFILE OUTFILE CMD...
# Runs CMD in a new session (setsid) under a keeper (`stack.sh __keep`, below) and waits for its pid.
spawn() {
  local name=$1 pidfile=$2 out=$3
  shift 3
  rm -f "$pidfile"
  printf '\n[stack %s] starting %s: %s\n' "$(date '+%F %T')" "$name" "$*" >>"$out"
  setsid bash "$SCRIPT_DIR/stack.sh" __keep "$name" "$pidfile" "$out" "$@" </dev/null >/dev/null 2>&1 &
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -s "$pidfile" ]] && return 0
    sleep 0.05
  done
  die "$name: no pid file after 5 s ($pidfile)"
}

# keep NAME PIDFILE OUTFILE CMD...: the keeper. Starts CMD, writes its pid to PIDFILE, waits for it
# (so that it never lingers as a zombie; PID 1 of some containers does not reap) and logs its exit
# status to OUTFILE. If CDS_TMP/CDS_FINAL are set, moves the class-data archive that the JVM
# wrote at a clean exit into place (or drops a partial one).
keep() {
  local name=$1 pidfile=$2 out=$3 child rc
  shift 3
  cd "$LOG_DIR" # a JVM crash file (hs_err_pid*.log) lands next to the logs
  "$@" </dev/null >>"$out" 2>&1 &
  child=$!
  echo "$child" >"$pidfile.tmp" && mv -f "$pidfile.tmp" "$pidfile"
  wait "$child" && rc=0 || rc=$?
  printf '[stack %s] %s (pid %s) exited with status %s\n' "$(date '+%F %T')" "$name" "$child" "$rc" >>"$out"
  if [[ -n "${CDS_TMP:-}" ]]; then
    if [[ ($rc == 0 || $rc == 143) && -s "$CDS_TMP" ]]; then
      mv -f "$CDS_TMP" "${CDS_FINAL:?}"
    else
      rm -f "$CDS_TMP"
    fi
  fi
}

# wait_ready NAME PIDFILE READY_FN IS_OURS_FN LOGS...
wait_ready() {
  local name=$1 pidfile=$2 ready_fn=$3 ours_fn=$4
  shift 4
  local pid deadline=$((SECONDS + TIMEOUT))
  pid=$(read_pid "$pidfile")
  while ! "$ready_fn"; do
    if ! "$ours_fn" "$pid"; then
      log "$name exited during start-up"
      show_logs "$@"
      rm -f "$pidfile"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      log "$name did not become ready within $TIMEOUT s; stopping it"
      show_logs "$@"
      stop_pid "$name" "$pid" "$ours_fn"
      rm -f "$pidfile"
      exit 1
    fi
    sleep 0.2
  done
}

# stop_pid NAME PID IS_OURS_FN [SIGNAL]: SIGTERM and wait up to STOP_TIMEOUT s, then SIGKILL.
stop_pid() {
  local name=$1 pid=$2 ours_fn=$3 sig=${4:-TERM} i
  "$ours_fn" "$pid" || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
    "$ours_fn" "$pid" || return 0
    sleep 0.1
  done
  log "$name (pid $pid) still running after $STOP_TIMEOUT s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    "$ours_fn" "$pid" || return 0
    sleep 0.1
  done
  die "$name (pid $pid) survived SIGKILL"
}

check_port_free() { # name port
  if port_open "$2"; then
    die "$1: port $2 on 127.0.0.1 is already taken by another process (not this stack in $STACK_DIR); pick another port or stop it"
  fi
}

# ---------------------------------------------------------------------------------------------
# Kafka
# ---------------------------------------------------------------------------------------------

# Major version of the java on PATH ("17"), or what it printed if that cannot be parsed.
java_major() {
  local out
  out=$(java -version 2>&1) || true
  if [[ "$out" =~ version\ \"(1\.)?([0-9]+) ]]; then
    printf '%s\n' "${BASH_REMATCH[2]}"
  else
    printf '%s\n' "${out%%$'\n'*}"
  fi
}

write_kafka_props() {
  mkdir -p "$KAFKA_DIR" "$KAFKA_DATA"
  cat >"$KAFKA_PROPS" <<EOF
# Generated by scripts/stack.sh at every start; edits are lost.
# Single combined KRaft node for local development and tests.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA

# One node: replication factor and min ISR 1 for the internal topics.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Fast and explicit for tests.
offsets.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.partitions=1
# After a SIGKILL the controller refuses the restarted broker until the old registration's session
# expires (default 9 s): a shorter session makes kafka-kill + kafka-start quicker.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
num.network.threads=2
num.io.threads=4
# The log cleaner's offset map lives on the heap: 128 MB by default, a quarter of this broker's 512 MB.
# It kept the old generation at about 170 MB, near G1's 35% threshold for concurrent marking, and the
# mixed collections that follow took up to 109 ms under load; with 16 MB the old generation is about
# 86 MB and no mixed collection runs (bench/ANALYSIS.md, session 9). Only the small internal topics
# (consumer offsets) are compacted here.
log.cleaner.dedupe.buffer.size=16777216
EOF
}

kafka_start() {
  local pid
  pid=$(read_pid "$KAFKA_PID")
  if kafka_is_ours "$pid"; then
    if kafka_ready; then
      log "kafka already running (pid $pid) on 127.0.0.1:$KAFKA_PORT"
      return 0
    fi
    log "kafka (pid $pid) is running but not ready yet; waiting"
    wait_ready kafka "$KAFKA_PID" kafka_ready kafka_is_ours "$KAFKA_OUT" "$KAFKA_LOG"
    log "kafka ready on 127.0.0.1:$KAFKA_PORT"
    return 0
  fi
  rm -f "$KAFKA_PID"

  command -v java >/dev/null || die "java not found; run scripts/deps.sh"
  command -v kcat >/dev/null || die "kcat not found; run scripts/deps.sh"
  local major
  major=$(java_major)
  if ! [[ "$major" =~ ^[0-9]+$ ]] || ((major < 17)); then
    die "Kafka 4 needs Java 17 or newer; java on PATH is '$major' (run scripts/deps.sh)"
  fi
  check_port_free kafka "$KAFKA_PORT"
  check_port_free kafka-controller "$KAFKA_CONTROLLER_PORT"

  local libs
  libs=$("$SCRIPT_DIR/kafka-fetch.sh")
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  write_kafka_props

  mark_logs "$KAFKA_OUT" "$KAFKA_LOG"
  local -a log_opts=(-Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.xml" -Dkafka.logs.dir="$LOG_DIR")
  if [[ ! -f "$KAFKA_DATA/meta.properties" ]]; then
    local cluster_id
    log "formatting a new KRaft cluster in $KAFKA_DATA"
    cluster_id=$(java "${log_opts[@]}" -cp "$libs/*" kafka.tools.StorageTool random-uuid 2>>"$KAFKA_OUT" | tail -n 1)
    [[ -n "$cluster_id" ]] || die "kafka StorageTool random-uuid gave no id (see $KAFKA_OUT)"
    printf '%s\n' "$cluster_id" >"$KAFKA_DIR/cluster.id"
    java "${log_opts[@]}" -cp "$libs/*" kafka.tools.StorageTool format --standalone \
      -t "$cluster_id" -c "$KAFKA_PROPS" >>"$KAFKA_OUT" 2>&1 ||
      {
        show_logs "$KAFKA_OUT"
        die "kafka storage format failed"
      }
  fi

  # Class-data sharing: the first clean shutdown writes an archive of the loaded classes, which
  # cuts about a second off every later start. Keyed by JDK so that a JDK update makes a new one.
  local -a cds_opts=()
  local cds_tmp="" cds_final=""
  if [[ "${ASYNCLLM_KAFKA_CDS:-1}" != 0 ]]; then
    local java_home jdk_key cds_dir
    java_home=$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")
    jdk_key=$({
      printf '%s\n' "$java_home"
      cat "$java_home/release" 2>/dev/null || true
      stat -c '%s %Y' "$java_home/lib/server/libjvm.so" 2>/dev/null || true
    } | sha256sum | cut -c1-12)
    cds_dir="$(dirname "$libs")/cds"
    cds_final="$cds_dir/kafka-$jdk_key.jsa"
    mkdir -p "$cds_dir"
    if [[ -s "$cds_final" ]]; then
      cds_opts=(-XX:SharedArchiveFile="$cds_final")
    else
      cds_tmp="$cds_dir/kafka-$jdk_key.jsa.tmp.$$"
      # The dump warns about every class it skips; those warnings are noise.
      cds_opts=(-XX:ArchiveClassesAtExit="$cds_tmp" '-Xlog:cds*=off')
    fi
  fi

  local -a jvm_opts
  # shellcheck disable=SC2206 # word splitting of the option strings is intended
  jvm_opts=($KAFKA_HEAP_OPTS -server $KAFKA_GC_OPTS -XX:MaxInlineLevel=15
    "-Xlog:gc:file=$LOG_DIR/kafka-gc.log:time,uptime:filecount=2,filesize=10M"
    -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData -Djava.awt.headless=true
    "${cds_opts[@]}" $KAFKA_JVM_OPTS)

  log "starting kafka on 127.0.0.1:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT), log $KAFKA_LOG"
  CDS_TMP="$cds_tmp" CDS_FINAL="$cds_final" spawn kafka "$KAFKA_PID" "$KAFKA_OUT" \
    java "${jvm_opts[@]}" "${log_opts[@]}" -cp "$libs/*" kafka.Kafka "$KAFKA_PROPS"
  wait_ready kafka "$KAFKA_PID" kafka_ready kafka_is_ours "$KAFKA_OUT" "$KAFKA_LOG"
  log "kafka ready on 127.0.0.1:$KAFKA_PORT (pid $(read_pid "$KAFKA_PID"))"
}

kafka_stop() { # [SIGNAL]
  local pid
  pid=$(read_pid "$KAFKA_PID")
  if kafka_is_ours "$pid"; then
    log "stopping kafka (pid $pid${1:+, SIG$1})"
    stop_pid kafka "$pid" kafka_is_ours "${1:-TERM}"
  else
    log "kafka not running"
  fi
  rm -f "$KAFKA_PID"
}

# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------

write_redis_conf() {
  mkdir -p "$REDIS_DIR" "$REDIS_DATA"
  cat >"$REDIS_CONF" <<EOF
# Generated by scripts/stack.sh at every start; edits are lost.
bind 127.0.0.1
port $REDIS_PORT
protected-mode no
daemonize no
supervised no
dir $REDIS_DATA
logfile $REDIS_LOG
loglevel notice
always-show-logo no
appendonly yes
appendfsync everysec
save ""
EOF
}

redis_start() {
  local pid
  pid=$(read_pid "$REDIS_PID")
  if redis_is_ours "$pid"; then
    if redis_ready; then
      log "redis already running (pid $pid) on 127.0.0.1:$REDIS_PORT"
      return 0
    fi
    log "redis (pid $pid) is running but not ready yet; waiting"
    wait_ready redis "$REDIS_PID" redis_ready redis_is_ours "$REDIS_LOG"
    log "redis ready on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  rm -f "$REDIS_PID"
  command -v redis-server >/dev/null || die "redis-server not found; run scripts/deps.sh"
  command -v redis-cli >/dev/null || die "redis-cli not found; run scripts/deps.sh"
  check_port_free redis "$REDIS_PORT"
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  write_redis_conf
  mark_logs "$REDIS_LOG"
  log "starting redis on 127.0.0.1:$REDIS_PORT, log $REDIS_LOG"
  spawn redis "$REDIS_PID" "$REDIS_LOG" redis-server "$REDIS_CONF"
  wait_ready redis "$REDIS_PID" redis_ready redis_is_ours "$REDIS_LOG"
  log "redis ready on 127.0.0.1:$REDIS_PORT (pid $(read_pid "$REDIS_PID"))"
}

redis_stop() { # [SIGNAL]
  local pid
  pid=$(read_pid "$REDIS_PID")
  if redis_is_ours "$pid"; then
    log "stopping redis (pid $pid${1:+, SIG$1})"
    stop_pid redis "$pid" redis_is_ours "${1:-TERM}"
  else
    log "redis not running"
  fi
  rm -f "$REDIS_PID"
}

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

print_env() {
  cat <<EOF
export ASYNCLLM_KAFKA_BROKERS=localhost:$KAFKA_PORT
export ASYNCLLM_REDIS_HOST=127.0.0.1
export ASYNCLLM_REDIS_PORT=$REDIS_PORT
EOF
}

print_summary() {
  cat <<EOF
# asyncllm local stack in $STACK_DIR
#   kafka  localhost:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT)  logs: $KAFKA_LOG, $KAFKA_OUT
#   redis  127.0.0.1:$REDIS_PORT (appendonly)  log: $REDIS_LOG
#   stop with: scripts/stack.sh down
EOF
  print_env
}

status() {
  local rc=0 pid
  pid=$(read_pid "$KAFKA_PID")
  if kafka_is_ours "$pid"; then
    if kafka_ready; then
      echo "kafka: running, pid $pid, localhost:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT), data $KAFKA_DATA"
    else
      echo "kafka: pid $pid alive but not answering on localhost:$KAFKA_PORT (starting or stuck; see $KAFKA_LOG)"
      rc=3
    fi
  else
    echo "kafka: stopped (would listen on localhost:$KAFKA_PORT)"
    rc=3
  fi
  pid=$(read_pid "$REDIS_PID")
  if redis_is_ours "$pid"; then
    if redis_ready; then
      echo "redis: running, pid $pid, 127.0.0.1:$REDIS_PORT, data $REDIS_DATA"
    else
      echo "redis: pid $pid alive but not answering on 127.0.0.1:$REDIS_PORT (see $REDIS_LOG)"
      rc=3
    fi
  else
    echo "redis: stopped (would listen on 127.0.0.1:$REDIS_PORT)"
    rc=3
  fi
  return "$rc"
}

reset() {
  kafka_stop
  redis_stop
  case "$STACK_DIR" in
    / | "$HOME" | "$REPO_DIR") die "refusing to delete ASYNCLLM_STACK_DIR=$STACK_DIR" ;;
  esac
  log "deleting data, logs and pid files in $STACK_DIR"
  rm -rf "$KAFKA_DIR" "$REDIS_DIR" "$LOG_DIR" "$RUN_DIR"
  rmdir "$STACK_DIR" 2>/dev/null || true
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

# The dispatch is one function called on the script's last line: bash reads a script as it runs,
# so a long-lived `__keep` must never read on into a file that was edited meanwhile.
main() {
  case "${1:-}" in
    up)
      redis_start
      kafka_start
      print_summary
      ;;
    down)
      kafka_stop
      redis_stop
      ;;
    status) status ;;
    env) print_env ;;
    kafka-start) kafka_start ;;
    kafka-stop) kafka_stop ;;
    kafka-kill) kafka_stop KILL ;;
    redis-start) redis_start ;;
    redis-stop) redis_stop ;;
    redis-kill) redis_stop KILL ;;
    reset) reset ;;
    __keep)
      shift
      keep "$@"
      exit 0
      ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"; exit
