"""bench/vsock: the agent channel's transports in one run: a 1-byte round trip and bulk
throughput both ways over vsock (runv-py's vhost-user backend mapping the guest's shared
memory, a cold boot) and over a virtio-serial port of the same VM, with the same guest program
on both; the same over vsock in a template clone (the backend reaches the clone's private
memory through QEMU's /proc/<pid>/mem); then the agent's gRPC Check round trip over each
channel (another VM boots with the serial channel).

    python bench/vsock.py [--n 500] [--mib 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runv_py import assets, config
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Storage
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm, VmPaths, vm_config
from runv_py.vm import accel
from runv_py.vm.qemu.cmdline import AGENT_PORT_NAME
from runv_py.vm.qemu.machine import QemuMachine
from runv_py.vsock.backend import VsockBackend

PORT = 5000
MOUNT = "/run/hyperstart/storage/bench"

# The guest side: one handler per byte stream (a vsock connection or the serial port).
# Requests: b"E" + 1 byte -> the byte back; b"T" + u64 n + n bytes -> b"K"; b"S" + u64 n -> n
# bytes.
GUEST = r'''
import os, socket, struct, sys, threading, time

def exact(read, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = read(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)

def serve(read, write):
    block = b"x" * (1 << 20)
    while True:
        op = exact(read, 1)
        if op == b"E":
            write(exact(read, 1))
        elif op == b"T":
            left = struct.unpack("<Q", exact(read, 8))[0]
            while left:
                chunk = read(min(left, 1 << 20))
                if not chunk:
                    raise EOFError
                left -= len(chunk)
            write(b"K")
        elif op == b"S":
            left = struct.unpack("<Q", exact(read, 8))[0]
            while left:
                part = block[:min(left, len(block))]
                write(part)
                left -= len(part)

def writer(fd):
    def write(data):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write

def vsock(port):
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        def run(conn=conn):
            try:
                serve(conn.recv, conn.sendall)
            except (EOFError, OSError):
                pass
            conn.close()
        threading.Thread(target=run, daemon=True).start()

def serial(name):
    for entry in os.listdir("/sys/class/virtio-ports"):
        with open(f"/sys/class/virtio-ports/{entry}/name") as f:
            if f.read().strip() == name:
                fd = os.open(f"/gdev/{entry}", os.O_RDWR)
                break
    else:
        return  # no such port (a clone: the agent's port is the agent's)
    while True:
        try:
            serve(lambda n: os.read(fd, n), writer(fd))
        except EOFError:
            time.sleep(0.05)  # the host is not connected

threading.Thread(target=serial, args=(sys.argv[2],), daemon=True).start()
vsock(int(sys.argv[1]))
'''


def busybox_rootfs(root: Path) -> Path:
    for d in ("bin", "proc", "dev", "sys", "usr", "lib", "lib64", "work", "gdev"):
        (root / d).mkdir(parents=True)
    root.chmod(0o755)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    return root


def guest_spec(args: list[str]) -> bytes:
    ro = ["rbind", "ro"]
    return json.dumps({
        "process": {"args": args, "env": ["PATH=/usr/bin:/bin"], "cwd": "/"},
        "root": {"path": MOUNT, "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/sys", "type": "sysfs", "source": "sysfs"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                   {"destination": "/gdev", "type": "bind", "source": "/dev",
                    "options": ["rbind"]},
                   {"destination": "/work", "type": "bind", "source": "/run/hyperstart/files",
                    "options": ro},
                   *({"destination": d, "type": "bind", "source": d, "options": ro}
                     for d in ("/usr", "/lib", "/lib64"))],
        # The serial port's device node (/gdev/vport*) is not among a container's default
        # devices: the device cgroup refuses it unless the spec allows it.
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
                  "resources": {"devices": [{"allow": True, "access": "rwm"}]}},
    }).encode()


def exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the guest closed the stream")
        buf += chunk
    return bytes(buf)


def measure(sock: socket.socket, n: int, mib: int) -> dict[str, Any]:
    rtts = []
    for i in range(n):
        byte = bytes([i % 256])
        t = time.monotonic()
        sock.sendall(b"E" + byte)
        if exact(sock, 1) != byte:
            raise RuntimeError("echo mismatch")
        rtts.append(time.monotonic() - t)
    size = mib << 20
    block = b"y" * (1 << 20)
    t = time.monotonic()
    sock.sendall(b"T" + struct.pack("<Q", size))
    for _ in range(mib):
        sock.sendall(block)
    if exact(sock, 1) != b"K":
        raise RuntimeError("no ack")
    to_guest = size / (time.monotonic() - t) / 1e6
    t = time.monotonic()
    sock.sendall(b"S" + struct.pack("<Q", size))
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the guest closed the stream")
        left -= len(chunk)
    from_guest = size / (time.monotonic() - t) / 1e6
    return {"rtt_median_s": statistics.median(rtts), "rtt_p90_s": sorted(rtts)[int(0.9 * n)],
            "to_guest_mb_s": to_guest, "from_guest_mb_s": from_guest}


def connect_vsock(uds: Path, port: int) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(120)
        sock.connect(str(uds))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = sock.makefile("rb", buffering=0).readline()
        if line.startswith(b"OK"):
            return sock
        sock.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"guest port {port} never listened")
        time.sleep(0.1)


async def check_rtt(agent: AgentClient, n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.monotonic()
        await agent.check()
        samples.append(time.monotonic() - t)
    return statistics.median(samples)


async def transports(cfg: config.RuntimeConfig, rootfs: Path, n: int, mib: int
                     ) -> dict[str, Any]:
    """One VM with the vsock device (the agent's channel) and a virtio-serial port."""
    paths = VmPaths(cfg.state_dir / "bench")
    paths.root.mkdir(parents=True)
    backend = VsockBackend(paths.vsock, paths.vsock_log,
                           connect_wait_s=cfg.hypervisor.boot_timeout_s)
    vm = vm_config(cfg, "bench-vsock", paths, assets.find(cfg.guest.assets_dir),
                   accel.choose(cfg.hypervisor.accelerator),
                   shares=(Share("r", rootfs, readonly=True),))
    serial_sock = paths.root / "serial.sock"
    machine = QemuMachine(replace(vm, agent_socket=serial_sock), paths.qemu_log)
    agent = AgentClient(paths.agent_socket)
    try:
        await backend.start()
        await machine.start()
        await agent.wait_ready(cfg.hypervisor.boot_timeout_s)
        await agent.copy_file("/run/hyperstart/files/bench.py", GUEST.encode())
        await agent.create_container("g", guest_spec(
            ["python3", "/work/bench.py", str(PORT), AGENT_PORT_NAME]), stdio=False,
            storages=(Storage("9p", "r", MOUNT),))
        await agent.start_container("g")
        vsock = await asyncio.to_thread(connect_vsock, paths.vsock.uds, PORT)
        serial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        serial.settimeout(120)
        serial.connect(str(serial_sock))
        result = {"vsock": await asyncio.to_thread(measure, vsock, n, mib),
                  "serial": await asyncio.to_thread(measure, serial, n, mib),
                  "grpc_check_vsock_s": await check_rtt(agent, n)}
        vsock.close()
        serial.close()
        return result
    finally:
        await agent.close()
        await machine.close()
        await backend.stop()


async def clone(cfg: config.RuntimeConfig, rootfs: Path, n: int, mib: int) -> dict[str, Any]:
    """A template clone (the template is built first if missing): vsock only."""
    async with await GuestVm.boot(replace(cfg, template="auto"),
                                  shares=(Share("r", rootfs, readonly=True),)) as sandbox:
        assert sandbox.agent is not None and sandbox.channel == "vsock"
        if not sandbox.start_path.startswith("template"):
            raise RuntimeError(f"the clone booted {sandbox.start_path}: see its log")
        agent = sandbox.agent
        await agent.copy_file("/run/hyperstart/files/bench.py", GUEST.encode())
        await agent.create_container("g", guest_spec(
            ["python3", "/work/bench.py", str(PORT), "none"]), stdio=False,
            storages=(Storage("9p", "r", MOUNT),))
        await agent.start_container("g")
        vsock = await asyncio.to_thread(connect_vsock, sandbox.paths.vsock.uds, PORT)
        try:
            result = await asyncio.to_thread(measure, vsock, n, mib)
        finally:
            vsock.close()
        result["grpc_check_s"] = await check_rtt(agent, n)
        return result


async def serial_check(cfg: config.RuntimeConfig, n: int) -> float:
    serial_cfg = replace(cfg, guest=replace(cfg.guest, channel="serial"))
    async with await GuestVm.boot(serial_cfg) as sandbox:
        assert sandbox.agent is not None
        return await check_rtt(sandbox.agent, n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="round trips per measure")
    parser.add_argument("--mib", type=int, default=64, help="MiB per bulk transfer")
    parser.add_argument("--config")
    parser.add_argument("--json")
    args = parser.parse_args()
    base = config.load(args.config)
    work = Path(tempfile.mkdtemp(prefix="runv-bench-vsock-"))
    try:
        rootfs = busybox_rootfs(work / "rootfs")
        cfg = replace(base, state_dir=work / "state")
        print("bench/vsock: one VM with both transports ...", flush=True)
        result = asyncio.run(transports(cfg, rootfs, args.n, args.mib))
        print("bench/vsock: a template clone, vsock through /proc/<pid>/mem ...", flush=True)
        result["vsock_clone"] = asyncio.run(clone(cfg, rootfs, args.n, args.mib))
        print("bench/vsock: a VM with the serial agent channel ...", flush=True)
        result["grpc_check_serial_s"] = asyncio.run(serial_check(cfg, args.n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    v, c, s = result["vsock"], result["vsock_clone"], result["serial"]
    print("bench/vsock            vsock cold (mmap)  vsock clone (/proc/pid/mem)  serial"
          "           clone/cold  cold/serial")
    for name, key, unit, scale in (("1-byte round trip", "rtt_median_s", "ms", 1000),
                                   ("  p90", "rtt_p90_s", "ms", 1000),
                                   ("host -> guest", "to_guest_mb_s", "MB/s", 1),
                                   ("guest -> host", "from_guest_mb_s", "MB/s", 1)):
        print(f"  {name:18} {v[key] * scale:8.2f} {unit:5}      {c[key] * scale:8.2f} {unit:5}"
              f"                 {s[key] * scale:8.2f} {unit:5}   {c[key] / v[key]:8.2f}"
              f"  {v[key] / s[key]:8.2f}")
    gv, gc, gs = (result["grpc_check_vsock_s"], c["grpc_check_s"],
                  result["grpc_check_serial_s"])
    print(f"  {'gRPC Check':18} {gv * 1000:8.2f} ms         {gc * 1000:8.2f} ms"
          f"                    {gs * 1000:8.2f} ms      {gc / gv:8.2f}  {gv / gs:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
