"""Interfaces added to a running sandbox's network namespace (a second CNI network) are
hot-plugged into its VM, and unplugged when they go (machine "pc": ACPI PCI hotplug)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from runv_py import config
from runv_py.errors import NotSupported
from runv_py.sandbox.protocol import NetworkSync
from runv_py.sandbox.runtime import Runtime
from tests.cli.conftest import Runv

from .conftest import Lab, peer_http, sh, with_netns


def _sync(runv: Runv, cid: str) -> dict[str, list[str]]:
    """Follow the container's network namespace (the control op `network-sync`)."""
    runtime = Runtime(runv.root, config.load(runv.config))
    reply = asyncio.run(runtime.client(runtime.store.load(cid)).call(NetworkSync(container=cid)))
    return {"added": list(reply.added), "removed": list(reply.removed)}


def test_a_second_network_is_hot_plugged_and_unplugged(runv: Runv, lab: Lab,
                                                       tmp_path: Path) -> None:
    runv.config.write_text(runv.config.read_text().replace(
        "[hypervisor]\n", '[hypervisor]\nmachine = "pc"\n'))
    net = lab.subnet
    container, _ = lab.pair(10)
    second = lab.netns("q")
    bundle = runv.bundle(["sleep", "1000"], with_netns(lab.path(container)))
    with open(tmp_path / "out", "wb") as out:
        runv("create", "--bundle", str(bundle), "h1", stdout=out, stderr=subprocess.STDOUT)
    runv("start", "h1")
    assert _sync(runv, "h1") == {"added": [], "removed": []}

    lab.veth(container, "eth1", second, "peer1", mtu=4000, addr_a=(f"10.{net}.11.2/24",),
             addr_b=(f"10.{net}.11.1/24",))
    sh("ip", "-n", second, "addr", "add", f"10.{net}.12.1/32", "dev", "lo")
    sh("ip", "-n", container, "route", "add", f"10.{net}.12.0/24", "via", f"10.{net}.11.1")
    peer_http(lab, second, "0.0.0.0")
    assert _sync(runv, "h1") == {"added": ["eth1"], "removed": []}
    result = runv("exec", "h1", "sh", "-c", f"wget -q -O - http://10.{net}.12.1:8080/ | "
                  "head -n 1; ip -o link show eth1")
    out = result.stdout.decode()
    assert out.startswith("mss="), out
    assert "mtu 4000" in out

    sh("ip", "-n", container, "link", "del", "eth1")
    assert _sync(runv, "h1") == {"added": [], "removed": ["eth1"]}
    links = runv("exec", "h1", "ip", "-o", "link").stdout.decode()
    assert "eth0" in links and "eth1" not in links
    state = lab.mirror_state(container)
    assert len([s for s in state if s.startswith("tap:")]) == 1, state  # eth0's only
    runv("delete", "--force", "h1")
    assert lab.mirror_state(container) == []


def test_microvm_cannot_hot_plug(runv: Runv, lab: Lab, tmp_path: Path) -> None:
    container = lab.netns("c")
    netns = with_netns(lab.path(container))

    def cold_microvm(spec: dict[str, Any]) -> None:
        netns(spec)  # a VM started from a template is a pc: ask for a cold-booted microvm
        spec["annotations"] = {"org.runv.template": "off"}

    bundle = runv.bundle(["sleep", "1000"], cold_microvm)
    with open(tmp_path / "out", "wb") as out:
        runv("create", "--bundle", str(bundle), "h2", stdout=out, stderr=subprocess.STDOUT)
    with pytest.raises(NotSupported, match='machine = "pc"'):
        _sync(runv, "h2")
    runv("delete", "--force", "h2")
