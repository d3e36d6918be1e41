"""Kernel vhost-vsock, where /dev/vhost-vsock is usable: a host-unique guest CID claimed on an
open /dev/vhost-vsock fd and handed to QEMU with that fd (`vhostfd=`). The kernel refuses a CID
that another open fd holds (EADDRINUSE), so the claim itself is the lock: no two sandboxes can
get the same CID, and the CID is free again when the last holder (QEMU) closes the fd."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import HypervisorError

DEVICE = Path("/dev/vhost-vsock")
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
FIRST_CID = 3
TRIES = 4096


@dataclass(slots=True)
class CidClaim:
    fd: int
    cid: int

    def close(self) -> None:
        """Idempotent."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def claim_cid(device: Path = DEVICE, hint: int | None = None) -> CidClaim | None:
    """A CID held on a new fd, or None if the device is missing or unusable. Tries from
    `hint` (default: derived from our pid, so parallel starts rarely contend) upwards."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    start = hint if hint is not None else os.getpid()
    span = 0xFFFFFFFF - FIRST_CID
    for i in range(TRIES):
        cid = FIRST_CID + (start + i) % span
        try:
            fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("<Q", cid))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            os.close(fd)
            return None
        return CidClaim(fd, cid)
    os.close(fd)
    raise HypervisorError(f"no free vsock CID in {TRIES} tries on {device}")
