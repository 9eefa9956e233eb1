#!/usr/bin/env bash
# Runs the real Apache Kafka broker (KRaft, one broker+controller node) from Maven Central jars.
#   kafka.sh fetch    resolve the broker jars once into the cache folder
#   kafka.sh start    format storage once, start in the background, wait for a metadata answer
#   kafka.sh stop     stop cleanly (SIGTERM, then wait for the controlled shutdown)
#   kafka.sh status   "up <address>" or "down <address>"; exit 0 when up
# Environment: AIMA_STATE_DIR (default <repo>/.aima), AIMA_CACHE_DIR (default <repo>/.aima/cache),
# AIMA_KAFKA_PORT (9092), AIMA_KAFKA_CONTROLLER_PORT (9093), AIMA_KAFKA_HEAP (512m),
# AIMA_KAFKA_START_TIMEOUT_S (90).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${AIMA_STATE_DIR:-$repo/.aima}/kafka"
cache="${AIMA_CACHE_DIR:-$repo/.aima/cache}"
port="${AIMA_KAFKA_PORT:-9092}"
cport="${AIMA_KAFKA_CONTROLLER_PORT:-9093}"
heap="${AIMA_KAFKA_HEAP:-512m}"
timeout_s="${AIMA_KAFKA_START_TIMEOUT_S:-90}"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")"
lib="$cache/kafka-$version/lib"
pidfile="$state/kafka.pid"
address="127.0.0.1:$port"

log() { printf '%s kafka: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
# shellcheck source=../lib/daemon.sh
source "$here/../lib/daemon.sh"

fetch() {
  if [[ -f "$lib/.complete" ]]; then return 0; fi
  log "resolving Apache Kafka $version jars from Maven Central into $lib"
  mkdir -p "$lib"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$lib" -DincludeScope=runtime >&2
  touch "$lib/.complete"
}

java_cp() { java -Xmx128m -cp "$lib/*" -Dlog4j2.configurationFile="$here/log4j2.properties" \
  -Dkafka.logs.dir="$state/logs" "$@"; }

# A metadata request through the admin client: proves the broker serves clients, not only that
# the port is open.
metadata_ok() {
  timeout 20 java -Xmx128m -cp "$lib/*" -Dlog4j2.configurationFile="$here/log4j2.properties" \
    -Dkafka.logs.dir="$state/logs" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$address" --list >/dev/null 2>&1
}

start() {
  fetch
  if running; then log "already up at $address (pid $(cat "$pidfile"))"; return 0; fi
  mkdir -p "$state/data" "$state/logs"
  sed -e "s|@KAFKA_PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@DATA_DIR@|$state/data|g" \
    "$here/server.properties" > "$state/server.properties"
  if [[ ! -f "$state/data/meta.properties" ]]; then
    log "formatting storage in $state/data"
    java_cp kafka.tools.StorageTool format --ignore-formatted \
      -t "$(java_cp kafka.tools.StorageTool random-uuid)" -c "$state/server.properties" >&2
  fi
  log "starting broker on $address (heap $heap), log $state/logs/server.log"
  nohup java -Xms"$heap" -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" -Dkafka.logs.dir="$state/logs" \
    -cp "$lib/*" kafka.Kafka "$state/server.properties" >"$state/logs/stdout.log" 2>&1 &
  echo $! > "$pidfile"
  daemon_wait broker "$state/logs/server.log $state/logs/stdout.log" metadata_ok
}

status() {
  if running; then echo "up $address pid=$(cat "$pidfile")"; else echo "down $address"; return 1; fi
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
