# Sourced by scripts/assets.sh and scripts/cri-assets.sh once they hold their cache lock.
# remove_interrupted PATTERN...: remove the work directories of builds that were interrupted
# (killed, or the machine went down). Every build that makes such a directory holds the same
# lock while it runs, so under it none of them is anyone's. What was mounted in them
# (debootstrap mounts /proc and /sys in its chroot) is unmounted first, and rm does not
# cross into another filesystem.
remove_interrupted() {
  local stale
  for stale in "$@"; do
    [ -e "$stale" ] || continue
    findmnt -rn -o TARGET | awk -v p="$stale/" 'index($0, p) == 1' | sort -r \
      | while read -r point; do umount -l "$point" || true; done
    rm -rf --one-file-system "$stale"
    printf '[assets] removed %s (left by an interrupted build)\n' "$stale" >&2
  done
}
