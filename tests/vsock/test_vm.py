"""vsock in a real guest over runv-py's vhost-user backend: the agent's channel, a guest
program's connections both ways, bulk transfers with checksums, half-close, backend restart.

`cold` boots map the guest's shared memory; `clone`s (the default start path) hot-plug the
device after restoring a template and reach their private memory through QEMU's
/proc/<pid>/mem."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Output, Storage
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm

PROG = Path(__file__).parent / "guest" / "vsockprog.py"
MOUNT = "/run/hyperstart/storage/{}"
BULK = 256 << 20
# No byte moving for this long is a stall (a transfer runs at 10 MB/s and more under TCG).
STALL_S = 120.0


@pytest.fixture(scope="session")
def vsock_rootfs(busybox_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox plus mount points for the guest's own python3 (bound in from the guest)."""
    root = tmp_path_factory.mktemp("vsockroot") / "root"
    shutil.copytree(busybox_rootfs, root, symlinks=True)
    for d in ("usr", "lib", "lib64"):
        (root / d).mkdir(exist_ok=True)
    return root


ROOT = MOUNT.format("vsockroot")


def cold(cfg: config.RuntimeConfig) -> config.RuntimeConfig:
    return replace(cfg, template="off")


def started(cfg: config.RuntimeConfig, start: str) -> config.RuntimeConfig:
    return cold(cfg) if start == "cold" else replace(cfg, template="auto")


def _spec(args: list[str]) -> bytes:
    ro = ["rbind", "ro"]
    return json.dumps({
        "ociVersion": "1.1.0",
        "process": {"args": args, "env": ["PATH=/usr/bin:/bin"], "cwd": "/"},
        "root": {"path": ROOT, "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["mode=755"]},
            *({"destination": d, "type": "bind", "source": d, "options": ro}
              for d in ("/usr", "/lib", "/lib64")),
            {"destination": "/work", "type": "bind", "source": "/run/hyperstart/files",
             "options": ro},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }).encode()


async def _collect(stream: AsyncIterator[Output]) -> bytes:
    out = b""
    async for chunk in stream:
        out += chunk.data
    return out


async def _guest_program(agent: AgentClient, cid: str, *args: str,
                         first: bool = True) -> asyncio.Task[bytes]:
    """Starts vsockprog.py in a container; the task gives its output once it exits. The
    first program mounts the rootfs share, later ones use that mount."""
    await agent.copy_file("/run/hyperstart/files/vsockprog.py", PROG.read_bytes())
    storages = (Storage("9p", "rootfs0", ROOT),) if first else ()
    await agent.create_container(cid, _spec(["python3", "/work/vsockprog.py", *args]),
                                 storages=storages)
    output = asyncio.create_task(_collect(agent.stdio(cid)))
    await agent.start_container(cid)
    return output


def hybrid_connect(uds: Path, port: int, timeout: float = 60.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ConnectionRefusedError(f"guest port {port}: nobody listens")
            line += chunk
        assert line.startswith(b"OK "), line
    except BaseException:
        sock.close()
        raise
    return sock


def wait_listening(uds: Path, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            hybrid_connect(uds, port).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def echo(uds: Path, port: int, data: bytes) -> bytes:
    with hybrid_connect(uds, port) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        return got


def _run(cfg: config.RuntimeConfig, rootfs: Path,
         body: Callable[[GuestVm, AgentClient], Awaitable[None]]) -> None:
    async def main() -> None:
        shares = (Share("rootfs0", rootfs, readonly=True),)
        async with await GuestVm.boot(cfg, shares=shares) as sandbox:
            assert sandbox.agent is not None and sandbox.channel == "vsock"
            clone = sandbox.start_path in ("template", "template-built")
            assert clone == (cfg.template == "auto"), sandbox.start_path
            try:
                await body(sandbox, sandbox.agent)
            except Exception as exc:
                exc.add_note(_evidence(sandbox))
                raise

    asyncio.run(main())


def _evidence(sandbox: GuestVm) -> str:
    """What a stalled transfer leaves to go on: the guest's console (its ring errors) and the
    backend's log, the ends of both."""
    parts = []
    for path in (sandbox.paths.console_log, sandbox.paths.vsock_log):
        try:
            lines = path.read_text(errors="replace").splitlines()[-15:]
        except OSError as exc:
            lines = [f"({exc.strerror})"]
        parts.append(f"{path.name}, last lines:\n" + "\n".join(lines))
    return "\n".join(parts)


def test_agent_runs_over_vsock_by_default(runtime_config: config.RuntimeConfig) -> None:
    assert runtime_config.guest.channel == "vsock"
    runtime_config = cold(runtime_config)

    async def main() -> None:
        async with await GuestVm.boot(runtime_config) as sandbox:
            assert sandbox.agent is not None and sandbox.vsock is not None
            version = await sandbox.agent.version()
            assert "channel.vsock" in version.features
            assert "hyperstart.channel=vsock:1024" in sandbox.machine.config.kernel_cmdline
            assert "vhost-user-vsock-device" in " ".join(sandbox.machine.child.argv)
            # many independent gRPC connections, unlike the one virtio-serial session
            clients = [AgentClient(sandbox.paths.agent_socket) for _ in range(50)]
            try:
                assert all(await asyncio.gather(*(c.check() for c in clients)))
            finally:
                for c in clients:
                    await c.close()
            for _ in range(100):
                client = AgentClient(sandbox.paths.agent_socket)
                try:
                    assert await client.check()
                finally:
                    await client.close()
            assert await sandbox.agent.check()

    asyncio.run(main())


def test_serial_channel_still_works(runtime_config: config.RuntimeConfig) -> None:
    cfg = replace(cold(runtime_config), guest=replace(runtime_config.guest, channel="serial"))

    async def main() -> None:
        async with await GuestVm.boot(cfg) as sandbox:
            assert sandbox.agent is not None and sandbox.vsock is None
            assert "hyperstart.channel=serial:" in sandbox.machine.config.kernel_cmdline
            assert await sandbox.agent.check()
            agent = await sandbox.reconnect_agent()
            assert await agent.check()

    asyncio.run(main())


@pytest.mark.parametrize(("start", "bulk"), [("cold", BULK), ("clone", 64 << 20)])
def test_many_connections_half_close_and_bulk_both_ways(
        runtime_config: config.RuntimeConfig, vsock_rootfs: Path, start: str,
        bulk: int) -> None:
    async def body(sandbox: GuestVm, agent: AgentClient) -> None:
        uds = sandbox.paths.vsock.uds
        server = await _guest_program(agent, "srv", "serve", "5000")
        await asyncio.to_thread(wait_listening, uds, 5000)

        def sequential() -> None:
            for i in range(1000):
                data = f"ping {i}".encode()
                assert echo(uds, 5000, data) == data

        t0 = time.monotonic()
        await asyncio.to_thread(sequential)
        seq_s = time.monotonic() - t0

        def concurrent() -> None:
            errors: list[BaseException] = []

            def one(i: int) -> None:
                try:
                    data = os.urandom(64 * 1024)
                    assert echo(uds, 5000, data) == data
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors[:3]

        await asyncio.to_thread(concurrent)

        def host_to_guest() -> None:
            block = hashlib.sha256(b"host").digest() * (1 << 15)  # 1 MiB
            digest = hashlib.sha256()
            with hybrid_connect(uds, 5000, timeout=STALL_S) as sock:
                sock.sendall(f"SUM {bulk}\n".encode())
                for _ in range(bulk // len(block)):
                    sock.sendall(block)
                    digest.update(block)
                sock.shutdown(socket.SHUT_WR)  # half-close: the answer still comes back
                reply = sock.makefile("rb").readline().decode().split()
            assert reply == [str(bulk), digest.hexdigest()]

        t0 = time.monotonic()
        await asyncio.to_thread(host_to_guest)
        h2g_s = time.monotonic() - t0

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_6000")
        listener.listen()
        listener.settimeout(120)

        def guest_to_host() -> str:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(STALL_S)
                digest = hashlib.sha256()
                total = 0
                while chunk := conn.recv(1 << 20):
                    digest.update(chunk)
                    total += len(chunk)
                conn.sendall(f"got {total}\n".encode())  # after the guest's half-close
            return digest.hexdigest()

        receiving = asyncio.create_task(asyncio.to_thread(guest_to_host))
        t0 = time.monotonic()
        sender = await _guest_program(agent, "snd", "send", "6000", str(bulk), first=False)
        assert await agent.wait_process("snd", timeout_s=300) == 0
        g2h_s = time.monotonic() - t0
        host_digest = await receiving
        listener.close()
        guest_digest, *reply = (await sender).decode().split()
        assert guest_digest == host_digest and reply == ["got", str(bulk)]
        print(f"\n{start}: 1000 sequential connections: {seq_s:.1f}s; {bulk >> 20} MiB "
              f"host->guest {bulk / h2g_s / 1e6:.1f} MB/s, guest->host "
              f"{bulk / g2h_s / 1e6:.1f} MB/s")
        await agent.signal_process("srv", "", signal.SIGKILL)
        await agent.wait_process("srv", timeout_s=60)
        server.cancel()
        assert await agent.check()
        _rings_sound(sandbox)

    _run(started(runtime_config, start), vsock_rootfs, body)


def _rings_sound(sandbox: GuestVm) -> None:
    """Neither side saw the other break the ring protocol."""
    assert "not a head" not in sandbox.paths.console_log.read_text()
    log = sandbox.paths.vsock_log.read_text()
    assert "dropped from the guest" not in log and "device bug" not in log


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


@pytest.mark.parametrize("start", ["cold", "clone"])
def test_backend_killed_and_restarted_without_the_vm_dying(
        runtime_config: config.RuntimeConfig, vsock_rootfs: Path, start: str) -> None:
    async def body(sandbox: GuestVm, agent: AgentClient) -> None:
        assert sandbox.vsock is not None and sandbox.vsock.child is not None
        uds = sandbox.paths.vsock.uds
        await _guest_program(agent, "srv", "serve", "5000")
        await asyncio.to_thread(wait_listening, uds, 5000)
        held = await asyncio.to_thread(hybrid_connect, uds, 5000)
        keeper = sandbox.vsock.child.pid
        for round_ in range(2):
            [worker] = _children(keeper)
            os.kill(worker, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _children(keeper) in ([], [worker]):
                assert time.monotonic() < deadline, "no new worker"
                await asyncio.sleep(0.05)
            # connections open at the crash are gone; new ones work, the agent's too
            if round_ == 0:
                assert held.recv(10) == b""
                held.close()
            data = b"after restart %d" % round_
            assert await asyncio.to_thread(echo, uds, 5000, data) == data
            agent = await sandbox.reconnect_agent()
            assert await agent.check()
        assert sandbox.machine is not None and sandbox.machine.child is not None
        assert sandbox.machine.child.returncode is None
        log = sandbox.paths.vsock_log.read_text()
        assert log.count("starting a new one") == 2 and "took over QEMU's connection" in log
        _rings_sound(sandbox)

    _run(started(runtime_config, start), vsock_rootfs, body)


def test_guest_resets_the_device_then_the_backend_restarts(
        runtime_config: config.RuntimeConfig, vsock_rootfs: Path) -> None:
    """The guest unbinds and rebinds its vsock driver (a device reset: QEMU stops the rings and
    sets them up again); connections work again, also after a backend restart that has to
    replay that history."""
    async def body(sandbox: GuestVm, agent: AgentClient) -> None:
        assert sandbox.vsock is not None and sandbox.vsock.child is not None
        uds = sandbox.paths.vsock.uds
        await _guest_program(agent, "srv", "serve", "5000")
        await asyncio.to_thread(wait_listening, uds, 5000)
        drv = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport"
        spec = json.loads(_spec(["sh", "-c", f"d=$(basename {drv}/virtio*); "
                                             f"echo $d > {drv}/unbind && echo $d > {drv}/bind"]))
        spec["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs"})
        await agent.create_container("reset", json.dumps(spec).encode(), stdio=False)
        await agent.start_container("reset")
        # the agent's own connection goes down with the driver: once the rings have stopped,
        # reconnect to see the result
        deadline = time.monotonic() + 60
        while "vring 0 stopped" not in sandbox.paths.vsock_log.read_text():
            assert time.monotonic() < deadline, "the guest did not reset its vsock device"
            await asyncio.sleep(0.1)
        agent = await sandbox.reconnect_agent(timeout_s=60)
        assert await agent.wait_process("reset", timeout_s=60) == 0
        assert await asyncio.to_thread(echo, uds, 5000, b"after reset") == b"after reset"
        [worker] = _children(sandbox.vsock.child.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _children(sandbox.vsock.child.pid) in ([], [worker]):
            assert time.monotonic() < deadline, "no new worker"
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(echo, uds, 5000, b"and restart") == b"and restart"
        agent = await sandbox.reconnect_agent()
        assert await agent.check()
        _rings_sound(sandbox)

    _run(cold(runtime_config), vsock_rootfs, body)
