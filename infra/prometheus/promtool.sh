#!/usr/bin/env bash
# Upstream's promtool, for checking infra/prometheus/prometheus.k8s.yml: Debian's promtool (package
# prometheus) is built without Kubernetes service discovery and rejects kubernetes_sd_configs.
#   promtool.sh install   build promtool once from the Go module proxy into <state>/bin (minutes the first
#                         time; the Go caches live in <state>/go, shared with infra/seaweedfs/seaweedfs.sh)
#   promtool.sh path      print where the binary is (or would be); exit 1 when it is not built
# Environment: AIMA_STATE_DIR (default <repo>/.aima), GO (default: go on PATH, else /usr/local/go/bin/go).
# The version is that of the compose stack's prom/prometheus image (3.0.1 is module v0.300.1).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="${AIMA_STATE_DIR:-$repo/.aima}"
bin="$root/bin/promtool"
module="github.com/prometheus/prometheus"
version="v0.300.1"
go="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

log() { printf '%s promtool: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

built() { [[ -x "$bin" && -f "$bin.version" && "$(cat "$bin.version")" == "$version" ]]; }

install() {
  if built; then return 0; fi
  mkdir -p "$root/bin" "$root/go"
  # One Go build at a time (the lock seaweedfs.sh takes too): CI builds in the background.
  exec 9>"$root/go/build.lock"
  flock 9
  if built; then return 0; fi
  local t0=$SECONDS dir
  export GOMODCACHE="$root/go/mod" GOCACHE="$root/go/cache" GOFLAGS=-buildvcs=false
  log "building promtool $version (first time: minutes)"
  # `go install promtool@<version>` refuses the module (its go.mod has exclude directives): download it
  # and build inside it, where they apply.
  dir="$("$go" mod download -json "$module@$version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  (cd "$dir" && nice -n 10 "$go" build -o "$bin.tmp" ./cmd/promtool)
  mv "$bin.tmp" "$bin"
  echo "$version" > "$bin.version"
  log "built $bin in $((SECONDS - t0)) s"
}

case "${1:-}" in
  install) install ;;
  path) echo "$bin"; built ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
