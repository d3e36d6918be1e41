"""A container's network namespace (given by path in config.json, as CNI, containerd and
podman give it) extended into the VM with a tap and tc mirroring."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Runv

from .conftest import PEER, Lab, peer_http, run_output, sh, with_netns

ND_COUNTERS = "grep -E 'Icmp6(In|Out)Neighbor' /proc/net/snmp6"


def test_container_fetches_a_page_from_a_peer_namespace(runv: Runv, lab: Lab,
                                                        tmp_path: Path) -> None:
    net = lab.subnet
    container, peer = lab.pair(1)
    before = lab.link_state(container, "eth0")
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from the peer\n")
    lab.spawn(peer, "busybox", "httpd", "-f", "-p", f"10.{net}.1.1:8080", "-h", str(www))
    lab.wait_listening(peer, 8080)

    script = (f"wget -q -O - http://10.{net}.1.1:8080/index.html; "
              "ip -o addr show eth0; ip -o link show eth0")
    result = run_output(runv, "n1", script, with_netns(lab.path(container)))
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "hello from the peer" in out
    assert f"10.{net}.1.2/24" in out
    assert before[0].split()[0] in out  # the guest's NIC has the veth's MAC

    # The caller's veth is as it was; the taps and qdiscs are gone.
    assert lab.mirror_state(container) == []
    assert lab.link_state(container, "eth0") == before


def test_ipv6_routes_and_mtu_9000_end_to_end(runv: Runv, lab: Lab) -> None:
    net = lab.subnet
    container, peer = lab.pair(2, mtu=9000, v6=True)
    # A network behind the peer, reached through a gateway route of the namespace.
    sh("ip", "-n", peer, "addr", "add", f"10.{net}.9.1/32", "dev", "lo")
    sh("ip", "-n", container, "route", "add", f"10.{net}.9.0/24", "via", f"10.{net}.2.1")
    peer_http(lab, peer, "::", size=1 << 20)

    # The first thing the container does is the IPv6 connection: its first neighbour
    # resolution must work (docs/networking.md, "the first IPv6 neighbour solicitation").
    # The counters at the end tell on which side a lost one went missing.
    script = "; ".join([
        f"timeout 30 wget -q -O - 'http://[{lab.v6}:2::1]:8080/' | head -n 1",
        f"wget -q -O - http://10.{net}.9.1:8080/ | wc -c",
        "ip -o link show eth0", "ip -o -6 addr show eth0 scope global", "ip route",
        ND_COUNTERS, "ip -6 neigh"])
    result = run_output(runv, "n6", script, with_netns(lab.path(container)))
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    lines = out.splitlines()
    peer_nd = sh("ip", "netns", "exec", peer, "sh", "-c", ND_COUNTERS)
    # The peer's side of the IPv6 connection agreed on a jumbo MSS: 9000 - 40 - 20 - options.
    assert lines[0].startswith("mss=") and int(lines[0][4:]) > 8800, f"{out}\npeer:\n{peer_nd}"
    assert lines[1].strip() == str((1 << 20) + len(b"mss=8948\n")), out
    assert "mtu 9000" in lines[2], out
    (v6_line,) = [line for line in lines if f"{lab.v6}:2::2/64" in line]
    assert "tentative" not in v6_line, v6_line  # usable from the start (no DAD in the guest)
    assert f"10.{net}.9.0/24 via 10.{net}.2.1 dev eth0" in out


def test_dns_from_the_bundles_resolv_conf(runv: Runv, lab: Lab, tmp_path: Path) -> None:
    net = lab.subnet
    container, peer = lab.pair(3)
    lab.spawn(peer, sys.executable, str(PEER), "dns", f"10.{net}.3.1", "web.runv.test",
              f"10.{net}.3.1")
    peer_http(lab, peer, f"10.{net}.3.1")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver 10.{net}.3.1\n")

    def edit(spec: dict[str, Any]) -> None:
        with_netns(lab.path(container))(spec)
        spec["mounts"].append({"destination": "/etc/resolv.conf", "type": "bind",
                               "source": str(resolv), "options": ["rbind", "ro"]})

    result = run_output(runv, "nd", "nslookup web.runv.test; wget -q -O - "
                        "http://web.runv.test:8080/ | head -n 1", edit)
    out = result.stdout.decode()
    assert f"Address: 10.{net}.3.1" in out, out + result.stderr.decode()
    assert "mss=" in out, out + result.stderr.decode()


def test_no_network_namespace_path_is_loopback_only(runv: Runv, lab: Lab) -> None:
    net = lab.subnet
    _, peer = lab.pair(4)
    peer_http(lab, peer, f"10.{net}.4.1")
    script = (f"ip -o link; wget -q -T 3 -O - http://10.{net}.4.1:8080/ && echo reached; "
              "echo done")
    result = run_output(runv, "nn", script, None)  # a new network namespace, no path
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "link/loopback" in out and "link/ether" not in out, out  # no NIC at all
    assert "reached" not in out and "done" in out


@pytest.mark.parametrize(("path", "message"), [
    ("/run/netns/rvn-missing-{pid}", b"No such file or directory"),
    ("/etc/hostname", b"is not a namespace"),
])
def test_a_bad_network_namespace_path_is_a_clear_error(runv: Runv, path: str,
                                                       message: bytes) -> None:
    netns = path.format(pid=os.getpid())
    bundle = runv.bundle(["true"], with_netns(netns))
    result = runv("run", "--bundle", str(bundle), "nb", check=False)
    assert result.returncode == 1
    assert re.search(rb"linux\.namespaces\[\d+\]\.path: " + re.escape(netns.encode()),
                     result.stderr) and message in result.stderr, result.stderr
    assert not (runv.root / "nb").exists()
