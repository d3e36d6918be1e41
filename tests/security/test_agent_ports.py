"""Boundary: the agent's own vsock ports. The host reaches the agent on port 1024 (gRPC) and
1025 (stdio streams) of the guest; a container may open AF_VSOCK sockets too (when its seccomp
profile lets it). The agent binds both ports at boot, before any container exists, and never
lets go: it used to close its listener after an accept error and bind again, and in between a
container could bind 1024 and be the agent the host talks to.

The accept error is injected as a hostile container could: one that shares the guest's pid
namespace lowers PID 1's open-file limit (same uid: no capability needed), so that the agent's
next accept fails with EMFILE."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hyperstart_agent import channel

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm
from tests.security.guest import SHARE_TAG, python_rootfs, python_spec, storages  # noqa: F401
from tests.vm.conftest import runtime_config  # noqa: F401

TAKE_THE_PORT = r'''
import errno, json, resource, socket, sys, time

def bind(port):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        s.bind((socket.VMADDR_CID_ANY, port))
        s.listen(1)
        return s
    except OSError as exc:
        s.close()
        return errno.errorcode[exc.errno]

def name(result):
    return "bound" if isinstance(result, socket.socket) else result

seen = {"before": [name(bind(1024)), name(bind(1025))]}
soft, hard = resource.prlimit(1, resource.RLIMIT_NOFILE)
# fds 0-2 of PID 1 are the console: with a limit of 3 every new fd of the agent is over it,
# the ones it has stay open, and poll(2) of up to 3 of them still works (0 would break it).
resource.prlimit(1, resource.RLIMIT_NOFILE, (3, hard))
print("lowered", flush=True)
sys.stdin.readline()  # the host has connected to both ports meanwhile
held = []
deadline = time.monotonic() + 4
while time.monotonic() < deadline and not held:
    held = [s for s in (bind(1024), bind(1025)) if isinstance(s, socket.socket)]
    time.sleep(0.05)
seen["during"] = [name(bind(1024)), name(bind(1025))] if not held else ["bound"]
resource.prlimit(1, resource.RLIMIT_NOFILE, (soft, hard))
if held:  # the host's next connection is ours
    print("taken", flush=True)
    held[0].settimeout(30)
    try:
        conn, peer = held[0].accept()
        seen["host_connected_to_the_container"] = peer[0]
    except OSError as exc:
        seen["accept"] = str(exc)
print(json.dumps(seen), flush=True)
'''


class FailingListener:
    """A listening socket whose first accepts fail as they do when the agent is out of fds."""

    def __init__(self, sock: socket.socket, failures: int) -> None:
        self.sock = sock
        self.family = sock.family
        self.failures = failures
        self.closed = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.closed = True


def test_accept_errors_leave_the_listener_open(tmp_path: Path) -> None:
    server_path = str(tmp_path / "server.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(server_path)
    server.listen(8)
    inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # stands in for AF_VSOCK
    inner.bind(str(tmp_path / "channel.sock"))
    inner.listen(8)
    listener = FailingListener(inner, failures=5)
    splice = channel.VsockSplice(1024, server_path)
    serving = threading.Thread(target=splice.serve, args=(listener,), daemon=True)
    serving.start()
    server.settimeout(10)
    spare, _ = server.accept()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(str(tmp_path / "channel.sock"))
    host.sendall(b"after-the-errors")
    spare.settimeout(10)
    assert spare.recv(64) == b"after-the-errors"
    assert listener.failures == 0 and not listener.closed
    second, _ = server.accept()  # the next connection's, made ahead again
    inner.shutdown(socket.SHUT_RDWR)
    for s in (host, spare, second, server, inner):
        s.close()
    serving.join(5)
    assert not serving.is_alive(), "the splice kept serving a closed listener"


@pytest.mark.vm
def test_a_container_cannot_take_the_agents_ports_after_an_accept_error(
        runtime_config: config.RuntimeConfig, python_rootfs: Path) -> None:  # noqa: F811
    async def main() -> None:
        async with await GuestVm.boot(runtime_config, shares=(
                Share(SHARE_TAG, python_rootfs, readonly=True),)) as sandbox:
            agent = sandbox.agent
            assert agent is not None and agent.dial is not None
            await agent.copy_file("/run/hyperstart/files/take.py", TAKE_THE_PORT.encode())
            # No pid namespace: the guest's, whose PID 1 is the agent.
            await agent.create_container(
                "taker", python_spec("taker", "take.py", namespaces=("mount", "ipc", "uts")),
                storages=storages("taker"))
            triggered = asyncio.Event()

            async def stdin() -> AsyncIterator[bytes]:
                await triggered.wait()
                yield b"go\n"

            stdout = b""
            stream = agent.stdio("taker", stdin=stdin())
            await agent.start_container("taker")
            dials = []
            async for chunk in stream:
                stdout += chunk.data if chunk.stream == "stdout" else b""
                if b"lowered" in stdout and not triggered.is_set():
                    # New connections to both ports: the agent's accepts fail (EMFILE).
                    dials = [asyncio.create_task(agent.dial(port)) for port in (1024, 1025)]
                    await asyncio.sleep(1.0)
                    triggered.set()
                if b"taken" in stdout and len(dials) == 2:
                    # The host's next connection to the agent's port reaches the container.
                    dials.append(asyncio.create_task(agent.dial(1024)))
            assert await agent.wait_process("taker", timeout_s=120) == 0
            seen = json.loads(stdout.splitlines()[-1])
            assert seen == {"before": ["EADDRINUSE", "EADDRINUSE"],
                            "during": ["EADDRINUSE", "EADDRINUSE"]}, seen
            for task in dials:
                task.cancel()
            for result in await asyncio.gather(*dials, return_exceptions=True):
                if isinstance(result, tuple):
                    result[1].close()
            await agent.remove_container("taker")
            # The channel survived: a new connection still reaches the agent.
            assert await _fresh_check(sandbox.paths.agent_socket)

    asyncio.run(asyncio.wait_for(main(), 600))


async def _fresh_check(socket_path: Path) -> bool:
    """A new gRPC connection (a new vsock stream to port 1024) asks the agent."""
    client = AgentClient(socket_path, handshake_timeout_s=30)
    try:
        return await client.check(timeout_s=30, wait_for_ready=True)
    finally:
        await client.close()
