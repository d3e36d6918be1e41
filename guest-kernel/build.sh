#!/usr/bin/env bash
# Build the runv-py guest kernel from Debian's linux-source-6.1 into OUT (a directory).
# OUT gets vmlinux (PVH entry), bzImage, config (the final .config) and version (a stamp).
# Usage: guest-kernel/build.sh OUT
set -euo pipefail

out=${1:?usage: build.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
tarball=/usr/src/linux-source-6.1.tar.xz
jobs=$(nproc)

step() { printf '[kernel] %s\n' "$*" >&2; }
fail() { printf '[kernel] error: %s\n' "$*" >&2; exit 1; }

[ -r "$tarball" ] || fail "$tarball not found: apt-get install linux-source-6.1"
for tool in bc bison flex make gcc; do
  command -v "$tool" >/dev/null || fail "'$tool' not found: apt-get install bc bison flex build-essential libelf-dev libssl-dev"
done

work=$(mktemp -d "${out%/}.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

step "unpacking $tarball"
start=$SECONDS
tar -C "$work" -xaf "$tarball"
src=$(echo "$work"/linux-source-6.1)
[ -d "$src" ] || fail "unexpected tarball layout: no linux-source-6.1/ inside $tarball"

step "configuring: allnoconfig + fragment.config"
make -C "$src" -s ARCH=x86_64 allnoconfig
(cd "$src" && scripts/kconfig/merge_config.sh -m -O . .config "$here/fragment.config" >/dev/null)
make -C "$src" -s ARCH=x86_64 olddefconfig

step "compiling vmlinux and bzImage with $jobs jobs (about 6 minutes on 2 cores)"
if ! make -C "$src" -s ARCH=x86_64 -j"$jobs" vmlinux bzImage >"$work/make.log" 2>&1; then
  tail -n 40 "$work/make.log" >&2
  fail "compilation failed (log tail above)"
fi

mkdir -p "$out.new"
cp "$src/vmlinux" "$out.new/vmlinux"
strip --strip-debug "$out.new/vmlinux" 2>/dev/null || true
cp "$src/arch/x86/boot/bzImage" "$out.new/bzImage"
cp "$src/.config" "$out.new/config"
release=$(make -C "$src" -s kernelrelease)
printf '%s\n' "$release" >"$out.new/version"
rm -rf "$out"
mv "$out.new" "$out"
step "done in $((SECONDS - start)) s: $out (kernel $release)"
