"""The host's end of a virtio-serial agent channel, held by us instead of by grpc.

grpc dials a private abstract unix socket of the relay; each connection it makes there is
spliced to a connection of the relay's own to QEMU's chardev socket. What this buys is
close(): grpc leaves a connection whose HTTP/2 handshake has not completed open after
`channel.close()`, until its connect timeout, which for the agent is as long as a boot may take
(client.py, `_channel_options`). QEMU then keeps the port's host attached, the guest never sees
the session end, and whoever waits for the guest to reopen its port (the template build,
`GuestVm.reconnect_agent`) times out. The relay closes its connections to QEMU at once.

An abstract socket has no file mode: any process in the network namespace may connect. The
relay serves only connections from its own process (SO_PEERCRED), i.e. grpc's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
from pathlib import Path

CHUNK = 256 * 1024
_CREDS = struct.Struct("3i")  # pid, uid, gid


class SerialRelay:
    def __init__(self, upstream: Path) -> None:
        """Listens at once (grpc may dial before the accepting task first runs); needs a
        running event loop."""
        loop = asyncio.get_running_loop()
        self.upstream = upstream
        self.address = f"runv-agent-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind("\0" + self.address)
            self._listener.listen(4)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self._splices: set[asyncio.Task[None]] = set()
        self._accepting = loop.create_task(self._accept())

    @property
    def target(self) -> str:
        """The grpc target to dial instead of QEMU's socket."""
        return f"unix-abstract:{self.address}"

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            if _CREDS.unpack(creds)[0] != os.getpid():
                conn.close()
                continue
            task = loop.create_task(self._splice(conn))
            self._splices.add(task)
            task.add_done_callback(self._splices.discard)

    async def _splice(self, down: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            down.setblocking(False)
            up.setblocking(False)
            try:
                await loop.sock_connect(up, str(self.upstream))
            except OSError:
                return  # grpc sees its connection end and reports the agent unavailable
            copies = {loop.create_task(_copy(down, up)), loop.create_task(_copy(up, down))}
            try:
                # Either end closing ends the session: a half-open one means nothing to grpc,
                # nor to the guest (one host connection is one guest session).
                await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in copies:
                    task.cancel()
                await asyncio.gather(*copies, return_exceptions=True)
        finally:
            up.close()
            down.close()

    async def close(self) -> None:
        """Close every connection to QEMU and the listener. Idempotent."""
        tasks = [self._accepting, *self._splices]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._listener.close()


async def _copy(src: socket.socket, dst: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while data := await loop.sock_recv(src, CHUNK):
            await loop.sock_sendall(dst, data)
