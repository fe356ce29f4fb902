#!/usr/bin/env bash
# kafka-fetch.sh - make the Apache Kafka broker jars available locally, from Maven Central.
#
# There is no Kafka tarball: the broker is run from the jars of org.apache.kafka:kafka_2.13 and its
# runtime dependencies (plus log4j2 as the logging backend), listed in scripts/kafka/pom.xml and
# resolved with `mvn dependency:copy-dependencies`.
#
# The jars go to a cache OUTSIDE the checkout, so that every clone on this machine shares them:
#     ${ASYNCLLM_CACHE:-$HOME/.cache/asyncllm}/kafka-<version>/libs/
# Maven's own repository for this goes to ${ASYNCLLM_CACHE}/m2 (not ~/.m2).
# A marker file (kafka-<version>/.complete, holding the POM's checksum) makes later runs return
# at once; editing the POM triggers a new fetch. Concurrent runs are serialised with flock.
#
# Output: the absolute path of the libs directory on stdout (progress goes to stderr), so that
#     libs=$(scripts/kafka-fetch.sh)
# Environment: ASYNCLLM_CACHE (see above), ASYNCLLM_KAFKA_VERSION (default 4.1.1; 4.0.x and 4.1.x
# are known to work with Java 17).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
POM="$SCRIPT_DIR/kafka/pom.xml"
KAFKA_VERSION=${ASYNCLLM_KAFKA_VERSION:-4.1.1}
CACHE=${ASYNCLLM_CACHE:-$HOME/.cache/asyncllm}
DEST="$CACHE/kafka-$KAFKA_VERSION"
LIBS="$DEST/libs"
MARKER="$DEST/.complete"

log() { printf 'kafka-fetch: %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# The marker holds the POM checksum and the version: a different POM means a different jar set.
want_marker=$(printf '%s %s\n' "$(sha256sum "$POM" | cut -d' ' -f1)" "$KAFKA_VERSION")

is_complete() {
  [[ -f "$MARKER" && -d "$LIBS" ]] && [[ "$(cat "$MARKER")" == "$want_marker" ]]
}

# Fast path: nothing to do (no lock, no JVM).
if is_complete; then
  printf '%s\n' "$LIBS"
  exit 0
fi

command -v mvn >/dev/null || die "mvn not found; run scripts/deps.sh first"
command -v java >/dev/null || die "java not found; run scripts/deps.sh first"

mkdir -p "$DEST"
exec 9>"$DEST/.lock"
if ! flock -n 9; then
  log "another fetch of Kafka $KAFKA_VERSION is running; waiting for it"
  flock 9
fi

# Someone else may have finished while we waited for the lock.
if is_complete; then
  printf '%s\n' "$LIBS"
  exit 0
fi

log "downloading Apache Kafka $KAFKA_VERSION broker jars from Maven Central"
log "  into $LIBS"
log "  (first run only: this takes a while, about a minute on a slow link; later runs reuse the cache)"

tmp="$DEST/libs.tmp.$$"
mvn_log="$DEST/mvn.log"
rm -rf "$tmp"
start=$SECONDS
if ! mvn -B -q -ntp -Dstyle.color=never \
  -f "$POM" \
  -Dmaven.repo.local="$CACHE/m2" \
  -Dkafka.version="$KAFKA_VERSION" \
  dependency:copy-dependencies \
  -DoutputDirectory="$tmp" \
  -DincludeScope=runtime >"$mvn_log" 2>&1; then
  rm -rf "$tmp"
  tail -n 30 "$mvn_log" >&2 || true
  die "mvn could not resolve kafka_2.13:$KAFKA_VERSION (full log: $mvn_log)." \
    "Try another version with ASYNCLLM_KAFKA_VERSION=4.0.1 (4.0.x and 4.1.x work with Java 17)."
fi

# Sanity check: the broker's main jar must be there.
[[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || {
  rm -rf "$tmp"
  die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn (log: $mvn_log)"
}

rm -rf "$LIBS"
mv "$tmp" "$LIBS"
printf '%s\n' "$want_marker" >"$MARKER"
log "done in $((SECONDS - start)) s: $(find "$LIBS" -name '*.jar' | wc -l) jars, $(du -sh "$LIBS" | cut -f1)"
printf '%s\n' "$LIBS"
