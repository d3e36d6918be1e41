"""Extending a network namespace's interfaces into a VM, Kata's "tcfilter" model: for each
interface (a veth, usually) a tap is created in the same namespace and tc redirects every frame
both ways (ingress qdisc + u32 match-all + mirred egress redirect). The VM's NIC reads and
writes the tap; the interface keeps its MAC, addresses and routes, and the guest takes the
same ones. Everything here runs inside the namespace (see netns.NetNs): pyroute2 lives here.

Only the taps and the two ingress qdiscs are ours. A tap is not persistent: it disappears when
its last fd (ours and QEMU's) closes, taking the qdisc on its own side with it. The qdisc on
the interface outlives a killed runtime and would then drop every frame the interface receives
(mirred to a gone device): the next setup on the namespace removes such a stale qdisc."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import NetworkError
from .model import Address, Endpoint, Link, Neighbor, Route, Snapshot

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
IFF_LOOPBACK = 0x8
ARPHRD_ETHER = 1
AF_INET, AF_INET6 = 2, 10
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
NUD_PERMANENT = 0x80
ETH_P_ALL = 0x0003
TC_H_INGRESS_PARENT = 0xFFFF0000
TAP_SUFFIX = "_rv"


def tap_name(link: Link) -> str:
    return f"tap{link.index}{TAP_SUFFIX}"


@contextmanager
def netlink() -> Iterator[Any]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise NetworkError(f"netlink: {os.strerror(exc.code)} ({exc})") from exc


def _netlink_code(exc: BaseException) -> int | None:
    from pyroute2.netlink.exceptions import NetlinkError

    return exc.code if isinstance(exc, NetlinkError) else None


def _is_ours(name: str) -> bool:
    return name.startswith("tap") and name.endswith(TAP_SUFFIX)


def snapshot(ipr: Any) -> Snapshot:
    """The namespace's Ethernet interfaces (not loopback, not our taps), their addresses (not
    IPv6 link-local: the guest makes its own from the same MAC), the main table's routes
    through them and their permanent neighbours."""
    found: list[tuple[int, str, str, int, str]] = []
    for msg in ipr.get_links():
        name = msg.get_attr("IFLA_IFNAME") or ""
        if msg["flags"] & IFF_LOOPBACK or msg["ifi_type"] != ARPHRD_ETHER or _is_ours(name):
            continue
        info = msg.get_attr("IFLA_LINKINFO")
        kind = (info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""
        if kind not in ("bridge", "tun"):
            found.append((msg["index"], name, msg.get_attr("IFLA_ADDRESS"),
                          msg.get_attr("IFLA_MTU") or 1500, kind))
    names = {index: name for index, name, *_ in found}
    addresses: dict[int, list[Address]] = {}
    for msg in ipr.get_addr():
        if msg["index"] not in names:
            continue
        ip = msg.get_attr("IFA_ADDRESS") if msg["family"] == AF_INET6 else (
            msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS"))
        if not ipaddress.ip_address(ip).is_link_local:
            addresses.setdefault(msg["index"], []).append(Address(ip, msg["prefixlen"]))
    links = tuple(Link(index, name, mac, mtu, tuple(addresses.get(index, ())), kind)
                  for index, name, mac, mtu, kind in found)
    routes: list[Route] = []
    for family in (AF_INET, AF_INET6):
        for msg in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            oif = msg.get_attr("RTA_OIF")
            if msg["type"] != RTN_UNICAST or oif not in names:
                continue
            zero = "::" if family == AF_INET6 else "0.0.0.0"
            dest = ipaddress.ip_network(f"{msg.get_attr('RTA_DST') or zero}/{msg['dst_len']}")
            if dest.is_link_local:
                continue
            routes.append(Route(
                dest="default" if dest.prefixlen == 0 else str(dest), device=names[oif],
                gateway=msg.get_attr("RTA_GATEWAY") or "",
                source=msg.get_attr("RTA_PREFSRC") or "", scope=msg["scope"],
                version=dest.version))
    neighbors = tuple(
        Neighbor(msg.get_attr("NDA_DST"), names[msg["ifindex"]], msg.get_attr("NDA_LLADDR"))
        for msg in ipr.get_neighbours()
        if msg["ifindex"] in names and msg["state"] & NUD_PERMANENT
        and msg.get_attr("NDA_LLADDR"))
    return Snapshot(links, tuple(routes), neighbors)


def _ingress_qdisc(ipr: Any, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "ingress" for q in ipr.get_qdiscs(index=index))


def _redirect_targets(ipr: Any, index: int) -> list[int]:
    """The devices the interface's ingress filters redirect to (0: a device that is gone)."""
    targets = []
    for msg in ipr.get_filters(index=index, parent=TC_H_INGRESS_PARENT):
        parms = msg.get_nested("TCA_OPTIONS", "TCA_U32_ACT", "TCA_ACT_PRIO_1",
                               "TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS")
        if parms is not None:
            targets.append(parms["ifindex"])
        elif msg.get_nested("TCA_OPTIONS", "TCA_U32_SEL") is not None:
            targets.append(-1)  # a filter that is not ours
    return targets


def _stale(ipr: Any, link: Link) -> bool:
    """Whether the link carries the mirror of a sandbox whose tap is gone (a killed runtime);
    NetworkError if another live sandbox mirrors it or its ingress qdisc is not ours."""
    if not _ingress_qdisc(ipr, link.index):
        return False
    name = tap_name(link)
    if ipr.link_lookup(ifname=name):
        raise NetworkError(f"interface {link.name} is already mirrored to {name}: another "
                           "sandbox uses this network namespace")
    targets = _redirect_targets(ipr, link.index)
    if not targets or any(t != 0 for t in targets):
        raise NetworkError(f"interface {link.name} has an ingress qdisc of its own: "
                           "cannot mirror it into the VM (remove it with "
                           f"`tc qdisc del dev {link.name} ingress`)")
    return True


def clear_stale(ipr: Any, link: Link) -> None:
    """Refuse an interface another live sandbox mirrors; remove what a killed one left."""
    if _stale(ipr, link):
        log.warning("removing the tc redirect a killed sandbox left on %s", link.name)
        _unless_gone(ipr.tc, "del", "ingress", link.index)


def stale_links(ipr: Any) -> list[Link]:
    """The links that carry the mirror of a killed sandbox (none is changed). Links in use or
    with qdiscs not ours are not among them."""
    found = []
    for link in snapshot(ipr).links:
        try:
            if _stale(ipr, link):
                found.append(link)
        except NetworkError:
            continue
    return found


def sweep(ipr: Any, only: str | None = None) -> list[str]:
    """Remove the mirrors killed sandboxes left in the namespace (on the link `only`, if
    given); the names of the links cleaned."""
    cleaned = []
    for link in stale_links(ipr):
        if only is None or link.name == only:
            _unless_gone(ipr.tc, "del", "ingress", link.index)
            cleaned.append(link.name)
    return cleaned


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"creating tap {name}: {exc.strerror}") from exc
    return fd


def _mirror(ipr: Any, source: int, target: int) -> None:
    ipr.tc("add", "ingress", source)
    ipr.tc("add-filter", "u32", source, parent=TC_H_INGRESS_PARENT, protocol=ETH_P_ALL,
           prio=1, keys=["0x0/0x0+0"], target=0x1,
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": target})


def create(ipr: Any, link: Link) -> Endpoint:
    """A tap for the link, up with its MTU, mirrored both ways. Undone on failure."""
    clear_stale(ipr, link)
    name = tap_name(link)
    fd = open_tap(name)
    endpoint = None
    try:
        index = ipr.link_lookup(ifname=name)[0]
        endpoint = Endpoint(link, name, index, fd)
        ipr.link("set", index=index, mtu=link.mtu, state="up")
        _mirror(ipr, link.index, index)
        _mirror(ipr, index, link.index)
    except BaseException:
        if endpoint is not None:
            remove(ipr, endpoint)
        os.close(fd)
        raise
    return endpoint


def _unless_gone(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """A netlink change whose object may already be gone (that is as good as done)."""
    try:
        call(*args, **kwargs)
    except Exception as exc:
        if _netlink_code(exc) not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise


def remove(ipr: Any, endpoint: Endpoint) -> None:
    """The qdisc on the link and the tap (with its qdisc) go; the link stays as it was.
    Idempotent; the tap fd is the caller's to close."""
    link = endpoint.link
    # By index: a link of the same name may have come since (a re-added CNI network).
    if link.index in ipr.link_lookup(ifname=link.name) and _ingress_qdisc(ipr, link.index):
        _unless_gone(ipr.tc, "del", "ingress", link.index)
    if endpoint.tap_index in ipr.link_lookup(ifname=endpoint.tap_name):
        _unless_gone(ipr.link, "del", index=endpoint.tap_index)
