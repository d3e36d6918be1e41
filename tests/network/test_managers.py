"""Container managers hand runv a network namespace by path: containerd (`ctr run --with-ns
network:PATH`, as its CRI plugin does after CNI) and podman (`--network ns:PATH`, with its
own resolv.conf and hosts bind-mounted): the VM takes that namespace's interface."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.integration.conftest import (  # noqa: F401  (fixtures)
    IMAGE,
    Containerd,
    containerd,
    image_archive,
    runtime_env,
)
from tests.integration.test_podman import Podman, podman  # noqa: F401  (fixture)

from .conftest import PEER, Lab, peer_http


def test_ctr_run_with_a_network_namespace_path(containerd: Containerd,  # noqa: F811
                                               image_archive: Path,  # noqa: F811
                                               lab: Lab) -> None:
    net = lab.subnet
    container, peer = lab.pair(13)
    peer_http(lab, peer, f"10.{net}.13.1")
    containerd.ctr("image", "import", str(image_archive))
    result = containerd.ctr(
        "run", "--rm", *containerd.run_args(), "--with-ns", f"network:{lab.path(container)}",
        IMAGE, "net1", "sh", "-c",
        f"wget -q -O - http://10.{net}.13.1:8080/ | head -n 1; ip -o -4 addr show eth0",
        check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert out.startswith("mss=") and f"10.{net}.13.2/24" in out, out
    assert lab.mirror_state(container) == []


def test_podman_run_with_a_network_namespace_path_dns_and_hosts(
        podman: Podman, lab: Lab) -> None:  # noqa: F811
    net = lab.subnet
    container, peer = lab.pair(14)
    lab.spawn(peer, sys.executable, str(PEER), "dns", f"10.{net}.14.1", "web.runv.test",
              f"10.{net}.14.1")
    peer_http(lab, peer, f"10.{net}.14.1")
    result = podman(
        "run", "--rm", "--network", f"ns:{lab.path(container)}", "--dns", f"10.{net}.14.1",
        "--add-host", f"pinned.runv.test:10.{net}.14.1", "--hostname", "netbox", IMAGE,
        "sh", "-c", "hostname; nslookup web.runv.test; "
        "wget -q -O - http://pinned.runv.test:8080/ | head -n 1", check=False)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert out.startswith("netbox\n"), out
    assert f"Address: 10.{net}.14.1" in out, out
    assert "mss=" in out, out
    assert lab.mirror_state(container) == []
