"""When the agent takes a guest NIC it brought up as ready to send (hyperstart_agent.network:
link_ready), on netlink messages as the kernel reports links in each state."""

from __future__ import annotations

from typing import Any

import pytest
from hyperstart_agent.network import IF_READY, IFF_LOWER_UP, IFF_UP, link_ready


class Link:
    """An RTM_NEWLINK message as pyroute2 parses it: flags, attributes, IFLA_AF_SPEC."""

    def __init__(self, flags: int, operstate: str, inet6: dict[str, Any] | None) -> None:
        self.fields = {"flags": flags}
        self.attrs = {"IFLA_OPERSTATE": operstate}
        self.inet6 = inet6

    def __getitem__(self, key: str) -> int:
        return self.fields[key]

    def get(self, key: str) -> Any:
        return self.attrs.get(key)

    def get_nested(self, *path: str) -> Any:
        assert path == ("IFLA_AF_SPEC", "AF_INET6")
        return self.inet6


def ipv6(flags: int, disabled: int = 0) -> dict[str, Any]:
    return {"IFLA_INET6_FLAGS": flags, "IFLA_INET6_CONF": {"disable_ipv6": disabled}}


@pytest.mark.parametrize(("link", "ready"), [
    # A virtio-net NIC just probed and brought up before its carrier came: nothing has set its
    # operational state yet (UNKNOWN), its queues have no qdisc (IPv6 did not mark it ready).
    (Link(IFF_UP, "UNKNOWN", ipv6(0)), False),
    # The carrier came, linkwatch has not run yet: still no qdisc, IPv6 not ready.
    (Link(IFF_UP | IFF_LOWER_UP, "UNKNOWN", ipv6(0)), False),
    (Link(IFF_UP | IFF_LOWER_UP, "DOWN", ipv6(0)), False),
    (Link(IFF_UP, "DOWN", ipv6(0)), False),
    # Linkwatch ran: operational, IPv6 ready.
    (Link(IFF_UP | IFF_LOWER_UP, "UP", ipv6(IF_READY)), True),
    # A driver that never reports its carrier: UNKNOWN for good, and ready.
    (Link(IFF_UP | IFF_LOWER_UP, "UNKNOWN", ipv6(IF_READY)), True),
    # Without IPv6 on the link only carrier and operational state tell.
    (Link(IFF_UP | IFF_LOWER_UP, "UP", None), True),
    (Link(IFF_UP | IFF_LOWER_UP, "UP", ipv6(0, disabled=1)), True),
    (Link(IFF_UP, "UP", None), False),
    (Link(IFF_UP | IFF_LOWER_UP, "LOWERLAYERDOWN", None), False),
])
def test_link_ready(link: Link, ready: bool) -> None:
    assert link_ready(link) is ready
