#!/usr/bin/env bash
# Runs Jaeger (Apache 2.0) as the local OTLP trace backend of the tracing tests (A6), on loopback.
#   jaeger.sh install   build the `jaeger` binary once from the Go module proxy into <state>/bin
#                       (several minutes the first time; the Go caches live in <state>/go)
#   jaeger.sh start     install if missing, write the config, start `jaeger` (in-memory storage) in the
#                       background, wait for its query API to answer
#   jaeger.sh stop      stop it (SIGTERM, then wait)
#   jaeger.sh status    "up <endpoints>" or "down <endpoints>"; exit 0 when up
#   jaeger.sh env       print the AIMA_OTEL_* line that points the tracing at it
# Environment: AIMA_STATE_DIR (default <repo>/.aima), AIMA_JAEGER_OTLP_PORT (the OTLP/HTTP receiver,
# 4318), AIMA_JAEGER_QUERY_PORT (the query HTTP API and UI, 16686; its gRPC API takes the next port),
# AIMA_JAEGER_RUN_DIR (its config, log and pid file; <state>/jaeger: a second instance on other ports needs
# its own), AIMA_JAEGER_START_TIMEOUT_S (60). Traces are kept in memory only: a restart forgets them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="${AIMA_STATE_DIR:-$repo/.aima}"
state="${AIMA_JAEGER_RUN_DIR:-$root/jaeger}"
bin="$root/bin/jaeger"
# The approved release (the proxy also serves v1.76.0, which is not one). Its cmd/jaeger is the
# OpenTelemetry-collector-based Jaeger (the v2 line), configured by a YAML file.
module="github.com/jaegertracing/jaeger"
version="v1.75.0"
otlp_port="${AIMA_JAEGER_OTLP_PORT:-4318}"
query_port="${AIMA_JAEGER_QUERY_PORT:-16686}"
timeout_s="${AIMA_JAEGER_START_TIMEOUT_S:-60}"
pidfile="$state/jaeger.pid"
query="http://127.0.0.1:$query_port"
otlp="http://127.0.0.1:$otlp_port"

# shellcheck source=../lib/go-build.sh
source "$here/../lib/go-build.sh"
# shellcheck source=../lib/daemon.sh
source "$here/../lib/daemon.sh"

log() { printf '%s jaeger: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

install() { go_tool_build jaeger "$bin" "$module" "$version" ./cmd/jaeger; }

answers() { [[ "$(curl -s -o /dev/null -w '%{http_code}' "$query/api/services" || true)" == 200 ]]; }

# Only what the tests and a local run need: OTLP over HTTP in, memory storage, the query API out; no
# internal metrics port (the collector's default 8888 would clash between two instances).
write_config() {
  cat > "$state/config.yaml" <<YAML
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:$query_port
    grpc:
      endpoint: 127.0.0.1:$((query_port + 1))
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:$otlp_port
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
YAML
}

start() {
  install
  if running; then log "already up at $query (pid $(cat "$pidfile"))"; return 0; fi
  mkdir -p "$state/logs"
  write_config
  log "starting jaeger: OTLP/HTTP on $otlp, query API on $query, log $state/logs/jaeger.log"
  nohup "$bin" --config "$state/config.yaml" >"$state/logs/jaeger.log" 2>&1 &
  echo $! > "$pidfile"
  daemon_wait jaeger "$state/logs/jaeger.log" answers
}

status() {
  if running; then echo "up $otlp $query pid=$(cat "$pidfile")"; else echo "down $otlp $query"; return 1; fi
}

env_lines() {
  printf 'AIMA_OTEL_ENDPOINT=%s\n' "$otlp"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
