"""Network labs for the tests: network namespaces, veths and bridges each test makes and
removes (names carry the test process's pid), and a check that no tap, qdisc or namespace
outlives a test. Traffic stays inside these namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Runv, runv, subreaper  # noqa: F401  (fixtures)

NETNS_DIR = Path("/run/netns")


def sh(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


class Lab:
    """Namespaces named <prefix><name>; closing kills what was spawned in them and deletes
    them (with their veths and bridges)."""

    def __init__(self) -> None:
        self.prefix = f"rvn{os.getpid()}"
        self.subnet = os.getpid() % 200 + 20  # 10.<subnet>.x.y
        self.v6 = f"fd{self.subnet:02x}"  # <v6>:x::y
        self.names: list[str] = []
        self.bridges: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def netns(self, name: str) -> str:
        full = self.prefix + name
        sh("ip", "netns", "add", full)
        self.names.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    @staticmethod
    def path(ns: str) -> str:
        return str(NETNS_DIR / ns)

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, *, mtu: int = 1500,
             addr_a: tuple[str, ...] = (), addr_b: tuple[str, ...] = ()) -> None:
        sh("ip", "-n", ns_a, "link", "add", if_a, "mtu", str(mtu), "type", "veth", "peer",
           "name", if_b, "netns", ns_b, "mtu", str(mtu))
        for ns, ifname, addrs in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
            for addr in addrs:
                nodad = ("nodad",) if ":" in addr else ()
                sh("ip", "-n", ns, "addr", "add", addr, "dev", ifname, *nodad)
            sh("ip", "-n", ns, "link", "set", ifname, "up")

    def pair(self, sub: int, *, mtu: int = 1500, v6: bool = False, suffix: str = "",
             host: int = 2) -> tuple[str, str]:
        """A container namespace with eth0 at 10.<subnet>.<sub>.<host>/24 (and
        <v6>:<sub>::<host>/64) and a peer namespace with peer0 at .1 on the other end."""
        container, peer = self.netns("c" + suffix), self.netns("p" + suffix)
        six = (f"{self.v6}:{sub}::{host}/64",) if v6 else ()
        peer_six = (f"{self.v6}:{sub}::1/64",) if v6 else ()
        self.veth(container, "eth0", peer, "peer0", mtu=mtu,
                  addr_a=(f"10.{self.subnet}.{sub}.{host}/24", *six),
                  addr_b=(f"10.{self.subnet}.{sub}.1/24", *peer_six))
        return container, peer

    def spawn(self, ns: str, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        process = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.processes.append(process)
        return process

    def wait_listening(self, ns: str, port: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while f":{port} " not in sh("ip", "netns", "exec", ns, "ss", "-Hltn"):
            assert time.monotonic() < deadline, f"nothing listens on port {port} in {ns}"
            time.sleep(0.1)

    @staticmethod
    def link_state(ns: str, ifname: str) -> tuple[str, list[str]]:
        """The interface's MAC, MTU and addresses, to compare before and after."""
        link = sh("ip", "-n", ns, "-o", "link", "show", ifname).split()
        mac = link[link.index("link/ether") + 1]
        mtu = link[link.index("mtu") + 1]
        words = sh("ip", "-n", ns, "-o", "addr", "show", ifname).split()
        addrs = [words[i + 1] for i, w in enumerate(words) if w in ("inet", "inet6")]
        return f"{mac} mtu {mtu}", sorted(addrs)

    def mirror_state(self, ns: str) -> list[str]:
        """Taps and ingress qdiscs in the namespace (what the runtime adds)."""
        found = [f"tap: {line.split(':')[1].strip()}" for line in
                 sh("ip", "-n", ns, "-o", "link", "show", "type", "tun").splitlines()]
        found += [f"qdisc: {line}" for line in sh("tc", "-n", ns, "qdisc", "show").splitlines()
                  if "ingress" in line]
        return found

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        for ns in self.names:
            sh("ip", "netns", "del", ns, check=False)
        for bridge in self.bridges:
            sh("ip", "link", "del", bridge, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    yield lab
    left = {ns: lab.mirror_state(ns) for ns in lab.names if (NETNS_DIR / ns).exists()}
    lab.close()
    stale = [ns for ns in lab.names if (NETNS_DIR / ns).exists()]
    stale += [b for b in lab.bridges if Path(f"/sys/class/net/{b}").exists()]
    assert not stale, f"left behind: {stale}"
    assert not any(left.values()), f"taps or qdiscs left behind: {left}"


def with_netns(path: str) -> Any:
    def edit(spec: dict[str, Any]) -> None:
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == "network":
                ns["path"] = path
    return edit


def run_output(tool: Runv, cid: str, script: str, edit: Any, timeout: float = 240
               ) -> subprocess.CompletedProcess[bytes]:
    bundle = tool.bundle(["sh", "-c", script], edit)
    return tool("run", "--bundle", str(bundle), cid, check=False, timeout=timeout)


def dump(value: Any) -> str:
    return json.dumps(value, indent=1)


PEER = Path(__file__).with_name("peer.py")


def peer_http(lab: Lab, ns: str, addr: str, port: int = 8080, size: int = 0) -> None:
    lab.spawn(ns, sys.executable, str(PEER), "http", addr, str(port), str(size))
    lab.wait_listening(ns, port)


def fetch(url: str, timeout_s: float = 60) -> bytes:
    """The body at `url` once something answers there (b"" if nothing did in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                return bytes(response.read())
        except OSError:
            time.sleep(0.5)
    return b""
