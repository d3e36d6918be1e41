#!/usr/bin/env bash
# Build (or reuse) what tests/cri needs, each cached under $RUNV_CACHE (default
# /var/cache/runv-py) by a hash of its inputs, and link them into $RUNV_ASSETS_DIR:
# - cri-tools: crictl and critest from the vendored cri-tools tarball (../shared/third_party,
#   offline: Debian's Go and the tarball's vendor/ tree);
# - cri-images: the images critest pulls, as a docker-registry storage tree
#   (tests/cri/imagebuild.py).
# Usage: scripts/cri-assets.sh
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cache=${RUNV_CACHE:-/var/cache/runv-py}
assets=${RUNV_ASSETS_DIR:-$cache/assets}
tarball=${CRI_TOOLS_TARBALL:-$top/../shared/third_party/cri-tools/cri-tools-v1.26.1.tar.xz}
mkdir -p "$cache" "$assets"
# Its own lock: these builds need not wait for a guest kernel build, nor it for them.
exec 9>"$cache/.lock-cri"
flock 9
. "$top/scripts/interrupted-builds.sh"
remove_interrupted "$cache"/cri-*.work.*

step() { printf '[cri-assets] %s\n' "$*" >&2; }
fail() { printf '[cri-assets] error: %s\n' "$*" >&2; exit 1; }

key() {  # key NAME FILE...: a short hash of the files' contents (plus the words in $KEY_EXTRA)
  local name=$1; shift
  { printf '%s\n' "${KEY_EXTRA:-}"; cat "$@"; } | sha256sum | cut -c1-16 | sed "s/^/$name-/"
}

build() {  # build NAME KEY FUNCTION: FUNCTION OUT fills OUT (a fresh directory)
  local name=$1 k=$2 fn=$3
  if [ -d "$cache/$k" ]; then
    step "$name: cached ($cache/$k)"
  else
    step "$name: building $k"
    local start=$SECONDS
    # Global, not local: the EXIT trap of a failed build runs after this function returned.
    work=$(mktemp -d "$cache/$k.work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    "$fn" "$work/out"
    mv "$work/out" "$cache/$k"
    rm -rf "$work"
    trap - EXIT
    step "$name: built in $((SECONDS - start)) s"
  fi
  ln -sfn "$cache/$k" "$assets/$name"
}

build_cri_tools() {
  local out=$1 src
  src=$(dirname "$out")/src
  mkdir -p "$src" "$out"
  tar -C "$src" -xJf "$tarball"
  src=$(echo "$src"/cri-tools-*)
  (
    cd "$src"
    export GOFLAGS=-mod=vendor GO111MODULE=on GOPROXY=off GOSUMDB=off CGO_ENABLED=0 \
      GOCACHE="$(dirname "$out")/gocache" GOPATH="$(dirname "$out")/gopath" GOTOOLCHAIN=local \
      GOENV=off  # no go env file: HOME need not be set
    go build -trimpath -ldflags "-s -w" -o "$out/crictl" ./cmd/crictl
    # critest is the validation suite compiled as a Go test binary, as upstream builds it.
    go test -c -trimpath -ldflags "-s -w" -o "$out/critest" ./cmd/critest
  )
  "$out/crictl" --version >"$out/version"
}

build_cri_images() {
  (cd "$top" && python3 -m tests.cri.imagebuild "$1")
}

[ -r "$tarball" ] || fail "$tarball not found (the vendored cri-tools source)"
command -v go >/dev/null || fail "'go' not found: apt-get install golang-go"
build cri-tools "$(KEY_EXTRA="$(go version)" key cri-tools "$tarball" "$0")" build_cri_tools

images_key=$(cd "$top" && KEY_EXTRA="$(python3 -m tests.cri.imagebuild --inputs)" \
  key cri-images tests/cri/imagebuild.py tests/cri/images/*)
build cri-images "$images_key" build_cri_images
step "ready in $assets"
