"""The parts of networking that are pure logic: -p parsing, CNI configuration lists and the
spec's network namespace path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runv_py import config
from runv_py.errors import ConfigError, NetworkError, SpecError
from runv_py.network.cni import BridgeNetwork, PortMapping
from runv_py.network.managed import Lease
from runv_py.oci import spec as oci_spec


@pytest.mark.parametrize(("text", "expected"), [
    ("8080:80", PortMapping(8080, 80)),
    ("53:53/udp", PortMapping(53, 53, "udp")),
    ("127.0.0.1:8080:80/tcp", PortMapping(8080, 80, "tcp", "127.0.0.1")),
])
def test_port_mappings(text: str, expected: PortMapping) -> None:
    assert PortMapping.parse(text) == expected


@pytest.mark.parametrize("text", ["80", "a:80", "8080:80/sctp", "0:80", "8080:70000"])
def test_bad_port_mappings_name_the_input(text: str) -> None:
    with pytest.raises(NetworkError, match="port mapping"):
        PortMapping.parse(text)


def test_bridge_network_has_no_masquerade_and_no_default_route(tmp_path: Path) -> None:
    conf = BridgeNetwork("n1", "br-n1", "10.99.0.0/24", tmp_path, mtu=9000).conflist()
    bridge, portmap = conf["plugins"]
    # portmap's snat masquerades only connections from 127.0.0.1 to published ports.
    assert bridge["ipMasq"] is False and portmap["snat"] is True
    assert "routes" not in bridge["ipam"] and bridge["mtu"] == 9000
    assert bridge["ipam"]["dataDir"] == str(tmp_path)
    with pytest.raises(NetworkError, match="subnet"):
        BridgeNetwork("n1", "br-n1", "10.99.0.0/33", tmp_path)
    with pytest.raises(NetworkError, match="bridge name"):
        BridgeNetwork("n1", "a-bridge-name-too-long", "10.99.0.0/24", tmp_path)


def _bundle(tmp_path: Path, namespaces: list[dict[str, Any]]) -> Path:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({
        "ociVersion": "1.1.0", "root": {"path": "rootfs"},
        "process": {"args": ["sh"], "cwd": "/"}, "linux": {"namespaces": namespaces}}))
    return tmp_path


def test_spec_network_namespace(tmp_path: Path) -> None:
    load = oci_spec.load
    assert load(_bundle(tmp_path, [{"type": "pid"}])).network_ns is None
    assert load(_bundle(tmp_path, [{"type": "network"}])).network_ns == ""
    assert load(_bundle(tmp_path, [{"type": "network", "path": "/proc/self/ns/net"}])
                ).network_ns == "/proc/self/ns/net"
    for path, why in (("netns/x", "is not absolute"), ("/run/netns/absent-x", "No such file"),
                      ("/proc/self/ns/ipc", "is not a network namespace \\(it is ipc\\)"),
                      (str(tmp_path), "is not a namespace")):
        with pytest.raises(SpecError, match=rf"linux.namespaces\[0\].path: .*{why}"):
            load(_bundle(tmp_path, [{"type": "network", "path": path}]))


def test_lease_round_trips_through_json(tmp_path: Path) -> None:
    lease = Lease("s1", "/run/netns/runv-s1", BridgeNetwork("n1", "br-n1", "10.99.0.0/24",
                                                            tmp_path),
                  (PortMapping(8080, 80), PortMapping(53, 53, "udp", "127.0.0.1")),
                  ("10.99.0.2/24",))
    assert Lease.from_json(lease.to_json()) == lease
    with pytest.raises(NetworkError, match="network lease"):
        Lease.from_json('{"sandbox_id": "s1"}')


def test_network_section_of_the_runtime_config() -> None:
    cfg = config.parse('[network]\nbridge = "br9"\nsubnet = "10.9.0.0/24"\n'
                       'cni_data_dir = "/tmp/cni"\n', "t.toml")
    assert cfg.network == config.NetworkConfig("br9", "10.9.0.0/24", Path("/tmp/cni"))
    assert config.parse("", "t.toml").network.bridge == "runv0"
    with pytest.raises(ConfigError, match=r"t.toml \[network\]: unknown key 'masquerade'"):
        config.parse("[network]\nmasquerade = 1\n", "t.toml")
