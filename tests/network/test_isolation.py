"""Sandboxes on the default network are isolated on the host: they cannot reach one another
(only through published ports), cannot reach the host's services, and cannot spoof an address,
a MAC or an ARP answer; egress follows the sandbox's policy. Everything here runs on a bridge,
namespaces and servers of the test's own (set in [network] of config.toml)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runv_py.api import Sandbox
from runv_py.errors import RunvError
from runv_py.network import dns as dns_client
from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401  (fixture)

from .conftest import PEER, Lab, fetch, sh

pytestmark = pytest.mark.vm


class Net:
    """The test's bridge network: 10.<n>.16.0/24 for sandboxes (gateway .1), and peers
    beyond the host on 10.<n>.17.0/24 and 10.<n>.18.0/24, routed by the host."""

    def __init__(self, lab: Lab, hyperctl: Hyperctl, tmp_path: Path) -> None:  # noqa: F811
        self.lab = lab
        self.n = lab.subnet
        self.bridge = f"rvi{os.getpid()}"[:15]
        lab.bridges.append(self.bridge)
        self.gateway = f"10.{self.n}.16.1"
        self.cni = tmp_path / "cni"
        self.hyperctl = hyperctl
        self.servers: list[subprocess.Popen[bytes]] = []

    def configure(self, extra: str = "") -> None:
        self.hyperctl.config.write_text(self.hyperctl.config.read_text() + (
            f'[network]\nbridge = "{self.bridge}"\nsubnet = "10.{self.n}.16.0/24"\n'
            f'cni_data_dir = "{self.cni}"\n{extra}'))

    def peer(self, sub: int, name: str) -> str:
        """A namespace beyond the host at 10.<n>.<sub>.2, routed through the host."""
        ns = self.lab.netns(name)
        host_if = f"rvi{os.getpid() % 100000}{name}"[:15]
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "peer0", "netns", ns)
        sh("ip", "addr", "add", f"10.{self.n}.{sub}.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"10.{self.n}.{sub}.2/24", "dev", "peer0")
        sh("ip", "-n", ns, "link", "set", "peer0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", f"10.{self.n}.{sub}.1")
        return ns

    def host_server(self, address: str, port: int) -> None:
        """An HTTP server in the host's namespace, on an address of the test's bridge."""
        self.servers.append(subprocess.Popen(
            [sys.executable, str(PEER), "http", address, str(port), "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 120
        while f"{address}:{port} " not in sh("ss", "-Hltn"):
            assert time.monotonic() < deadline, "the host server did not start"
            time.sleep(0.1)

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait()


def peer_http(lab: Lab, ns: str, address: str, port: int) -> None:
    """An HTTP server in a peer namespace (a Python start-up: slow on a loaded host)."""
    lab.spawn(ns, sys.executable, str(PEER), "http", address, str(port), "0")
    lab.wait_listening(ns, port, timeout_s=120)


@pytest.fixture
def net(lab: Lab, hyperctl: Hyperctl, tmp_path: Path) -> Iterator[Net]:  # noqa: F811
    network = Net(lab, hyperctl, tmp_path)
    yield network
    network.close()


def _tables() -> str:
    return sh("nft", "list", "tables")


def _lease(hyperctl: Hyperctl, name: str, tenant: str = "") -> dict[str, str]:  # noqa: F811
    scope = hyperctl.data / "tenants" / tenant if tenant else hyperctl.data
    workload = hyperctl(*(("--tenant", tenant) if tenant else ()), "inspect", name)
    cid = json.loads(workload.stdout)[0]["id"]
    return dict(json.loads((scope / "containers" / cid / "network.json").read_text()))


def _in(hyperctl: Hyperctl, name: str, script: str) -> str:  # noqa: F811
    return hyperctl("exec", name, "sh", "-c", script, check=False).stdout.decode()


def test_sandboxes_reach_each_other_only_through_published_ports_and_cannot_spoof(
        hyperctl: Hyperctl, net: Net) -> None:  # noqa: F811
    net.configure()
    port = 31000 + os.getpid() % 10000
    hyperctl("run", "-d", "--name", "a", "--network", "default", "-p", f"{port}:8080",
             "busybox", "sh", "-c", "echo from-a > /index.html; exec httpd -f -p 8080 -h /")
    hyperctl("run", "-d", "--name", "b", "--network", "default", "--cap-add", "NET_ADMIN",
             "busybox", "sleep", "600")
    a, b = _lease(hyperctl, "a"), _lease(hyperctl, "b")
    a_ip, b_ip = a["addresses"][0].split("/")[0], b["addresses"][0].split("/")[0]
    assert fetch(f"http://{net.gateway}:{port}/index.html") == b"from-a\n"
    net.host_server(net.gateway, port + 1)
    get = "wget -q -O - http://{}/index.html 2>&1; echo status=$?"

    # directly: nothing (the old code served A's page to B)
    assert "status=0" not in _in(hyperctl, "b", get.format(f"{a_ip}:8080"))
    # through the published port on the host: A answers
    assert "from-a\nstatus=0" in _in(hyperctl, "b", get.format(f"{net.gateway}:{port}"))
    # a host service on the bridge's address: refused at once
    out = _in(hyperctl, "b", get.format(f"{net.gateway}:{port + 1}"))
    assert "Connection refused" in out and "status=1" in out, out

    # ARP: B claims A's address; the host still sends A's traffic to A's MAC
    out = _in(hyperctl, "b", f"ip addr add {a_ip}/32 dev eth0; "
                             f"arping -U -c 3 -w 3 -I eth0 -s {a_ip} {net.gateway}; "
                             f"ip addr del {a_ip}/32 dev eth0; echo done")
    assert "done" in out, out
    neighbour = sh("ip", "neigh", "show", a_ip, "dev", net.bridge)
    assert b["mac"] not in neighbour, neighbour
    assert fetch(f"http://{net.gateway}:{port}/index.html") == b"from-a\n"

    # another IPv4 address, then another MAC: cut off from everything
    out = _in(hyperctl, "b", f"ip addr flush dev eth0; ip addr add 10.{net.n}.16.200/24 dev "
                             f"eth0; ip route add default via {net.gateway}; "
                             + get.format(f"{net.gateway}:{port}"))
    assert "status=0" not in out, out
    out = _in(hyperctl, "b", f"ip addr flush dev eth0; ip link set eth0 down; ip link set "
                             f"eth0 address 02:00:00:00:00:42; ip link set eth0 up; "
                             f"ip addr add {b_ip}/24 dev eth0; ip route add default via "
                             f"{net.gateway}; " + get.format(f"{net.gateway}:{port}"))
    assert "status=0" not in out, out

    hyperctl("rm", "-f", "a", "b")
    for lease in (a, b):
        assert lease["sandbox_id"] not in _tables()


def _wait_for_dns(name: str, server: str) -> None:
    """The peer's DNS server answers (its Python start takes a moment under load)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            asyncio.run(dns_client.resolve_a(name, (server,), timeout_s=1))
            return
        except RunvError:
            assert time.monotonic() < deadline, f"the DNS server at {server} never answered"
            time.sleep(0.2)


def test_egress_policy_allows_what_it_names_and_refuses_the_rest(
        hyperctl: Hyperctl, net: Net, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Through the API: a name resolved by the configured DNS server (the only one the
    sandbox may ask), a port of one peer allowed, another port and another peer refused."""
    dns = f"10.{net.n}.17.2"
    net.configure(f'dns = ["{dns}"]\n')
    first, second = net.peer(17, "e1"), net.peer(18, "e2")
    for ns, address in ((first, dns), (second, f"10.{net.n}.18.2")):
        peer_http(lab, ns, address, 8080)
        peer_http(lab, ns, address, 8081)
    lab.spawn(first, sys.executable, str(PEER), "dns", dns, "mirror.test", dns)
    _wait_for_dns("mirror.test", dns)
    for key in ("RUNV_CONFIG", "RUNV_ASSETS_DIR", "HYPERCTL_ROOT", "HYPERCTL_DATA_ROOT"):
        monkeypatch.setenv(key, hyperctl.env[key])
    with Sandbox.create("busybox", network="default", egress="mirror.test:8080",
                        tenant="ci") as box:
        def get(url: str) -> str:
            result = box.run(["sh", "-c", f"wget -q -O - {url} 2>&1; echo status=$?"])
            return result.stdout.decode()

        assert box.read_file("/etc/resolv.conf") == f"nameserver {dns}\n".encode()
        assert "mss=" in get("http://mirror.test:8080/")
        refused = get(f"http://{dns}:8081/")
        assert "Connection refused" in refused and "status=1" in refused, refused
        assert "status=0" not in get(f"http://10.{net.n}.18.2:8080/")
    assert "ci" in hyperctl.tenants()


def test_egress_all_and_none_and_dns_only_to_the_configured_server(
        hyperctl: Hyperctl, net: Net, lab: Lab) -> None:  # noqa: F811
    dns = f"10.{net.n}.17.2"
    net.configure(f'dns = ["{dns}"]\n')
    first, second = net.peer(17, "n1"), net.peer(18, "n2")
    other = f"10.{net.n}.18.2"
    peer_http(lab, second, other, 8080)
    for ns, address in ((first, dns), (second, other)):
        lab.spawn(ns, sys.executable, str(PEER), "dns", address, "mirror.test", other)
    script = (f"wget -q -O - http://{other}:8080/ 2>&1; echo status=$?; "
              f"nslookup mirror.test {dns} >/dev/null 2>&1; echo configured=$?; "
              f"nslookup mirror.test {other} >/dev/null 2>&1; echo other=$?; ip route")
    done = hyperctl("run", "--rm", "--network", "default", "busybox", "sh", "-c", script)
    # [network] egress defaults to all: anything routed, but DNS to the configured server only
    assert b"mss=" in done.stdout and b"status=0" in done.stdout, done.stdout
    assert b"configured=0" in done.stdout and b"other=1" in done.stdout, done.stdout
    done = hyperctl("run", "--rm", "--network", "default", "--egress", "none", "busybox",
                    "sh", "-c", script)
    assert b"status=0" not in done.stdout and b"configured=1" in done.stdout, done.stdout
    assert b"default" not in done.stdout, done.stdout


def test_a_bad_egress_rule_is_one_line_and_leaves_nothing(hyperctl: Hyperctl,  # noqa: F811
                                                         net: Net) -> None:
    net.configure()
    before = _tables()
    netns = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    for flags, words in ((["--egress", "10.0.0.1:99999"], b"--egress '10.0.0.1:99999': the "
                                                           b"port must be"),
                         (["--dns", "127.0.0.1", "--egress", "no-such-host.invalid"],
                          b"--egress no-such-host.invalid: cannot resolve"),
                         (["--dns", "nameserver"], b"--dns 'nameserver': not an IP")):
        done = hyperctl("run", "--rm", "--network", "default", *flags, "busybox", "true",
                        check=False)
        errors = [line for line in done.stderr.splitlines() if b"error" in line]
        assert done.returncode == 125 and len(errors) == 1 and words in errors[0], done.stderr
    done = hyperctl("run", "--rm", "--egress", "all", "busybox", "true", check=False)
    assert done.returncode == 125 and b"--egress: applies to --network default" in \
        done.stderr
    assert _tables() == before
    assert (set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()) == netns
