#!/usr/bin/env bash
# kustomize (Apache 2.0), the renderer of the Kubernetes manifests in infra/k8s (tests/test_k8s_manifests.py).
#   kustomize.sh install         build the `kustomize` binary once from the Go module proxy into <state>/bin
#                                (a minute or two the first time; the Go caches live in <state>/go)
#   kustomize.sh build [DIR]     install if missing, then render DIR (default infra/k8s/overlays/example);
#                                files outside DIR are allowed (the ConfigMaps come from streams/, infra/notify/)
#   kustomize.sh path            print where the binary is (after install)
# Environment: AIMA_STATE_DIR (default <repo>/.aima), GO (the go command).
# Built by infra/lib/go-build.sh, like the other Go programs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
root="${AIMA_STATE_DIR:-$repo/.aima}"
bin="$root/bin/kustomize"
module="sigs.k8s.io/kustomize/kustomize/v5"
# v5.8.2 needs go 1.26.0 (kustomize/api v0.21.2); v5.8.3 takes api v0.21.3, which needs a newer Go than
# the machines here have.
version="v5.8.2"

# shellcheck source=../lib/go-build.sh
source "$here/../lib/go-build.sh"

install() { go_tool_build kustomize "$bin" "$module" "$version" .; }

case "${1:-}" in
  install) install ;;
  build) install; exec "$bin" build --load-restrictor LoadRestrictionsNone "${2:-$here/overlays/example}" ;;
  path) echo "$bin" ;;
  *) echo "usage: $0 install|build [DIR]|path" >&2; exit 2 ;;
esac
