"""`hyperctl run --network default -p HOST:GUEST`: a namespace of the container's own on
runv-py's CNI bridge network (here a bridge and subnet of the test's, set in [network] of
config.toml), a port published on the host and reachable on the bridge's address, 127.0.0.1
and the host's own address, all of it gone with `hyperctl rm`."""

from __future__ import annotations

import os
from pathlib import Path

from tests.hyperctl.conftest import Hyperctl, hyperctl  # noqa: F401  (fixture)

from .conftest import Lab, fetch, sh


def test_hyperctl_network_default_publishes_a_port(hyperctl: Hyperctl,  # noqa: F811
                                                   lab: Lab, tmp_path: Path) -> None:
    net = lab.subnet
    bridge = f"rvh{os.getpid()}"[:15]
    lab.bridges.append(bridge)
    hyperctl.config.write_text(hyperctl.config.read_text() + (
        f'[network]\nbridge = "{bridge}"\nsubnet = "10.{net}.16.0/24"\n'
        f'cni_data_dir = "{tmp_path / "cni"}"\n'))
    host_port = 30000 + os.getpid() % 10000
    before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    hyperctl("run", "-d", "--name", "web", "--network", "default", "-p",
             f"{host_port}:8080", "busybox", "sh", "-c",
             "echo published > /index.html; exec httpd -f -p 8080 -h /")
    made = (set(os.listdir("/run/netns")) - before)
    assert len(made) == 1, made
    # Through the bridge's address, the host's loopback and the host's own address (the
    # last two are DNATed with a source the sandbox has no route back to: masqueraded).
    host_address = next(line.split()[3].split("/")[0] for line in sh(
        "ip", "-4", "-o", "addr", "show", "scope", "global").splitlines()
        if line.split()[1] != bridge)
    for address in (f"10.{net}.16.1", "127.0.0.1", host_address):
        assert fetch(f"http://{address}:{host_port}/index.html") == b"published\n", address
    hyperctl("rm", "-f", "web")
    assert not (set(os.listdir("/run/netns")) & made)
    rules = sh("iptables", "-t", "nat", "-S")
    assert f"--dport {host_port}" not in rules and "runv-py published ports" not in rules
    assert not list((tmp_path / "cni").glob("runv/10.*"))
