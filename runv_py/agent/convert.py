"""hyperstart.v1 protobuf messages <-> runv-py's frozen dataclasses (protobuf stops here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._pb import hyperstart_pb2 as pb


@dataclass(frozen=True, slots=True)
class AgentVersion:
    agent_version: str
    api_version: int
    kernel_release: str
    python_version: str
    features: tuple[str, ...]
    boot_timings_ms: dict[str, int]


@dataclass(frozen=True, slots=True)
class GuestDetails:
    mem_total_kib: int
    mem_available_kib: int
    agent_rss_kib: int
    agent_rss_anon_kib: int
    agent_rss_file_kib: int
    online_cpus: int


def version(msg: pb.VersionResponse) -> AgentVersion:
    return AgentVersion(
        agent_version=msg.agent_version,
        api_version=msg.api_version,
        kernel_release=msg.kernel_release,
        python_version=msg.python_version,
        features=tuple(msg.features),
        boot_timings_ms=dict(msg.boot_timings_ms),
    )


def guest_details(msg: pb.GuestDetailsResponse) -> GuestDetails:
    return GuestDetails(
        mem_total_kib=msg.mem_total_kib,
        mem_available_kib=msg.mem_available_kib,
        agent_rss_kib=msg.agent_rss_kib,
        agent_rss_anon_kib=msg.agent_rss_anon_kib,
        agent_rss_file_kib=msg.agent_rss_file_kib,
        online_cpus=msg.online_cpus,
    )


@dataclass(frozen=True, slots=True)
class Storage:
    """A filesystem for the agent to mount before a container: a 9p/virtiofs tag, a block
    device by path or by virtio-blk serial, or an overlay (options lowerdir=, upperdir=,
    workdir=; the agent makes the last two)."""

    driver: Literal["9p", "virtiofs", "block", "virtio-blk", "overlay"]
    source: str
    mount_point: str
    fstype: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Output:
    stream: Literal["stdout", "stderr"]
    data: bytes
    eof: bool


def storage(s: Storage) -> pb.Storage:
    return pb.Storage(driver=s.driver, source=s.source, fstype=s.fstype, options=s.options,
                      mount_point=s.mount_point)


def output(msg: pb.StdioOutput) -> Output:
    return Output("stderr" if msg.stream == pb.StdioOutput.STDERR else "stdout", msg.data,
                  msg.eof)


@dataclass(frozen=True, slots=True)
class ProcessStarted:
    """An execve in a container as the guest reports it (unbounded: the guest's word)."""

    role: str
    ppid: int
    uid: int
    euid: int
    argv: tuple[str, ...]
    argv_truncated: bool
    complete: bool
    time_ns: int
    dropped: int
    comm: str


@dataclass(frozen=True, slots=True)
class Event:
    """A process exit (exit_code, 128+N for a signal), an OOM kill, or an execve (`process`)
    in a container."""

    kind: Literal["exit", "oom", "process"]
    container_id: str
    exec_id: str = ""
    exit_code: int = 0
    pid: int = 0
    process: ProcessStarted | None = None
    dropped: int = 0   # of an exit: process events the agent dropped before it


def event(msg: pb.Event) -> Event:
    kind = msg.WhichOneof("kind")
    if kind == "oom":
        return Event("oom", msg.oom.container_id)
    if kind == "process":
        p = msg.process
        return Event("process", p.container_id, p.exec_id, pid=p.pid, process=ProcessStarted(
            p.role, p.ppid, p.uid, p.euid, tuple(p.argv), p.argv_truncated, p.complete,
            p.time_ns, p.dropped, p.comm))
    e = msg.exit
    return Event("exit", e.container_id, e.exec_id, e.exit_code, e.pid, dropped=e.dropped)


IPFamily = Literal["", "ipv4", "ipv6"]  # "": taken from the address
_FAMILY_TO_PB = {"": pb.IP_FAMILY_UNSPECIFIED, "ipv4": pb.IPV4, "ipv6": pb.IPV6}
_FAMILY_FROM_PB: dict[int, IPFamily] = {v: k for k, v in _FAMILY_TO_PB.items()}  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class IPAddress:
    address: str
    prefix_len: int = 0
    family: IPFamily = ""


@dataclass(frozen=True, slots=True)
class Interface:
    """A guest network interface. In an update: found by hw_addr (else by name), renamed to
    name, given mtu (0 keeps it) and exactly these addresses."""

    name: str = ""
    hw_addr: str = ""
    mtu: int = 0
    ip_addresses: tuple[IPAddress, ...] = ()
    raw_flags: int = 0  # IFF_*, in answers
    type: str = ""  # the link kind ("veth"; "" for a device), in answers

    @property
    def up(self) -> bool:
        return bool(self.raw_flags & 1)


@dataclass(frozen=True, slots=True)
class Route:
    dest: str = "default"  # CIDR or address
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0  # RT_SCOPE_*: 0 universe, 253 link, 254 host
    family: IPFamily = ""


@dataclass(frozen=True, slots=True)
class ARPNeighbor:
    to_ip: str
    device: str
    ll_addr: str
    state: int = 0  # NUD_*; 0 is NUD_PERMANENT
    flags: int = 0  # NTF_*


def _ip_address_pb(a: IPAddress) -> pb.IPAddress:
    return pb.IPAddress(family=_FAMILY_TO_PB[a.family], address=a.address,
                        prefix_len=a.prefix_len)


def interface_pb(i: Interface) -> pb.Interface:
    return pb.Interface(name=i.name, hw_addr=i.hw_addr, mtu=i.mtu,
                        ip_addresses=[_ip_address_pb(a) for a in i.ip_addresses])


def interface(msg: pb.Interface) -> Interface:
    return Interface(
        name=msg.name, hw_addr=msg.hw_addr, mtu=msg.mtu, raw_flags=msg.raw_flags, type=msg.type,
        ip_addresses=tuple(IPAddress(a.address, a.prefix_len, _FAMILY_FROM_PB.get(a.family, ""))
                           for a in msg.ip_addresses))


def route_pb(r: Route) -> pb.Route:
    return pb.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source,
                    scope=r.scope, family=_FAMILY_TO_PB[r.family])


def route(msg: pb.Route) -> Route:
    return Route(dest=msg.dest, gateway=msg.gateway, device=msg.device, source=msg.source,
                 scope=msg.scope, family=_FAMILY_FROM_PB.get(msg.family, ""))


def neighbor_pb(n: ARPNeighbor) -> pb.ARPNeighbor:
    return pb.ARPNeighbor(to_ip=pb.IPAddress(address=n.to_ip), device=n.device,
                          ll_addr=n.ll_addr, state=n.state, flags=n.flags)
