#!/usr/bin/env bash
# The raw-boot floor for benchmarks: a busybox initramfs whose /init prints a marker on the
# console and powers the VM off, or with runv.floor=idle on the kernel command line sleeps
# (bench/density's bare idle VM). OUT gets floor.img and marker.
# Usage: images/build-floor.sh OUT
set -euo pipefail

out=${1:?usage: build-floor.sh OUT}
marker=RUNV-FLOOR-READY
busybox=/bin/busybox
fail() { printf '[floor] error: %s\n' "$*" >&2; exit 1; }
for cand in /bin/busybox /usr/bin/busybox; do
  if [ -x "$cand" ] && ! ldd "$cand" >/dev/null 2>&1; then busybox=$cand; break; fi
done
ldd "$busybox" >/dev/null 2>&1 && fail "$busybox is not static: apt-get install busybox-static"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc}
cp "$busybox" "$work/bin/busybox"
cat >"$work/init" <<INIT
#!/bin/busybox sh
/bin/busybox echo $marker
/bin/busybox mount -t proc proc /proc
case " \$(/bin/busybox cat /proc/cmdline) " in
  *" runv.floor=idle "*) while :; do /bin/busybox sleep 1000000; done ;;
esac
/bin/busybox poweroff -f
INIT
chmod 0755 "$work/init"
mkdir -p "$out.new"
(cd "$work" && find . | cpio -o -H newc --quiet) | gzip -9 >"$out.new/floor.img"
echo "$marker" >"$out.new/marker"
rm -rf "$out"
mv "$out.new" "$out"
printf '[floor] done: %s (%s bytes)\n' "$out/floor.img" "$(stat -c %s "$out/floor.img")" >&2
