"""virtiofsd: one daemon per virtio-fs share, started before QEMU (QEMU connects to its
vhost-user socket at start) and stopped after it. It dies with its owner (parent-death signal)
and runs with its own sandboxing (namespaces, pivot_root into the shared directory, seccomp),
as root (it acts as the guest's users on the share) without CAP_MKNOD, CAP_SETFCAP and
CAP_FSETID."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .. import child
from ..devices import Share
from ..errors import HypervisorError

START_TIMEOUT_S = 10.0


class Virtiofsd:
    def __init__(self, binary: str, share: Share, log_path: Path) -> None:
        assert share.socket is not None
        self.binary = binary
        self.share = share
        self.log_path = log_path
        self.child: child.Spawned | None = None

    async def start(self) -> None:
        assert self.share.socket is not None
        argv = [self.binary, f"--socket-path={self.share.socket}",
                "-o", f"source={self.share.path}", "-o", "cache=auto",
                "-o", "announce_submounts", "-o", "xattr",
                # No device nodes, no file capabilities, no setgid kept across a write or a
                # chown made for the guest (docs/security.md).
                "-o", "modcaps=-mknod:-setfcap:-fsetid"]
        with open(self.log_path, "ab") as log_file:
            try:
                self.child = await child.spawn(argv, stdout=log_file, stderr=log_file)
            except OSError as exc:
                raise HypervisorError(f"cannot start {self.binary}: {exc.strerror} "
                                      "(set [hypervisor] virtiofsd, or use shared_fs = "
                                      "\"9p\")") from None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.share.socket.exists():
            if self.child.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise HypervisorError(f"virtiofsd for {self.share.path} did not start "
                                      f"(its log: {self.log_path})")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(grace_s=2.0)
