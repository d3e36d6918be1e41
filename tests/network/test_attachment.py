"""The host side alone (no VM): what is read from a namespace, the taps and tc mirrors made in
it, what is refused, and that closing leaves the namespace as it was."""

from __future__ import annotations

import asyncio

import pytest

from runv_py.errors import NetworkError
from runv_py.network.attachment import Attachment, sweep
from runv_py.network.model import Address, Neighbor, Route

from .conftest import Lab, sh


def test_snapshot_taps_and_mirrors_then_nothing_left(lab: Lab) -> None:
    net = lab.subnet
    container, _ = lab.pair(1, mtu=9000, v6=True)
    sh("ip", "-n", container, "route", "add", f"10.{net}.9.0/24", "via", f"10.{net}.1.1")
    sh("ip", "-n", container, "neigh", "add", f"10.{net}.1.7", "lladdr", "02:00:00:00:00:07",
       "dev", "eth0", "nud", "permanent")
    before = lab.link_state(container, "eth0")
    attachment = Attachment(lab.path(container))
    asyncio.run(attachment.open())
    try:
        (endpoint,) = attachment.endpoints
        link = endpoint.link
        assert (link.name, link.mtu, link.kind) == ("eth0", 9000, "veth")
        assert set(link.addresses) == {Address(f"10.{net}.1.2", 24),
                                       Address(f"{lab.v6}:1::2", 64)}
        routes = attachment.snapshot.routes
        assert Route(f"10.{net}.9.0/24", "eth0", gateway=f"10.{net}.1.1") in routes
        assert all(not r.dest.startswith("fe80") for r in routes)
        assert attachment.snapshot.neighbors == (
            Neighbor(f"10.{net}.1.7", "eth0", "02:00:00:00:00:07"),)
        tap = sh("ip", "-n", container, "-o", "link", "show", endpoint.tap_name)
        assert "mtu 9000" in tap and "UP" in tap
        for dev, target in (("eth0", endpoint.tap_name), (endpoint.tap_name, "eth0")):
            filters = sh("tc", "-n", container, "filter", "show", "dev", dev, "ingress")
            assert f"Egress Redirect to device {target}" in filters

        # A second sandbox on the same namespace is refused, and leaves nothing.
        second = Attachment(lab.path(container))
        with pytest.raises(NetworkError, match="another sandbox uses"):
            asyncio.run(second.open())
    finally:
        asyncio.run(attachment.close())
    assert lab.mirror_state(container) == []
    assert lab.link_state(container, "eth0") == before
    assert sweep(lab.path(container)) == []


def test_an_ingress_qdisc_of_someone_else_is_left_alone(lab: Lab) -> None:
    container, _ = lab.pair(2)
    sh("tc", "-n", container, "qdisc", "add", "dev", "eth0", "ingress")
    sh("tc", "-n", container, "filter", "add", "dev", "eth0", "ingress", "protocol", "all",
       "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "lo")
    attachment = Attachment(lab.path(container))
    with pytest.raises(NetworkError, match="ingress qdisc of its own"):
        asyncio.run(attachment.open())
    assert sweep(lab.path(container)) == []
    assert "Egress Redirect to device lo" in sh(
        "tc", "-n", container, "filter", "show", "dev", "eth0", "ingress")
    assert not [s for s in lab.mirror_state(container) if s.startswith("tap")]
    sh("tc", "-n", container, "qdisc", "del", "dev", "eth0", "ingress")
