#!/usr/bin/env bash
# Build (or reuse) the guest kernel, guest root filesystem and benchmark floor, each cached under
# $RUNV_CACHE (default /var/cache/runv-py) by a hash of its inputs, and link the current set
# into $RUNV_ASSETS_DIR (default $RUNV_CACHE/assets), where runv-py looks for them.
# Usage: scripts/assets.sh
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cache=${RUNV_CACHE:-/var/cache/runv-py}
assets=${RUNV_ASSETS_DIR:-$cache/assets}
mkdir -p "$cache" "$assets"
# One build at a time per cache: concurrent runs wait, then find the result cached.
exec 9>"$cache/.lock"
flock 9
. "$top/scripts/interrupted-builds.sh"
remove_interrupted "$cache"/{kernel,rootfs,floor,runtime-tools}-*.work.* \
  "$cache"/{kernel,rootfs,floor,runtime-tools}-*.new

# key NAME FILE...: a short hash of the files' contents (plus extra words in $KEY_EXTRA).
key() {
  local name=$1; shift
  { printf '%s\n' "${KEY_EXTRA:-}"; cat "$@"; } | sha256sum | cut -c1-16 | sed "s/^/$name-/"
}

build() {  # build NAME KEY SCRIPT
  local name=$1 k=$2 script=$3
  if [ -d "$cache/$k" ]; then
    printf '[assets] %s: cached (%s)\n' "$name" "$cache/$k" >&2
  else
    printf '[assets] %s: building %s\n' "$name" "$k" >&2
    "$script" "$cache/$k"
  fi
  ln -sfn "$cache/$k" "$assets/$name"
}

kernel_src=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || echo missing)
kernel_key=$(KEY_EXTRA="linux-source-6.1 $kernel_src" key kernel \
  "$top/guest-kernel/fragment.config" "$top/guest-kernel/build.sh")
build kernel "$kernel_key" "$top/guest-kernel/build.sh"

agent_files=$(cd "$top" && find hyperstart-agent -name '*.py' -o -name '*.toml' | LC_ALL=C sort)
build rootfs "$(cd "$top" && key rootfs images/build-rootfs.sh images/hyperstart-init images/requirements-guest.txt $agent_files)" \
  "$top/images/build-rootfs.sh"

build floor "$(key floor "$top/images/build-floor.sh" /bin/busybox)" "$top/images/build-floor.sh"

# The OCI runtime-tools validation suite (tests/conformance): upstream sources from ../shared,
# built with Debian's Go and Go packages.
rt_src=${RUNTIME_TOOLS_SRC:-$top/../shared/third_party/runtime-tools}
if [ -d "$rt_src/validation" ]; then
  rt_files=$(cd "$rt_src" && find cmd validation tap-go -type f | LC_ALL=C sort)
  rt_debs=$(dpkg-query -W -f='${Package} ${Version}\n' golang-go \
    golang-github-opencontainers-runtime-tools-dev golang-github-google-uuid-dev 2>/dev/null || true)
  build runtime-tools "$(cd "$rt_src" && KEY_EXTRA="$rt_debs" key runtime-tools \
    "$top/scripts/build-runtime-tools.sh" /bin/busybox $rt_files)" \
    "$top/scripts/build-runtime-tools.sh"
else
  printf '[assets] runtime-tools: no sources in %s (tests/conformance will fail)\n' "$rt_src" >&2
fi
printf '[assets] ready in %s\n' "$assets" >&2
