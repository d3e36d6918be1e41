"""The guest's own early mounts (/proc, /sys, /dev, /run, /tmp), done by PID 1 through mount(2)."""

from __future__ import annotations

import os

from .container.syscalls import MS_NODEV, MS_NOEXEC, MS_NOSUID, mount


def is_mounted(target: str) -> bool:
    # Before /proc is mounted there is no mountinfo: a mount point differs from its parent's
    # device.
    try:
        parent = os.path.dirname(target.rstrip("/")) or "/"
        return os.stat(target).st_dev != os.stat(parent).st_dev
    except FileNotFoundError:
        return False


EARLY_MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
)


def mount_early() -> list[str]:
    """Mount what PID 1 needs; returns one message per failure instead of raising."""
    failures: list[str] = []
    for source, target, fstype, flags, data in EARLY_MOUNTS:
        try:
            if is_mounted(target):
                continue
            os.makedirs(target, exist_ok=True)
            mount(source, target, fstype, flags, data)
        except OSError as exc:
            failures.append(str(exc))
    return failures
