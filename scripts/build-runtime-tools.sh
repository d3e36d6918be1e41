#!/usr/bin/env bash
# Build the OCI runtime-tools validation suite into OUT (called by scripts/assets.sh, which
# caches OUT by a hash of the sources and the Go toolchain): OUT/runtimetest (static: it runs
# inside the container), OUT/oci-runtime-tool, OUT/validation/NAME.t for every program, and
# OUT/rootfs-amd64.tar.gz, the busybox rootfs the programs unpack into each test bundle.
# GOPATH mode with Debian's Go packages only: no network.
# Usage: scripts/build-runtime-tools.sh OUT   (sources: $RUNTIME_TOOLS_SRC)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=$(cd "${RUNTIME_TOOLS_SRC:-$top/../shared/third_party/runtime-tools}" && pwd)
out=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gp=$work/gopath
pkg=$gp/src/github.com/opencontainers/runtime-tools
mkdir -p "$pkg" "$gp/src/github.com/mndrix" "$work/out/validation"
cp -r "$src/cmd" "$src/validation" "$pkg/"
cp -r "$src/tap-go" "$gp/src/github.com/mndrix/tap-go"

export GO111MODULE=off GOPATH="$gp:/usr/share/gocode" GOCACHE="$work/cache" GOFLAGS=-trimpath
cd "$pkg"
CGO_ENABLED=0 go build -tags "netgo osusergo" -o "$work/out/runtimetest" ./cmd/runtimetest
go build -o "$work/out/oci-runtime-tool" ./cmd/oci-runtime-tool
for dir in validation/*/; do
  name=$(basename "$dir")
  [ "$name" = util ] && continue
  go build -o "$work/out/validation/$name.t" "./validation/$name"
done

# The rootfs the programs expect next to them: busybox-static, its applets, the usual dirs.
root=$work/rootfs
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/etc" "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
tar -C "$root" --numeric-owner --owner=0 --group=0 -czf "$work/out/rootfs-amd64.tar.gz" .

mkdir -p "$(dirname "$out")"
rm -rf "$out.tmp"
mv "$work/out" "$out.tmp"
mv "$out.tmp" "$out"
