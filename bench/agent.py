"""bench/agent: the agent's exec latency, stdout throughput and memory, in a real guest, with
the same engine on the host (no VM, no channel) as the baseline of the same run, and a raw byte
copy over a second virtio-serial port as the ceiling of the stdout figure. With the vsock
channel, the stdout and stdin figures through `Stdio` are compared with the same bytes through
a dedicated vsock stream per direction (a relay in the guest copying pipe <-> stream).

    python bench/agent.py [--n 20] [--mib 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Output, Storage
from runv_py.devices import Share
from runv_py.sandbox.sandbox import Sandbox

TOP = Path(__file__).resolve().parent.parent
TRUE = json.dumps({"args": ["true"], "env": ["PATH=/bin"], "cwd": "/"}).encode()

HOST_EXEC = """
import json, os, sys, tempfile, threading, time
sys.path.insert(0, sys.argv[1])
from hyperstart_agent.container import syscalls as sc
from hyperstart_agent.container.engine import Engine
sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
engine = Engine(state_root=tempfile.mkdtemp())
def reap():
    while True:
        try:
            engine.on_exit(*os.waitpid(-1, 0))
        except ChildProcessError:
            time.sleep(0.01)
threading.Thread(target=reap, daemon=True).start()
engine.create("c", sys.argv[2].encode(), stdio="null")
engine.start("c")
samples = []
for i in range(int(sys.argv[3])):
    t = time.monotonic()
    engine.exec("c", f"e{i}", sys.argv[4].encode(), stdio="null")
    engine.wait("c", f"e{i}")
    samples.append(time.monotonic() - t)
engine.remove("c", force=True)
print(json.dumps(samples))
"""


def busybox_rootfs(root: Path) -> Path:
    for d in ("bin", "proc", "dev", "tmp", "sys", "gdev", "usr", "lib", "lib64", "work"):
        (root / d).mkdir(parents=True)
    root.chmod(0o755)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "true", "sleep", "head", "cat", "dd", "["):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def spec(root: str, args: list[str]) -> bytes:
    return json.dumps({
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/"}, "root": {"path": root},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
    }).encode()


def writer(mib: int) -> str:
    """The writer of the stdout figures. busybox `head -c` (before 2026-11-28 evening) moves
    about 4-5 MB/s into a pipe under TCG by itself, which bounded every figure measured with it;
    dd with 64 KiB blocks does not."""
    return f"dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null"


def summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered),
            "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
            "n": len(ordered), "samples": [round(s, 4) for s in samples]}


async def guest(cfg: config.RuntimeConfig, rootfs: Path, n: int, mib: int) -> dict[str, Any]:
    mount = "/run/hyperstart/storage/{}"
    async with await Sandbox.boot(cfg, shares=(Share("r", rootfs, readonly=True),)) as sandbox:
        agent: AgentClient = sandbox.agent  # type: ignore[assignment]
        idle_rss = (await agent.guest_details()).agent_rss_kib
        await agent.create_container("s", spec(mount.format("s"), ["sleep", "600"]),
                                     stdio=False,
                                     storages=(Storage("9p", "r", mount.format("s")),))
        await agent.start_container("s")
        execs = []
        for i in range(n):
            t = time.monotonic()
            await agent.exec_process("s", f"e{i}", TRUE, stdio=False)
            await agent.wait_process("s", f"e{i}", timeout_s=60)
            execs.append(time.monotonic() - t)
        # stdout throughput: a container writing `mib` MiB, read on the host.
        await agent.create_container("w", spec(mount.format("s"), ["sh", "-c", writer(mib)]))
        total = 0
        t = time.monotonic()
        reader = agent.stdio("w")
        await agent.start_container("w")
        async for chunk in reader:
            if chunk.stream == "stdout":
                total += len(chunk.data)
        await agent.wait_process("w", timeout_s=3600)
        throughput = total / (time.monotonic() - t) / 1e6
        raw = await raw_copy(sandbox, agent, mount.format("s"), mib)
        streams = (await stream_copy(sandbox, agent, mount.format("s"), mib)
                   if sandbox.vsock is not None else None)
        for i in range(10):
            await agent.create_container(f"c{i}", spec(mount.format("s"), ["sleep", "600"]),
                                         stdio=False)
            await agent.start_container(f"c{i}")
        busy_rss = (await agent.guest_details()).agent_rss_kib
        return {"exec_s": summary(execs), "stdout_mb_s": throughput, "stdout_bytes": total,
                "raw_copy_mb_s": raw, "vsock_streams": streams,
                "agent_rss_idle_kib": idle_rss, "agent_rss_10_containers_kib": busy_rss}


async def raw_copy(sandbox: Sandbox, agent: AgentClient, root: str, mib: int) -> float | None:
    """The ceiling for the stdout figure: the same writer (`head` in a container) and the same
    kind of channel (a virtio-serial port of the same device, QEMU unix chardev, read by the
    host with asyncio), but a raw byte copy: no gRPC, no HTTP/2, no agent in the path. The
    port is hot-plugged over QMP; the container writes to its device node, found by name."""
    assert sandbox.machine is not None
    if sandbox.vsock is not None:
        return None  # no virtio-serial device to add a port to; bench/vsock.py compares both
    path = sandbox.paths.root / "raw.sock"
    qmp = sandbox.machine.qmp
    await qmp.execute("chardev-add", {"id": "raw", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": str(path)}}, "server": True, "wait": False}}})
    await qmp.execute("device_add", {"driver": "virtserialport", "bus": "vser0.0", "nr": 2,
                                     "chardev": "raw", "id": "raw0", "name": "raw.0"})
    reader, writer = await asyncio.open_unix_connection(str(path))
    size = mib << 20
    script = ("for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = raw.0 ] && "
              f"exec head -c {size} /dev/zero > /gdev/${{p##*/}}; done; "
              "echo no port >&2; exit 1")
    body = json.loads(spec(root, ["sh", "-c", script]))
    body["mounts"] += [{"destination": "/sys", "type": "sysfs", "source": "sysfs"},
                       {"destination": "/gdev", "type": "bind", "source": "/dev",
                        "options": ["rbind"]}]
    await agent.create_container("raw", json.dumps(body).encode(), stdio=False)
    total = 0
    t = time.monotonic()
    await agent.start_container("raw")
    while total < size:
        data = await reader.read(1 << 20)
        if not data:
            break
        total += len(data)
    elapsed = time.monotonic() - t
    if await agent.wait_process("raw", timeout_s=3600) != 0 or total != size:
        raise RuntimeError(f"raw copy: {total} of {size} bytes arrived")
    writer.close()
    return total / elapsed / 1e6


# The dedicated-stream prototype: the agent's job (a pipe on the process's side, a vsock stream
# to the host, the host connecting to a guest listener) done by a relay in the container, fed by
# (or feeding) the same busybox process as the Stdio figure, through a pipe.
RELAY = r'''
import os, socket, sys
mode, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, port))
listener.listen(1)
conn, _ = listener.accept()
if mode == "out":
    while data := os.read(0, 1 << 16):
        conn.sendall(data)
else:
    while data := conn.recv(1 << 16):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
if mode == "out":
    conn.shutdown(socket.SHUT_WR)
conn.close()
'''


READER = "dd of=/dev/null bs=65536 iflag=fullblock"  # it reports (stderr) the blocks it read


def collect(output: AsyncIterator[Output]) -> asyncio.Task[bytes]:
    async def run() -> bytes:
        return b"".join([chunk.data async for chunk in output])
    return asyncio.create_task(run())


async def check_read(agent: AgentClient, container_id: str, report: bytes, size: int) -> None:
    if await agent.wait_process(container_id, timeout_s=3600) != 0 or (
            f"{size >> 16}+0 records in".encode() not in report):
        raise RuntimeError(f"stdin of {container_id}: {report!r}, expected {size} bytes")


def relay_spec(root: str, script: str) -> bytes:
    body = json.loads(spec(root, ["sh", "-c", script]))
    body["process"]["env"] = ["PATH=/bin:/usr/bin"]
    body["mounts"] += [{"destination": "/work", "type": "bind", "source": "/run/hyperstart/files",
                        "options": ["rbind", "ro"]},
                       *({"destination": d, "type": "bind", "source": d,
                          "options": ["rbind", "ro"]} for d in ("/usr", "/lib", "/lib64"))]
    return json.dumps(body).encode()


def connect_stream(uds: Path, port: int) -> socket.socket:
    deadline = time.monotonic() + 120
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(600)
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = sock.makefile("rb", buffering=0).readline()
        if line.startswith(b"OK"):
            return sock
        sock.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"guest port {port} never listened")
        time.sleep(0.05)


def drain(sock: socket.socket) -> int:
    total = 0
    while data := sock.recv(1 << 20):
        total += len(data)
    return total


def feed(sock: socket.socket, size: int) -> None:
    block = b"y" * (1 << 20)
    for _ in range(size >> 20):
        sock.sendall(block)
    sock.shutdown(socket.SHUT_WR)


async def stream_copy(sandbox: Sandbox, agent: AgentClient, root: str, mib: int
                      ) -> dict[str, float]:
    """stdout and stdin of `mib` MiB through a dedicated vsock stream (host connects to the
    guest's listener through the hybrid socket), and stdin through `Stdio` for comparison. The
    stream timers start once the relay accepted (the agent would not pay the relay's Python
    start-up); the writer is held by its full pipe until then."""
    size = mib << 20
    uds = sandbox.paths.vsock.uds
    await agent.copy_file("/run/hyperstart/files/relay.py", RELAY.encode())
    await agent.create_container("so", relay_spec(
        root, f"{writer(mib)} | python3 /work/relay.py out 6001"), stdio=False)
    await agent.start_container("so")
    sock = await asyncio.to_thread(connect_stream, uds, 6001)
    t = time.monotonic()
    total = await asyncio.to_thread(drain, sock)
    sock.close()
    out = total / (time.monotonic() - t) / 1e6
    if await agent.wait_process("so", timeout_s=3600) != 0 or total != size:
        raise RuntimeError(f"stdout stream: {total} of {size} bytes arrived")
    await agent.create_container("si", relay_spec(
        root, f"python3 /work/relay.py in 6002 | {READER}"))
    report = collect(agent.stdio("si"))
    await agent.start_container("si")
    sock = await asyncio.to_thread(connect_stream, uds, 6002)
    t = time.monotonic()
    await asyncio.to_thread(feed, sock, size)
    await check_read(agent, "si", await report, size)
    stream_in = size / (time.monotonic() - t) / 1e6
    sock.close()

    async def blocks() -> AsyncIterator[bytes]:
        block = b"y" * (1 << 20)
        for _ in range(mib):
            yield block

    await agent.create_container("gi", spec(root, ["sh", "-c", READER]))
    t = time.monotonic()
    report = collect(agent.stdio("gi", stdin=blocks()))
    await agent.start_container("gi")
    await check_read(agent, "gi", await report, size)
    grpc_in = size / (time.monotonic() - t) / 1e6
    return {"stdout_mb_s": out, "stdin_mb_s": stream_in, "grpc_stdin_mb_s": grpc_in}


def host(rootfs: Path, n: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", HOST_EXEC, str(TOP / "hyperstart-agent"),
         spec(str(rootfs), ["sleep", "600"]).decode(), str(n), TRUE.decode()],
        check=True, capture_output=True, text=True)
    return {"exec_s": summary(json.loads(out.stdout))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--config")
    parser.add_argument("--json")
    args = parser.parse_args()
    base = config.load(args.config)
    work = Path(tempfile.mkdtemp(prefix="runv-bench-agent-"))
    try:
        rootfs = busybox_rootfs(work / "rootfs")
        cfg = replace(base, state_dir=work / "state")
        result = {"guest": asyncio.run(guest(cfg, rootfs, args.n, args.mib)),
                  "host": host(rootfs, args.n)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    g, h = result["guest"], result["host"]
    print("bench/agent")
    print(f"  exec true, guest   median {g['exec_s']['median']:.3f} s  p90 "
          f"{g['exec_s']['p90']:.3f} s  n {g['exec_s']['n']}")
    print(f"  exec true, host    median {h['exec_s']['median']:.3f} s  p90 "
          f"{h['exec_s']['p90']:.3f} s  (same engine, no VM)")
    print(f"  ratio guest/host   {g['exec_s']['median'] / h['exec_s']['median']:.1f}x")
    print(f"  stdout             {g['stdout_mb_s']:.1f} MB/s ({g['stdout_bytes']} bytes)")
    if g["raw_copy_mb_s"] is None:
        print("  raw copy ceiling   n/a with the vsock channel (see bench/vsock.py)")
    else:
        print(f"  raw copy ceiling   {g['raw_copy_mb_s']:.1f} MB/s (same writer, a second "
              "virtio-serial port, no gRPC)")
    if g["vsock_streams"] is not None:
        vs = g["vsock_streams"]
        print(f"  stdout, vsock stream {vs['stdout_mb_s']:.1f} MB/s "
              f"({vs['stdout_mb_s'] / g['stdout_mb_s']:.1f}x Stdio; dedicated stream, relay)")
        print(f"  stdin, Stdio         {vs['grpc_stdin_mb_s']:.1f} MB/s")
        print(f"  stdin, vsock stream  {vs['stdin_mb_s']:.1f} MB/s "
              f"({vs['stdin_mb_s'] / vs['grpc_stdin_mb_s']:.1f}x Stdio)")
    print(f"  agent RSS          idle {g['agent_rss_idle_kib']} KiB, with 10 containers "
          f"{g['agent_rss_10_containers_kib']} KiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
