#!/usr/bin/env bash
# Runs SeaweedFS (Apache 2.0) as the local S3-compatible store of the archive (D5), on loopback.
#   seaweedfs.sh install   build the `weed` binary once from the Go module proxy into <state>/bin
#                          (several minutes the first time; the Go caches live in <state>/go)
#   seaweedfs.sh start     install if missing, write the S3 identity file, start `weed server -s3` in the
#                          background, wait for an S3 answer, create the bucket aima-archive
#   seaweedfs.sh stop      stop it (SIGTERM, then wait)
#   seaweedfs.sh status    "up <endpoint>" or "down <endpoint>"; exit 0 when up
#   seaweedfs.sh env       print the AIMA_ARCHIVE_* lines that point the archive at it
# Environment: AIMA_STATE_DIR (default <repo>/.aima), AIMA_S3_PORT (8333; the master, volume and filer
# take the next three ports, their gRPC ports 10000 above), AIMA_S3_ACCESS_KEY (aima), AIMA_S3_SECRET_KEY
# (generated on first start and kept in <state>/seaweedfs/secret_key), AIMA_S3_START_TIMEOUT_S (60).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="${AIMA_STATE_DIR:-$repo/.aima}"
state="$root/seaweedfs"
bin="$root/bin/weed"
# `go install weed@<version>` refuses the module (its go.mod has replace directives), so the module is
# downloaded from the proxy and built in place. The newest pseudo-version the proxy serves here.
module="github.com/seaweedfs/seaweedfs"
version="v0.0.0-20261109003541-7506e5f91cd6"
port="${AIMA_S3_PORT:-8333}"
access_key="${AIMA_S3_ACCESS_KEY:-aima}"
timeout_s="${AIMA_S3_START_TIMEOUT_S:-60}"
bucket=aima-archive
pidfile="$state/weed.pid"
endpoint="http://127.0.0.1:$port"

# shellcheck source=../lib/go-build.sh
source "$here/../lib/go-build.sh"
# shellcheck source=../lib/daemon.sh
source "$here/../lib/daemon.sh"

log() { printf '%s seaweedfs: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

install() { go_tool_build seaweedfs "$bin" "$module" "$version" ./weed; }

secret_key() {
  if [[ -n "${AIMA_S3_SECRET_KEY:-}" ]]; then printf '%s' "$AIMA_S3_SECRET_KEY"; return 0; fi
  local file="$state/secret_key"
  if [[ ! -s "$file" ]]; then
    mkdir -p "$state"
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$file")
  fi
  cat "$file"
}

# Any HTTP answer (an S3 error document included) means the gateway listens; the bucket request checks
# that the filer behind it works too.
answers() { [[ "$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/" || true)" != 000 ]]; }

ready() { answers && make_bucket; }

make_bucket() {
  local code
  code="$(curl -s -o "$state/bucket.out" -w '%{http_code}' -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$access_key:$(secret_key)" "$endpoint/$bucket" || true)"
  [[ "$code" == 200 ]] || grep -q BucketAlreadyOwnedByYou "$state/bucket.out" 2>/dev/null
}

start() {
  install
  if running; then log "already up at $endpoint (pid $(cat "$pidfile"))"; return 0; fi
  mkdir -p "$state/data" "$state/logs"
  # The identity file carries the secret: written at each start from the environment, never kept in git.
  (umask 077; cat > "$state/s3.json" <<JSON
{"identities": [{"name": "aima", "credentials": [{"accessKey": "$access_key", "secretKey": "$(secret_key)"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON
  )
  log "starting weed server with S3 on $endpoint, log $state/logs/weed.log"
  nohup "$bin" server -dir="$state/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port=$((port + 1)) -volume.port=$((port + 2)) -filer.port=$((port + 3)) \
    -master.volumeSizeLimitMB=64 -volume.max=100 \
    -s3 -s3.port="$port" -s3.config="$state/s3.json" >"$state/logs/weed.log" 2>&1 &
  echo $! > "$pidfile"
  daemon_wait weed "$state/logs/weed.log" ready
}

status() {
  if running; then echo "up $endpoint pid=$(cat "$pidfile")"; else echo "down $endpoint"; return 1; fi
}

env_lines() {
  printf 'AIMA_ARCHIVE_BUCKET=%s\nAIMA_ARCHIVE_ENDPOINT_URL=%s\nAIMA_ARCHIVE_ACCESS_KEY_ID=%s\n' \
    "$bucket" "$endpoint" "$access_key"
  printf 'AIMA_ARCHIVE_SECRET_ACCESS_KEY=%s\n' "$(secret_key)"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
