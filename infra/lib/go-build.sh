# Sourced by the scripts that build a Go program from the Go module proxy (infra/seaweedfs/seaweedfs.sh,
# infra/jaeger/jaeger.sh, infra/k8s/kustomize.sh, infra/prometheus/promtool.sh); not run by itself.
#
#   go_tool_built BIN VERSION                  the binary is there at that version
#   go_tool_build NAME BIN MODULE VERSION PKG  build it once: download MODULE@VERSION and build PKG (a
#                                              path inside the module) in place into BIN; BIN.version
#                                              keeps the version, so a changed pin rebuilds
#
# In place rather than `go install MODULE/PKG@VERSION`: modules whose go.mod has replace or exclude
# directives are refused by `go install`, and inside the module those apply. The Go caches live in
# <state>/go (GOMODCACHE, GOCACHE), and one build runs at a time (flock on <state>/go/build.lock): CI
# starts the builds in the background while the tests that need a binary wait for it here.
# Needs: $root (the state folder); GO may name the go command.

go_tool_built() { [[ -x "$1" && -f "$1.version" && "$(cat "$1.version")" == "$2" ]]; }

go_tool_build() {
  local name=$1 bin=$2 module=$3 version=$4 package=$5
  if go_tool_built "$bin" "$version"; then return 0; fi
  local go="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
  mkdir -p "$(dirname "$bin")" "$root/go"
  exec 9>"$root/go/build.lock"
  flock 9
  if go_tool_built "$bin" "$version"; then exec 9>&-; return 0; fi
  local t0=$SECONDS dir
  export GOMODCACHE="$root/go/mod" GOCACHE="$root/go/cache" GOFLAGS=-buildvcs=false
  printf '%s %s: building %s@%s (first time: minutes)\n' "$(date -u +%H:%M:%S)" "$name" "$module" "$version" >&2
  dir="$("$go" mod download -json "$module@$version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  (cd "$dir" && nice -n 10 "$go" build -o "$bin.tmp" "$package")
  mv "$bin.tmp" "$bin"
  echo "$version" > "$bin.version"
  exec 9>&-
  printf '%s %s: built %s in %d s\n' "$(date -u +%H:%M:%S)" "$name" "$bin" "$((SECONDS - t0))" >&2
}
