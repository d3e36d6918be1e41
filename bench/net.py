"""bench/net: TCP throughput and request round trip between a container and a peer network
namespace, three ways on the same machine in the same run:

  runv    the container in a runv VM, its netns (veth to the peer) mirrored to a tap by tc
  direct  the same VM, kernel, virtio-net device and container workload, but the NIC's tap
          sits in the peer namespace itself: no veth, no tc (the VM's own network cost)
  runc    the same bundle under runc in the same veth setup (no VM at all)

The container sends --mib MiB with `dd | nc` to a sink in the peer (timed there, first byte to
last), then serves `nc -l -e cat`; the peer makes --n one-byte round trips to it.

    python bench/net.py [--mib 64] [--n 200] [--rounds 3] [--json FILE]
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runv_py import config
from runv_py.agent.client import AgentClient
from runv_py.agent.convert import Interface, IPAddress, Storage
from runv_py.devices import Nic, Share, TapFd
from runv_py.network import endpoint
from runv_py.network.netns import NetNs
from runv_py.sandbox.guest_vm import GuestVm

RUNV = str(Path(sys.executable).parent / "runv")
SINK_PORT, ECHO_PORT = 5001, 5002
TAG = f"rvbn{os.getpid()}"
NET = 250  # 10.250.<n>.0/24: one subnet per setup, inside this benchmark's namespaces only
DIRECT_MAC = "02:00:0a:fa:03:02"


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


# -- the peer's side: run inside the peer namespace as `bench/net.py --serve ...` ------------

def serve(addr: str, expect: int, target: str, n: int) -> None:
    """Sink `expect` bytes, then time `n` one-byte round trips to target's echo server;
    prints the figures as JSON."""
    listener = socket.create_server((addr, SINK_PORT))
    conn, _ = listener.accept()
    received, started = 0, 0.0
    while received < expect:
        data = conn.recv(1 << 20)
        if not data:
            break
        if not started:
            started = time.monotonic()
        received += len(data)
    seconds = time.monotonic() - started
    conn.close()
    deadline = time.monotonic() + 120
    while True:
        try:
            echo = socket.create_connection((target, ECHO_PORT), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    echo.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for _ in range(n + 5):
        t = time.monotonic()
        echo.sendall(b"x")
        if echo.recv(1) != b"x":
            raise RuntimeError("the echo server went away")
        samples.append(time.monotonic() - t)
    echo.close()
    print(json.dumps({"bytes": received, "seconds": seconds, "rtt": samples[5:]}))


# -- the three setups ---------------------------------------------------------------------

def workload(peer: str, mib: int) -> list[str]:
    return ["sh", "-c", f"dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null | "
                        f"nc {peer} {SINK_PORT}; exec nc -l -p {ECHO_PORT} -e cat"]


def bundle(top: Path, args: list[str], netns: str | None) -> Path:
    path = top / f"bundle-{len(list(top.glob('bundle-*')))}"
    root = path / "rootfs"
    for d in ("bin", "proc", "dev", "tmp", "sys", "etc"):
        (root / d).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "dd", "nc", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if netns is not None:
        namespaces.append({"type": "network", "path": netns})
    (path / "config.json").write_text(json.dumps({
        "ociVersion": "1.1.0",
        "process": {"user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"],
                    "cwd": "/"},
        "root": {"path": "rootfs"}, "hostname": "bench",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
        "linux": {"namespaces": namespaces}}))
    return path


class Namespaces:
    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str) -> str:
        sh("ip", "netns", "add", TAG + name)
        self.names.append(TAG + name)
        sh("ip", "-n", TAG + name, "link", "set", "lo", "up")
        return TAG + name

    def veth_pair(self, sub: int) -> tuple[str, str]:
        """A container namespace and its peer, 10.NET.sub.2 and .1."""
        container, peer = self.add(f"c{sub}"), self.add(f"p{sub}")
        sh("ip", "-n", container, "link", "add", "eth0", "type", "veth", "peer", "name",
           "peer0", "netns", peer)
        for ns, ifname, host in ((container, "eth0", 2), (peer, "peer0", 1)):
            sh("ip", "-n", ns, "addr", "add", f"10.{NET}.{sub}.{host}/24", "dev", ifname)
            sh("ip", "-n", ns, "link", "set", ifname, "up")
        return container, peer

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def peer_server(peer: str, sub: int, mib: int, n: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", peer, sys.executable, __file__, "--serve",
         f"10.{NET}.{sub}.1", str(mib << 20), f"10.{NET}.{sub}.2", str(n)],
        stdout=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while f":{SINK_PORT} ".encode() not in subprocess.run(
            ["ip", "netns", "exec", peer, "ss", "-Hltn"], capture_output=True,
            check=False).stdout:
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("the peer's sink did not start")
        time.sleep(0.1)
    return server


def figures(server: subprocess.Popen[bytes], stop: Any) -> dict[str, Any]:
    try:
        out, _ = server.communicate(timeout=600)
    finally:
        stop()
    raw = json.loads(out)
    rtt = sorted(raw["rtt"])
    return {"mbit_s": round(raw["bytes"] * 8 / raw["seconds"] / 1e6, 1),
            "rtt_ms_median": round(statistics.median(rtt) * 1e3, 3),
            "rtt_ms_p90": round(rtt[round(0.9 * (len(rtt) - 1))] * 1e3, 3)}


def oci(binary: str, *, top: Path, env: dict[str, str], mib: int, n: int, sub: int,
        spaces: Namespaces) -> dict[str, Any]:
    container, peer = spaces.veth_pair(sub)
    path = bundle(top, workload(f"10.{NET}.{sub}.1", mib), f"/run/netns/{container}")
    root = top / f"{binary.rsplit('/', 1)[-1]}-root"
    server = peer_server(peer, sub, mib, n)
    run = subprocess.Popen([binary, "--root", str(root), "run", "--bundle", str(path), "b"],
                           env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def stop() -> None:
        subprocess.run([binary, "--root", str(root), "kill", "b", "KILL"], env=env,
                       check=False, capture_output=True)
        run.wait(timeout=60)
        subprocess.run([binary, "--root", str(root), "delete", "--force", "b"], env=env,
                       check=False, capture_output=True)
        server.kill()

    return figures(server, stop)


async def direct(cfg: config.RuntimeConfig, *, top: Path, mib: int, n: int, sub: int,
                 spaces: Namespaces) -> dict[str, Any]:
    peer = spaces.add(f"p{sub}")
    netns = NetNs(f"/run/netns/{peer}")
    tap = netns.run(lambda: endpoint.open_tap("tapbench"))
    sh("ip", "-n", peer, "addr", "add", f"10.{NET}.{sub}.1/24", "dev", "tapbench")
    sh("ip", "-n", peer, "link", "set", "tapbench", "up")
    rootfs = bundle(top, ["true"], None) / "rootfs"
    server = peer_server(peer, sub, mib, n)
    mount = "/run/hyperstart/storage/b"
    try:
        async with await GuestVm.boot(
                cfg, shares=(Share("r", rootfs, readonly=True),),
                nics=(Nic("net0", DIRECT_MAC, backend=TapFd(tap)),)) as sandbox:
            agent: AgentClient = sandbox.agent  # type: ignore[assignment]
            await agent.update_interface(Interface(
                name="eth0", hw_addr=DIRECT_MAC,
                ip_addresses=(IPAddress(f"10.{NET}.{sub}.2", 24),)))
            spec = json.loads((rootfs.parent / "config.json").read_text())
            spec["root"]["path"] = mount
            spec["process"]["args"] = workload(f"10.{NET}.{sub}.1", mib)
            await agent.create_container("b", json.dumps(spec).encode(), stdio=False,
                                         storages=(Storage("9p", "r", mount),))
            await agent.start_container("b")
            return await asyncio.to_thread(figures, server, server.kill)
    finally:
        os.close(tap)
        netns.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config")
    parser.add_argument("--json")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        addr, expect, target, n = args.serve
        serve(addr, int(expect), target, int(n))
        return 0
    top = Path(tempfile.mkdtemp(prefix="runv-bench-net-"))
    spaces = Namespaces()
    state = top / "state"
    cfg_path = top / "config.toml"
    cfg_path.write_text(f'state_dir = "{state}"\n[hypervisor]\nboot_timeout_s = 120\n')
    env = dict(os.environ, RUNV_CONFIG=args.config or str(cfg_path))
    result: dict[str, Any] = {"mib": args.mib, "n": args.n, "rounds": args.rounds}
    runs: dict[str, list[dict[str, Any]]] = {"runv": [], "direct": [], "runc": []}
    try:
        cfg = replace(config.load(args.config or str(cfg_path)), state_dir=state)
        sub = 0
        # The machine's load drifts: rounds alternate which VM goes first, and each figure is
        # a median over rounds.
        for round_ in range(args.rounds):
            print(f"[bench/net] round {round_ + 1}/{args.rounds}: runv (tc mirroring), the "
                  "same VM on a direct tap, runc", file=sys.stderr)
            vm_runs: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
                ("runv", lambda sub: oci(RUNV, top=top, env=env, mib=args.mib, n=args.n,
                                         sub=sub, spaces=spaces)),
                ("direct", lambda sub: asyncio.run(direct(cfg, top=top, mib=args.mib,
                                                          n=args.n, sub=sub, spaces=spaces)))]
            for name, measure in vm_runs[::1 if round_ % 2 == 0 else -1]:
                runs[name].append(measure(sub := sub + 1))
            if shutil.which("runc"):
                runs["runc"].append(oci("runc", top=top, env=env, mib=args.mib, n=args.n,
                                        sub=(sub := sub + 1), spaces=spaces))
    finally:
        spaces.close()
        shutil.rmtree(top, ignore_errors=True)
    for name, samples in runs.items():
        if samples:
            result[name] = {key: statistics.median(s[key] for s in samples)
                            for key in samples[0]}
            result[name]["rounds"] = samples
    runv, base = result["runv"], result["direct"]
    result["runv_vs_direct"] = {
        "throughput": round(runv["mbit_s"] / base["mbit_s"], 3),
        "rtt": round(runv["rtt_ms_median"] / base["rtt_ms_median"], 3)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
