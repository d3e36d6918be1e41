"""The owner of one sandbox's vsock backend process (runv-vsock): started before QEMU (QEMU
connects to its vhost-user socket), stopped by pid after QEMU; it dies with its owner
(parent-death signal)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import child, forked
from ..errors import HypervisorError
from .kernel import CidClaim, claim_cid

START_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class VsockPaths:
    vhost: Path  # QEMU's end (vhost-user)
    uds: Path  # hybrid vsock: CONNECT <port>; guest connections to host port P reach uds_P
    forwards: tuple[tuple[Path, int], ...] = ()  # unix listeners bound to one guest port each


class VsockBackend:
    def __init__(self, paths: VsockPaths, log_path: Path, *, connect_wait_s: float = 0.0,
                 debug: bool = False, claim: CidClaim | None = None,
                 qemu_pid: int | None = None, qemu_pid_file: Path | None = None) -> None:
        """With `claim` the guest's vsock is the kernel's vhost-vsock with the claimed CID
        (QEMU gets the claim's fd) and only the forward listeners run (runv_py.vsock.forward);
        without, our vhost-user backend serves guest CID 3 (hybrid vsock has no host-global
        CIDs). With `qemu_pid` our backend reaches guest memory through that QEMU's address
        space instead of mapping it (a template clone's RAM is private to its QEMU);
        `qemu_pid_file` is the same for a backend started before its QEMU: the owner writes
        QEMU's pid there (write_qemu_pid) before QEMU connects, and only that process may."""
        self.paths = paths
        self.claim = claim
        self.cid = claim.cid if claim else 3
        self.kernel = claim is not None
        self.log_path = log_path
        self.connect_wait_s = connect_wait_s
        self.debug = debug
        self.qemu_pid = qemu_pid
        self.qemu_pid_file = qemu_pid_file
        self.child: child.Child[Any] | None = None

    def argv(self) -> list[str]:
        if self.kernel:
            return [sys.executable, "-m", "runv_py.vsock.forward", f"--cid={self.cid}",
                    f"--connect-wait={self.connect_wait_s}",
                    *(f"--forward={path}={port}" for path, port in self.paths.forwards)]
        argv = [sys.executable, "-m", "runv_py.vsock", f"--socket={self.paths.vhost}",
                f"--uds={self.paths.uds}", f"--cid={self.cid}",
                f"--connect-wait={self.connect_wait_s}"]
        argv += [f"--forward={path}={port}" for path, port in self.paths.forwards]
        if self.qemu_pid is not None:
            argv.append(f"--qemu-pid={self.qemu_pid}")
        if self.qemu_pid_file is not None:
            argv.append(f"--qemu-pid-file={self.qemu_pid_file}")
        argv.append(f"--log={self.log_path}")
        if self.debug:
            argv.append("--debug")
        return argv

    async def start(self) -> None:
        """Forked from this process where it can be (forked.py): the backend then shares this
        interpreter's pages and skips a new one's start."""
        argv = self.argv()
        with open(self.log_path, "ab") as log_file:
            # By the arguments that name its VM directory (runv gc finds it by them).
            if forked.can_fork(argv[2], argv[3:] if self.kernel else argv[3:4]):
                if self.kernel:
                    from .forward import main
                else:
                    from .keeper import main
                self.child = await forked.fork_main(main, argv[2], argv[3:], stdout=log_file,
                                                    stderr=log_file)
            else:
                self.child = await child.spawn(argv, stdout=log_file, stderr=log_file)
        deadline = time.monotonic() + START_TIMEOUT_S
        wanted = [path for path, _ in self.paths.forwards]
        if not self.kernel:
            wanted += [self.paths.vhost, self.paths.uds]
        while not all(path.exists() for path in wanted):
            if self.child.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise HypervisorError(f"the vsock backend did not start (its log: "
                                      f"{self.log_path})")
            await asyncio.sleep(0.005)

    def write_qemu_pid(self, pid: int) -> None:
        assert self.qemu_pid_file is not None
        temp = self.qemu_pid_file.with_name(self.qemu_pid_file.name + ".tmp")
        temp.write_text(str(pid))
        temp.replace(self.qemu_pid_file)

    @classmethod
    def for_host(cls, paths: VsockPaths, log_path: Path, *, connect_wait_s: float = 0.0,
                 debug: bool = False) -> VsockBackend:
        """Kernel vhost-vsock where /dev/vhost-vsock is usable, else ours."""
        return cls(paths, log_path, connect_wait_s=connect_wait_s, debug=debug,
                   claim=claim_cid())

    async def connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to the guest's listener on `port`: through the hybrid socket (CONNECT,
        answered OK), or with the kernel's vhost-vsock a vsock socket to the claimed CID."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if self.kernel:
                    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    try:
                        await asyncio.get_running_loop().sock_connect(sock, (self.cid, port))
                    except BaseException:
                        sock.close()
                        raise
                    return await asyncio.open_connection(sock=sock)
                reader, writer = await asyncio.open_unix_connection(str(self.paths.uds))
                try:
                    writer.write(f"CONNECT {port}\n".encode())
                    answer = await reader.readline()
                except BaseException:
                    writer.close()
                    raise
                if not answer.startswith(b"OK "):
                    writer.close()
                    raise ConnectionRefusedError(f"the guest refused port {port}")
                return reader, writer
        except (OSError, TimeoutError) as exc:
            raise HypervisorError(f"vsock: cannot connect to guest port {port}: "
                                  f"{exc or type(exc).__name__}") from exc

    def release_cid(self) -> None:
        """Once QEMU runs it holds the CID (its copy of the fd): close ours. Idempotent."""
        if self.claim is not None:
            self.claim.close()

    async def stop(self) -> None:
        self.release_cid()
        if self.child is not None:
            # More than the keeper's own wait for its worker (keeper.WORKER_STOP_S).
            await self.child.stop(grace_s=5.0)
