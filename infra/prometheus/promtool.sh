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

# shellcheck source=../lib/go-build.sh
source "$here/../lib/go-build.sh"

install() { go_tool_build promtool "$bin" "$module" "$version" ./cmd/promtool; }

case "${1:-}" in
  install) install ;;
  path) echo "$bin"; go_tool_built "$bin" "$version" ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
