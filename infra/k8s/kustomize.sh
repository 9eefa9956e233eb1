#!/usr/bin/env bash
# kustomize (Apache 2.0), the renderer of the Kubernetes manifests in infra/k8s (tests/test_k8s_manifests.py).
#   kustomize.sh install         build the `kustomize` binary once from the Go module proxy into <state>/bin
#                                (a minute or two the first time; the Go caches live in <state>/go)
#   kustomize.sh build [DIR]     install if missing, then render DIR (default infra/k8s/overlays/example);
#                                files outside DIR are allowed (the ConfigMaps come from streams/, infra/notify/)
#   kustomize.sh path            print where the binary is (after install)
# Environment: AIMA_STATE_DIR (default <repo>/.aima), GO (the go command).
# The same pattern as infra/seaweedfs/seaweedfs.sh: download the module at a pinned version, build it in
# place, keep the version beside the binary so a changed pin rebuilds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="${AIMA_STATE_DIR:-$repo/.aima}"
bin="$root/bin/kustomize"
module="sigs.k8s.io/kustomize/kustomize/v5"
# v5.8.2 needs go 1.26.0 (kustomize/api v0.21.2); v5.8.3 takes api v0.21.3, which needs a newer Go than
# the machines here have.
version="v5.8.2"
go="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

log() { printf '%s kustomize: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

installed() { [[ -x "$bin" && -f "$bin.version" && "$(cat "$bin.version")" == "$version" ]]; }

install() {
  if installed; then return 0; fi
  mkdir -p "$root/bin" "$root/go"
  # One Go build at a time (the lock seaweedfs.sh takes too): CI builds in the background while the
  # tests may ask for it.
  exec 9>"$root/go/build.lock"
  flock 9
  if installed; then return 0; fi
  local t0=$SECONDS
  export GOMODCACHE="$root/go/mod" GOCACHE="$root/go/cache" GOFLAGS=-buildvcs=false
  log "building kustomize $version"
  local dir
  dir="$("$go" mod download -json "$module@$version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  (cd "$dir" && nice -n 10 "$go" build -o "$bin.tmp" .)
  mv "$bin.tmp" "$bin"
  echo "$version" > "$bin.version"
  log "built $bin in $((SECONDS - t0)) s"
}

case "${1:-}" in
  install) install ;;
  build) install; exec "$bin" build --load-restrictor LoadRestrictionsNone "${2:-$here/overlays/example}" ;;
  path) echo "$bin" ;;
  *) echo "usage: $0 install|build [DIR]|path" >&2; exit 2 ;;
esac
