#!/usr/bin/env bash
# Build the guest root filesystem: Debian bookworm minbase + CPython + the pinned wheels + the
# hyperstart agent, stripped, as a compressed erofs image and as a zstd initramfs.
# OUT gets rootfs.erofs, initrd.img, version (agent version), contents.txt and build.txt.
# Usage: images/build-rootfs.sh OUT
set -euo pipefail

out=${1:?usage: build-rootfs.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
suite=bookworm

step() { printf '[rootfs] %s\n' "$*" >&2; }
fail() { printf '[rootfs] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (debootstrap and chroot)"
for tool in debootstrap mkfs.erofs cpio zstd; do
  command -v "$tool" >/dev/null || fail "'$tool' not found: apt-get install debootstrap erofs-utils cpio zstd"
done
python=${PYTHON:-python3}

# The Debian mirror this machine's apt already uses (override with DEBIAN_MIRROR).
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -rhs -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -v security | grep -o -E 'https?://[^ ]+/debian/?' | head -n 1 || true)
fi
[ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt/sources.list*: set DEBIAN_MIRROR"

work=$(mktemp -d "${out%/}.work.XXXXXX")
cleanup() {
  rm -rf "$work"
}
trap cleanup EXIT
root=$work/root
start=$SECONDS

step "debootstrap $suite minbase + python3 (from the host's Debian mirror)"
if ! debootstrap --variant=minbase --include=python3,libseccomp2 "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 20 "$work/debootstrap.log" >&2
  grep -h -E 'E:|Failure' "$root/debootstrap/debootstrap.log" 2>/dev/null | tail -n 5 >&2 || true
  fail "debootstrap failed (log tail above names the package)"
fi
guest_py=$(chroot "$root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$guest_py" = 3.11 ] || fail "guest python is $guest_py, the pinned wheels are for 3.11"

lib=$root/opt/hyperstart/lib
step "installing the pinned wheels into /opt/hyperstart/lib"
mkdir -p "$lib"
if ! "$python" -m pip install -q --no-deps --only-binary=:all: --target "$lib" \
    --implementation cp --python-version 3.11 --abi cp311 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -r "$here/requirements-guest.txt" >"$work/pip.log" 2>&1; then
  tail -n 20 "$work/pip.log" >&2
  fail "pip could not install the guest wheels (log tail above)"
fi
rm -rf "$lib"/bin "$lib"/*.dist-info/RECORD

step "installing the agent"
cp -r "$top/hyperstart-agent/hyperstart_agent" "$lib/"
find "$lib" -name __pycache__ -prune -exec rm -rf {} +
install -m 0755 "$here/hyperstart-init" "$root/sbin/hyperstart"

step "stripping what the agent does not need"
rm -rf "$root"/usr/lib/python3.11/{test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data,distutils/tests} \
  "$root"/usr/lib/python3.11/{sqlite3,dbm,curses,xmlrpc} "$lib"/*.dist-info
# ssl off sys.path: asyncio, which grpc imports at boot, then skips loading _ssl and libssl
# (0.2 s of a TCG boot). pyroute2 imports ssl, so hyperstart_agent.network puts this directory
# on sys.path before its first netlink call.
ondemand=$root/opt/hyperstart/ondemand
mkdir -p "$ondemand"
mv "$root"/usr/lib/python3.11/ssl.py "$root"/usr/lib/python3.11/lib-dynload/_ssl.*.so "$ondemand/"
find "$root/usr/lib/python3.11" "$lib" -name __pycache__ -prune -exec rm -rf {} +

step "byte-compiling with the guest's python (the image is read-only)"
chroot "$root" /usr/bin/python3 -m compileall -q --invalidation-mode unchecked-hash \
  /usr/lib/python3.11 /opt/hyperstart/lib /opt/hyperstart/ondemand >"$work/compile.log" 2>&1 \
  || { tail -n 20 "$work/compile.log" >&2; fail "byte-compiling failed"; }

# The image holds only what PID 1 runs: the interpreter, its stdlib, the agent and its wheels,
# and the shared libraries they load (found with the guest's own ldd). No shell, no apt, no dpkg.
step "assembling the minimal tree"
cat >"$root/tmp/assemble.sh" <<'SH'
set -eu
out=/.min
mkdir "$out"
cd /
cp -a bin sbin lib lib64 "$out/"          # the merged-/usr symlinks
copy() {  # copy PATH (file or dir) under its real directory, plus the file a symlink names
  real_dir=$(realpath "$(dirname "$1")")
  cp -a --parents "${real_dir#/}/$(basename "$1")" "$out/"
  if [ -L "$1" ]; then target=$(realpath "$1"); cp -a --parents "${target#/}" "$out/"; fi
}
for path in /usr/bin/python3.11 /usr/bin/python3 /usr/lib/python3.11 /opt/hyperstart \
    /usr/sbin/hyperstart /etc/passwd /etc/group; do
  copy "$path"
done
for so in /usr/bin/python3.11 $(find /usr/lib/python3.11/lib-dynload /opt/hyperstart -name '*.so*'); do
  ldd "$so"
done >/tmp/ldd.txt
if grep 'not found' /tmp/ldd.txt; then echo "a shared library is missing" >&2; exit 1; fi
# libseccomp is opened with dlopen (container seccomp profiles), so ldd cannot see it.
for lib in $(grep -o '/[^ ]*' /tmp/ldd.txt | sort -u) /usr/lib/x86_64-linux-gnu/libseccomp.so.2; do
  copy "$lib"
done
mkdir -p "$out"/proc "$out"/sys "$out"/dev "$out"/run "$out"/tmp
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$out/etc/hosts"
SH
chroot "$root" /bin/sh /tmp/assemble.sh >"$work/assemble.log" 2>&1 \
  || { tail -n 20 "$work/assemble.log" >&2; fail "assembling the minimal tree failed"; }
min=$work/min
mv "$root/.min" "$min"
# Python reads /dev/urandom before PID 1 can mount devtmpfs (initramfs boots): ship the nodes.
for node in "console c 5 1 600" "null c 1 3 666" "zero c 1 5 666" "urandom c 1 9 666" "random c 1 8 666"; do
  set -- $node
  mknod -m "$5" "$min/dev/$1" "$2" "$3" "$4"
done
chroot "$min" /usr/bin/python3.11 -I -S -c 'import sys; sys.path.insert(0, "/opt/hyperstart/lib"); import hyperstart_agent.server
assert "ssl" not in sys.modules, "ssl is on the boot path"
from hyperstart_agent import network; network.import_pyroute2()' \
  || fail "the agent does not import in the minimal tree (a file is missing from it)"
root=$min

step "making rootfs.erofs (lz4hc)"
mkdir -p "$out.new"
mkfs.erofs -zlz4hc "$out.new/rootfs.erofs" "$root" >"$work/mkfs.log" 2>&1 \
  || { tail -n 20 "$work/mkfs.log" >&2; fail "mkfs.erofs failed"; }

step "making initrd.img (zstd cpio)"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | zstd -q -9 -T0 >"$out.new/initrd.img"

"$python" - "$lib/hyperstart_agent/__init__.py" >"$out.new/version" <<'PY'
import re, sys
print(re.search(r'__version__ = "([^"]+)"', open(sys.argv[1]).read()).group(1))
PY
(cd "$root" && du -sk usr/lib/python3.11 opt/hyperstart/lib/* usr/lib/x86_64-linux-gnu 2>/dev/null | sort -rn) >"$out.new/contents.txt"
{
  echo "build_seconds=$((SECONDS - start))"
  echo "tree_kib=$(du -sk "$root" | cut -f1)"
  echo "erofs_bytes=$(stat -c %s "$out.new/rootfs.erofs")"
  echo "initrd_bytes=$(stat -c %s "$out.new/initrd.img")"
} >"$out.new/build.txt"
rm -rf "$out"
mv "$out.new" "$out"
step "done in $((SECONDS - start)) s: $(tr '\n' ' ' <"$out/build.txt")"
