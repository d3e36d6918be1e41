"""The guest's network (the agent's own network namespace): interfaces, addresses, routes and
neighbors over netlink. Requests are parsed whole, naming the bad field, before anything
changes. pyroute2 is imported on the first call that needs the kernel: under TCG its import
takes seconds, and a guest without networking never pays for it."""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import logging
import os
import re
import sys
import threading
import time
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import AgentError

log = logging.getLogger(__name__)

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

FAMILY_UNSPECIFIED, FAMILY_V4, FAMILY_V6 = 0, 1, 2  # the protocol's IPFamily
AF_INET, AF_INET6 = 2, 10
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RTPROT_BOOT = 3
SCOPES = {0: "universe", 200: "site", 253: "link", 254: "host"}
NUD_PERMANENT = 0x80
NUD_STATES = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IF_READY = 0x80000000  # an IPv6 device's flag (IFLA_INET6_FLAGS), linux/include/net/if_inet6.h
IFA_F_NODAD = 0x02
LINK_READY_WAIT_S = 10.0
MIN_MTU, MAX_MTU = 68, 65535
ONDEMAND = "/opt/hyperstart/ondemand"

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LLADDR = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){0,31}$")
# The kernel's dev_valid_name: under IFNAMSIZ (16) bytes, no '/', ':' or whitespace.
_IFNAME = re.compile(r"^[^/:\s]{1,15}$")

# One change at a time: an update reads the kernel's state, then changes it.
_lock = threading.Lock()


class AddressMsg(Protocol):
    family: int
    address: str
    prefix_len: int


class InterfaceMsg(Protocol):
    name: str
    hw_addr: str
    mtu: int

    @property
    def ip_addresses(self) -> Iterable[AddressMsg]: ...


class RouteMsg(Protocol):
    dest: str
    gateway: str
    device: str
    source: str
    scope: int
    family: int


class NeighborMsg(Protocol):
    device: str
    ll_addr: str
    state: int
    flags: int

    @property
    def to_ip(self) -> AddressMsg: ...


@dataclass(frozen=True, slots=True)
class Address:
    ip: IPAddr
    prefix_len: int


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    hw_addr: str
    mtu: int
    addresses: tuple[Address, ...]
    flags: int = 0
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    dest: IPNet
    gateway: IPAddr | None
    device: str
    source: IPAddr | None
    scope: int

    @property
    def family(self) -> int:
        return AF_INET if self.dest.version == 4 else AF_INET6


@dataclass(frozen=True, slots=True)
class Neighbor:
    ip: IPAddr
    device: str
    ll_addr: str
    state: int
    flags: int


def _invalid(where: str, message: str) -> AgentError:
    return AgentError("INVALID_ARGUMENT", f"{where}: {message}")


def _ip(where: str, text: str) -> IPAddr:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _invalid(where, f"{text!r} is not an IP address") from None


def _check_family(where: str, family: int, version: int) -> None:
    if family not in (FAMILY_UNSPECIFIED, FAMILY_V4, FAMILY_V6):
        raise _invalid(f"{where}.family", f"{family} is not an IP family")
    if family not in (FAMILY_UNSPECIFIED, FAMILY_V4 if version == 4 else FAMILY_V6):
        raise _invalid(f"{where}.family", f"{'IPV4' if family == FAMILY_V4 else 'IPV6'} does "
                       f"not match an IPv{version} address")


def _mac(where: str, text: str, pattern: re.Pattern[str] = _MAC) -> str:
    mac = text.lower()
    if not pattern.match(mac):
        raise _invalid(where, f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return mac


def _ifname(where: str, text: str) -> str:
    if not _IFNAME.match(text) or text in (".", "..") or len(text.encode()) > 15:
        raise _invalid(where, f"{text!r} is not an interface name")
    return text


def parse_address(where: str, msg: AddressMsg, *, with_prefix: bool = True) -> Address:
    ip = _ip(f"{where}.address", msg.address)
    _check_family(where, msg.family, ip.version)
    if with_prefix and not 1 <= msg.prefix_len <= ip.max_prefixlen:
        raise _invalid(f"{where}.prefix_len", f"{msg.prefix_len} is not from 1 to "
                       f"{ip.max_prefixlen} for IPv{ip.version}")
    if ip.is_multicast or ip.is_unspecified:
        raise _invalid(f"{where}.address", f"{ip} is not a unicast address")
    return Address(ip, msg.prefix_len if with_prefix else ip.max_prefixlen)


def parse_interface(msg: InterfaceMsg, where: str = "interface") -> Interface:
    hw_addr = _mac(f"{where}.hw_addr", msg.hw_addr) if msg.hw_addr else ""
    name = _ifname(f"{where}.name", msg.name) if msg.name else ""
    if not hw_addr and not name:
        raise _invalid(where, "needs hw_addr or name to find the interface")
    if msg.mtu and not MIN_MTU <= msg.mtu <= MAX_MTU:
        raise _invalid(f"{where}.mtu", f"{msg.mtu} is not from {MIN_MTU} to {MAX_MTU}")
    addresses = tuple(parse_address(f"{where}.ip_addresses[{i}]", a)
                      for i, a in enumerate(msg.ip_addresses))
    if msg.mtu and msg.mtu < 1280 and any(a.ip.version == 6 for a in addresses):
        raise _invalid(f"{where}.mtu", f"{msg.mtu} is under 1280, IPv6's minimum")
    return Interface(name, hw_addr, msg.mtu, addresses)


def parse_route(msg: RouteMsg, where: str) -> Route:
    if msg.family not in (FAMILY_UNSPECIFIED, FAMILY_V4, FAMILY_V6):
        raise _invalid(f"{where}.family", f"{msg.family} is not an IP family")
    gateway = _ip(f"{where}.gateway", msg.gateway) if msg.gateway else None
    source = _ip(f"{where}.source", msg.source) if msg.source else None
    if msg.dest in ("", "default"):
        version = (6 if msg.family == FAMILY_V6 else 4 if msg.family == FAMILY_V4 else
                   gateway.version if gateway else source.version if source else 4)
        dest: IPNet = ipaddress.ip_network("::/0" if version == 6 else "0.0.0.0/0")
    else:
        try:
            dest = ipaddress.ip_network(msg.dest)
        except ValueError as exc:
            raise _invalid(f"{where}.dest", f"{msg.dest!r} is not a network: {exc}") from None
    _check_family(where, msg.family, dest.version)
    for name, ip in (("gateway", gateway), ("source", source)):
        if ip is not None and ip.version != dest.version:
            raise _invalid(f"{where}.{name}", f"{ip} is not IPv{dest.version} like the dest")
    if gateway is not None and (gateway.is_multicast or gateway.is_unspecified):
        raise _invalid(f"{where}.gateway", f"{gateway} is not a unicast address")
    device = _ifname(f"{where}.device", msg.device) if msg.device else ""
    if not device and gateway is None:
        raise _invalid(f"{where}.device", "is required for a route without a gateway")
    if msg.scope not in SCOPES:
        raise _invalid(f"{where}.scope", f"{msg.scope} is not one of "
                       + ", ".join(f"{n} ({s})" for n, s in SCOPES.items()))
    return Route(dest, gateway, device, source, msg.scope)


def parse_routes(msgs: Iterable[RouteMsg]) -> tuple[Route, ...]:
    return tuple(parse_route(m, f"routes[{i}]") for i, m in enumerate(msgs))


def parse_neighbors(msgs: Iterable[NeighborMsg]) -> tuple[Neighbor, ...]:
    out = []
    for i, msg in enumerate(msgs):
        where = f"neighbors[{i}]"
        if not msg.to_ip.address:
            raise _invalid(f"{where}.to_ip.address", "is required")
        ip = parse_address(f"{where}.to_ip", msg.to_ip, with_prefix=False).ip
        if not msg.device:
            raise _invalid(f"{where}.device", "is required")
        device = _ifname(f"{where}.device", msg.device)
        ll_addr = _mac(f"{where}.ll_addr", msg.ll_addr, _LLADDR)
        state = msg.state or NUD_PERMANENT
        if state not in NUD_STATES:
            raise _invalid(f"{where}.state", f"{msg.state:#x} is not one NUD_* state")
        if msg.flags & ~0xFF:
            raise _invalid(f"{where}.flags", f"{msg.flags:#x} is not a set of NTF_* flags")
        out.append(Neighbor(ip, device, ll_addr, state, msg.flags))
    return tuple(out)


def import_pyroute2() -> Any:
    """pyroute2's IPRoute class, imported without running pyroute2/__init__.py: that imports
    every API of the library (NDB needs sqlite3, which the guest image does not have) and
    would double the import time. IPRoute's own modules import ssl, which the guest image keeps
    off sys.path (in ONDEMAND) so that asyncio, imported at boot by grpc, does not load it."""
    if os.path.isdir(ONDEMAND) and ONDEMAND not in sys.path:
        sys.path.append(ONDEMAND)
    if "pyroute2" not in sys.modules:
        found = importlib.util.find_spec("pyroute2")
        if found is None or found.submodule_search_locations is None:
            raise ImportError("pyroute2 is not installed")
        package = types.ModuleType("pyroute2")
        package.__path__ = list(found.submodule_search_locations)
        package.__spec__ = found
        sys.modules["pyroute2"] = package
    from pyroute2.iproute.linux import IPRoute

    return IPRoute


@contextmanager
def _netlink() -> Iterator[Any]:
    with _lock, import_pyroute2()() as ipr:
        yield ipr


def _netlink_error(exc: BaseException) -> int | None:
    """The errno of a pyroute2 NetlinkError, else None."""
    import_pyroute2()
    from pyroute2.netlink.exceptions import NetlinkError

    return exc.code if isinstance(exc, NetlinkError) else None


@contextmanager
def _kernel(where: str, what: str) -> Iterator[None]:
    """Map the kernel's refusal of a change to INVALID_ARGUMENT naming the request field."""
    try:
        yield
    except Exception as exc:
        code = _netlink_error(exc)
        if code is None:
            raise
        status = "ALREADY_EXISTS" if code == errno.EEXIST else "INVALID_ARGUMENT"
        raise AgentError(status, f"{where}: {what}: {errno.errorcode.get(code, code)} "
                         f"({os.strerror(code)})") from exc


def _links(ipr: Any) -> list[Any]:
    return list(ipr.get_links())


def _index_by_name(links: list[Any]) -> dict[str, int]:
    return {link.get("IFLA_IFNAME"): link["index"] for link in links}


def _device_index(names: dict[str, int], where: str, name: str) -> int:
    try:
        return names[name]
    except KeyError:
        raise AgentError("NOT_FOUND", f"{where}: no interface named {name!r}") from None


def _addresses(ipr: Any, index: int | None = None) -> dict[int, list[Address]]:
    out: dict[int, list[Address]] = {}
    for msg in ipr.get_addr(**({} if index is None else {"index": index})):
        ip = ipaddress.ip_address(msg.get("IFA_ADDRESS") if msg["family"] == AF_INET6
                                  else msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS"))
        out.setdefault(msg["index"], []).append(Address(ip, msg["prefixlen"]))
    return out


def _interface(link: Any, addresses: list[Address]) -> Interface:
    kind = ""
    info = link.get("IFLA_LINKINFO")
    if info is not None:
        kind = info.get("IFLA_INFO_KIND") or ""
    return Interface(link.get("IFLA_IFNAME") or "", link.get("IFLA_ADDRESS") or "",
                     link.get("IFLA_MTU") or 0, tuple(addresses), link["flags"], kind)


def list_interfaces() -> list[Interface]:
    with _netlink() as ipr:
        addresses = _addresses(ipr)
        return [_interface(link, addresses.get(link["index"], [])) for link in _links(ipr)]


def _find_link(links: list[Any], want: Interface) -> Any:
    if want.hw_addr:
        found = [link for link in links if link.get("IFLA_ADDRESS") == want.hw_addr]
        if len(found) > 1 and want.name:
            found = [link for link in found if link.get("IFLA_IFNAME") == want.name] or found
        if len(found) > 1:
            names = ", ".join(sorted(link.get("IFLA_IFNAME") for link in found))
            raise _invalid("interface.hw_addr", f"{want.hw_addr} is the address of several "
                           f"interfaces ({names}): name one")
        if not found:
            raise AgentError("NOT_FOUND",
                             f"interface.hw_addr: no interface has address {want.hw_addr}")
        return found[0]
    for link in links:
        if link.get("IFLA_IFNAME") == want.name:
            return link
    raise AgentError("NOT_FOUND", f"interface.name: no interface named {want.name!r}")


def update_interface(want: Interface) -> Interface:
    with _netlink() as ipr:
        links = _links(ipr)
        link = _find_link(links, want)
        index, name = link["index"], link.get("IFLA_IFNAME")
        if want.hw_addr and want.name and want.name != name:
            if want.name in _index_by_name(links):
                raise AgentError("ALREADY_EXISTS", f"interface.name: another interface is "
                                 f"named {want.name!r}")
            # A link is renamed only while it is down (it is brought up below).
            ipr.link("set", index=index, state="down")
            try:
                with _kernel("interface.name", f"renaming {name} to {want.name}"):
                    ipr.link("set", index=index, ifname=want.name)
            except AgentError:
                if link["flags"] & IFF_UP:
                    ipr.link("set", index=index, state="up")
                raise
            name = want.name
        if want.mtu:
            with _kernel("interface.mtu", f"MTU {want.mtu} on {name}"):
                ipr.link("set", index=index, mtu=want.mtu)
        with _kernel("interface", f"bringing {name} up"):
            ipr.link("set", index=index, state="up")
        _wait_link_ready(ipr, index)
        wanted = set(want.addresses)
        for have in _addresses(ipr, index).get(index, []):
            if have not in wanted and not (have.ip.version == 6 and have.ip.is_link_local):
                with _kernel("interface.ip_addresses", f"removing {have.ip}/{have.prefix_len}"):
                    ipr.addr("del", index=index, address=str(have.ip),
                             prefixlen=have.prefix_len)
        # Removing a primary IPv4 address can take its secondaries with it: compare again.
        present = set(_addresses(ipr, index).get(index, []))
        for i, address in enumerate(want.addresses):
            if address not in present:
                with _kernel(f"interface.ip_addresses[{i}]",
                             f"adding {address.ip}/{address.prefix_len} to {name}"):
                    # IPv6 without duplicate address detection: the host owns these
                    # addresses (it did DAD on its own interface); a tentative address would
                    # leave the container without IPv6 for a second after start.
                    ipr.addr("add", index=index, address=str(address.ip),
                             prefixlen=address.prefix_len,
                             flags=IFA_F_NODAD if address.ip.version == 6 else 0)
                present.add(address)
        link = ipr.get_links(index)[0]
        return _interface(link, _addresses(ipr, index).get(index, []))


def link_ready(link: Any) -> bool:
    """Whether a link that was brought up can send: its carrier is on and the kernel has
    attached its transmit queues' qdisc. Until then the kernel drops what is sent on the link
    and still counts it sent. The operational state alone does not tell: a virtio-net NIC
    just probed reads UNKNOWN (nothing has set it yet) while its carrier is still off, and the
    qdisc is attached only once linkwatch has seen the carrier come on. IPv6 waits for the
    same thing (addrconf_link_ready: up and no noop qdisc) before it marks the device
    IF_READY, which the link's IFLA_AF_SPEC shows; without IPv6 on the link, carrier and
    operational state are all there is to go by."""
    if not link["flags"] & IFF_LOWER_UP:
        return False
    if link.get("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
        return False
    inet6 = link.get_nested("IFLA_AF_SPEC", "AF_INET6")
    if inet6 is None or (inet6.get("IFLA_INET6_CONF") or {}).get("disable_ipv6"):
        return True
    return bool((inet6.get("IFLA_INET6_FLAGS") or 0) & IF_READY)


def _wait_link_ready(ipr: Any, index: int) -> None:
    """Until the link brought up can send (bounded: a link whose carrier does not come is
    configured anyway, with a warning). Addresses added before would also flicker: when the
    link becomes ready IPv6 starts duplicate address detection on them."""
    deadline = time.monotonic() + LINK_READY_WAIT_S
    while True:
        link = ipr.get_links(index)[0]
        if link_ready(link):
            return
        if time.monotonic() >= deadline:
            log.warning("interface %s is not ready to send after %gs (operstate %s, flags "
                        "%#x): configuring it anyway", link.get("IFLA_IFNAME"),
                        LINK_READY_WAIT_S, link.get("IFLA_OPERSTATE"), link["flags"])
            return
        time.sleep(0.02)


def _route_from_kernel(msg: Any, names: dict[int, str]) -> Route | None:
    if msg["type"] != RTN_UNICAST or msg.get("RTA_TABLE", msg["table"]) != RT_TABLE_MAIN:
        return None
    zero = "::" if msg["family"] == AF_INET6 else "0.0.0.0"
    dest = ipaddress.ip_network(f"{msg.get('RTA_DST') or zero}/{msg['dst_len']}")
    gateway, source = msg.get("RTA_GATEWAY"), msg.get("RTA_PREFSRC")
    return Route(dest, ipaddress.ip_address(gateway) if gateway else None,
                 names.get(msg.get("RTA_OIF") or 0, ""),
                 ipaddress.ip_address(source) if source else None, msg["scope"])


def _main_routes(ipr: Any) -> Iterator[Any]:
    for family in (AF_INET, AF_INET6):
        yield from ipr.get_routes(family=family, table=RT_TABLE_MAIN)


def list_routes() -> list[Route]:
    with _netlink() as ipr:
        return _list_routes(ipr)


def _list_routes(ipr: Any) -> list[Route]:
    names = {index: name for name, index in _index_by_name(_links(ipr)).items()}
    routes = (_route_from_kernel(msg, names) for msg in _main_routes(ipr))
    return [r for r in routes if r is not None]


def _route_key(route: Route, index: int) -> tuple[object, ...]:
    return (route.dest, route.gateway, index)


def _kernel_route_args(msg: Any, route: Route) -> dict[str, Any]:
    """Arguments naming a route the kernel listed, to delete it or to add it back."""
    args: dict[str, Any] = {
        "family": msg["family"], "table": RT_TABLE_MAIN, "scope": msg["scope"],
        "proto": msg["proto"], "tos": msg["tos"], "dst": str(route.dest.network_address),
        "dst_len": route.dest.prefixlen}
    if route.gateway is not None:
        args["gateway"] = str(route.gateway)
    if route.source is not None:
        args["prefsrc"] = str(route.source)
    if msg.get("RTA_OIF"):
        args["oif"] = msg.get("RTA_OIF")
    if msg.get("RTA_PRIORITY") is not None:
        args["priority"] = msg.get("RTA_PRIORITY")
    return args


def _request_route_args(route: Route, index: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": route.family, "table": RT_TABLE_MAIN, "proto": RTPROT_BOOT,
        "dst": str(route.dest.network_address), "dst_len": route.dest.prefixlen,
        "scope": route.scope}
    if route.gateway is not None:
        args["gateway"] = str(route.gateway)
    if index:
        args["oif"] = index
    if route.source is not None:
        args["prefsrc"] = str(route.source)
    return args


def _route_ignoring_errors(ipr: Any, command: str, args: dict[str, Any]) -> None:
    try:
        ipr.route(command, **args)
    except Exception as exc:
        if _netlink_error(exc) is None:
            raise


def update_routes(routes: tuple[Route, ...]) -> list[Route]:
    """Replace the routes; if the kernel refuses one, the routes there were come back."""
    with _netlink() as ipr:
        names = _index_by_name(_links(ipr))
        indexes = [_device_index(names, f"routes[{i}].device", r.device) if r.device else 0
                   for i, r in enumerate(routes)]
        lo = names.get("lo", 1)
        kernel_made = set()
        old: list[dict[str, Any]] = []
        for msg in _main_routes(ipr):
            route = _route_from_kernel(msg, {})
            if route is None or msg.get("RTA_OIF") == lo:
                continue
            if msg["proto"] == RTPROT_KERNEL:
                kernel_made.add(_route_key(route, msg.get("RTA_OIF") or 0))
            else:
                old.append(_kernel_route_args(msg, route))
        added: list[dict[str, Any]] = []
        try:
            for args in old:
                try:
                    ipr.route("del", **args)
                except Exception as exc:
                    if _netlink_error(exc) != errno.ESRCH:  # gone meanwhile: as good as deleted
                        with _kernel("routes", f"removing the route to {args['dst']}"):
                            raise
            # A gateway must be reachable when its route is added: directly attached routes
            # first.
            for i in sorted(range(len(routes)), key=lambda i: routes[i].gateway is not None):
                route, index = routes[i], indexes[i]
                kernels = _route_key(route, index) in kernel_made
                if kernels and route.source is None:
                    continue  # the kernel's own route for an address: already there
                via = f" via {route.gateway}" if route.gateway else ""
                dev = f" dev {route.device}" if route.device else ""
                with _kernel(f"routes[{i}]", f"{route.dest}{via}{dev}"):
                    ipr.route("replace", **_request_route_args(route, index))
                if not kernels:
                    added.append(_request_route_args(route, index))
        except BaseException:
            for args in reversed(added):
                _route_ignoring_errors(ipr, "del", args)
            for args in sorted(old, key=lambda args: "gateway" in args):
                _route_ignoring_errors(ipr, "replace", args)
            raise
        return _list_routes(ipr)


def add_neighbors(neighbors: tuple[Neighbor, ...]) -> None:
    with _netlink() as ipr:
        names = _index_by_name(_links(ipr))
        indexes = [_device_index(names, f"neighbors[{i}].device", n.device)
                   for i, n in enumerate(neighbors)]
        for i, (neighbor, index) in enumerate(zip(neighbors, indexes, strict=True)):
            with _kernel(f"neighbors[{i}]",
                         f"{neighbor.ip} lladdr {neighbor.ll_addr} dev {neighbor.device}"):
                ipr.neigh("replace", family=AF_INET if neighbor.ip.version == 4 else AF_INET6,
                          dst=str(neighbor.ip), lladdr=neighbor.ll_addr, ifindex=index,
                          state=neighbor.state, flags=neighbor.flags)
