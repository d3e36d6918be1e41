"""Who QEMU runs as: never root, and without capabilities unless it must serve files.

- A uid and gid of its own per owning process (UID_BASE + the owner's pid): QEMU dies with its
  owner (parent-death signal), so the id is free again when the pid is reused, and the QEMUs of
  two sandboxes cannot signal or trace each other. No supplementary groups but /dev/kvm's
  under KVM.
- no_new_privs, an empty bounding set, and QEMU's own seccomp filter (cmdline.SECCOMP).
- It opens no path in the sandbox's state dir: the owner opens the sockets and QEMU inherits
  them (cmdline.InheritedEnds; a hot-plugged device's by QMP getfd).
- A VM that serves a virtio-9p share, or whose RAM is a template's memory file, keeps exactly
  FILE_SERVER_CAPS: QEMU is then the file server of the container's root filesystem (files of
  any owner: read, write, chown), and QEMU 7.2 opens a template's memory file read-write
  even for a private copy-on-write mapping. No CAP_MKNOD (no device node on the host for a
  guest), no CAP_FSETID or CAP_SETFCAP, nothing else.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from .cmdline import VmConfig

UID_BASE = 2_000_000_000   # far above login users and the usual subordinate-id ranges
FILE_SERVER_CAPS = ("chown", "dac_override", "dac_read_search", "fowner")


@dataclass(frozen=True, slots=True)
class QemuIdentity:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    caps: tuple[str, ...] = ()

    def setpriv_args(self) -> list[str]:
        """util-linux setpriv options that make the exec'd QEMU this identity."""
        caps = "".join(f",+{cap}" for cap in self.caps)
        groups = (f"--groups={','.join(str(g) for g in self.groups)}" if self.groups
                  else "--clear-groups")
        return [f"--reuid={self.uid}", f"--regid={self.gid}", groups, "--no-new-privs",
                f"--inh-caps=-all{caps}", f"--ambient-caps=-all{caps}",
                f"--bounding-set=-all{caps}"]


def identity(config: VmConfig) -> QemuIdentity:
    own = UID_BASE + os.getpid()
    groups: tuple[int, ...] = ()
    if config.accel == "kvm":
        with contextlib.suppress(OSError):
            groups = (os.stat("/dev/kvm").st_gid,)
    serves_files = config.memory_file is not None or any(
        share.driver == "9p" for share in config.shares)
    return QemuIdentity(own, own, groups, FILE_SERVER_CAPS if serves_files else ())
