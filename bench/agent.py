"""bench/agent: the agent's exec latency, stdout throughput and memory, in a real guest, with
the same engine on the host (no VM, no channel) as the baseline of the same run, and a raw byte
copy over a second virtio-serial port as the ceiling of the stdout figure (serial channel).
stdout and stdin throughput go through the Stdio RPC and, with the vsock channel, also
through the process's own vsock stream (StdioStream), in the same guest.

    python bench/agent.py [--n 20] [--mib 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
from runv_py.agent.convert import Storage
from runv_py.devices import Share
from runv_py.sandbox.guest_vm import GuestVm

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
    for d in ("bin", "proc", "dev", "tmp", "sys", "gdev"):
        (root / d).mkdir(parents=True)
    root.chmod(0o755)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "true", "sleep", "cat", "dd", "["):
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
    async with await GuestVm.boot(cfg, shares=(Share("r", rootfs, readonly=True),)) as sandbox:
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
        # stdio throughput: `mib` MiB out of (and into) a container, through the Stdio RPC;
        # with the vsock channel also through the process's own vsock stream.
        root = mount.format("s")
        rpc_client = AgentClient(sandbox.paths.agent_socket)  # no dial: the Stdio RPC
        try:
            stdio: dict[str, dict[str, float]] = {
                "rpc": await stdio_throughput(agent, rpc_client, root, mib, "r")}
        finally:
            await rpc_client.close()
        if agent.dial is not None:
            stdio["stream"] = await stdio_throughput(agent, agent, root, mib, "v")
        raw = await raw_copy(sandbox, agent, root, mib)
        for i in range(10):
            await agent.create_container(f"c{i}", spec(mount.format("s"), ["sleep", "600"]),
                                         stdio=False)
            await agent.start_container(f"c{i}")
        busy_rss = (await agent.guest_details()).agent_rss_kib
        return {"exec_s": summary(execs), "stdio_mb_s": stdio, "raw_copy_mb_s": raw,
                "agent_rss_idle_kib": idle_rss, "agent_rss_10_containers_kib": busy_rss}


async def raw_copy(sandbox: GuestVm, agent: AgentClient, root: str, mib: int) -> float | None:
    """The ceiling for the stdout figure: the same writer (dd in a container) and the same
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
              f"exec {writer(mib)} > /gdev/${{p##*/}}; done; "
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


READER = "dd of=/dev/null bs=65536 iflag=fullblock"  # it reports (stderr) the blocks it read


async def stdio_throughput(agent: AgentClient, client: AgentClient, root: str, mib: int,
                           tag: str) -> dict[str, float]:
    """stdout then stdin of `mib` MiB, the stdio through `client`, timed from the container's
    start to its exit status (all output read)."""
    size = mib << 20
    await agent.create_container(f"{tag}o", spec(root, ["sh", "-c", writer(mib)]))
    t = time.monotonic()
    output = client.stdio(f"{tag}o")
    await agent.start_container(f"{tag}o")
    total = sum([len(chunk.data) async for chunk in output if chunk.stream == "stdout"])
    if await agent.wait_process(f"{tag}o", timeout_s=3600) != 0 or total != size:
        raise RuntimeError(f"stdout: {total} of {size} bytes arrived")
    out = size / (time.monotonic() - t) / 1e6

    async def blocks() -> AsyncIterator[bytes]:
        block = b"y" * (1 << 20)
        for _ in range(mib):
            yield block

    await agent.create_container(f"{tag}i", spec(root, ["sh", "-c", READER]))
    t = time.monotonic()
    output = client.stdio(f"{tag}i", stdin=blocks())
    await agent.start_container(f"{tag}i")
    report = b"".join([chunk.data async for chunk in output])
    if await agent.wait_process(f"{tag}i", timeout_s=3600) != 0 or (
            f"{size >> 16}+0 records in".encode() not in report):
        raise RuntimeError(f"stdin: the reader said {report!r}, expected {size} bytes")
    return {"stdout": out, "stdin": size / (time.monotonic() - t) / 1e6}


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
    rpc, stream = g["stdio_mb_s"]["rpc"], g["stdio_mb_s"].get("stream")
    print(f"  stdout, Stdio RPC  {rpc['stdout']:.1f} MB/s")
    print(f"  stdin,  Stdio RPC  {rpc['stdin']:.1f} MB/s")
    if stream is not None:
        print(f"  stdout, vsock stream {stream['stdout']:.1f} MB/s "
              f"({stream['stdout'] / rpc['stdout']:.1f}x the RPC)")
        print(f"  stdin,  vsock stream {stream['stdin']:.1f} MB/s "
              f"({stream['stdin'] / rpc['stdin']:.1f}x the RPC)")
    if g["raw_copy_mb_s"] is None:
        print("  raw copy ceiling   n/a with the vsock channel (see bench/vsock.py)")
    else:
        print(f"  raw copy ceiling   {g['raw_copy_mb_s']:.1f} MB/s (same writer, a second "
              "virtio-serial port, no gRPC)")
    print(f"  agent RSS          idle {g['agent_rss_idle_kib']} KiB, with 10 containers "
          f"{g['agent_rss_10_containers_kib']} KiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
