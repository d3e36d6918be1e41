"""A network namespace runv-py makes for a sandbox of its own (hyperctl, the Python API),
attached to a CNI bridge network, instead of one a container manager hands over. The lease
records what detach() needs to undo it (the CNI configuration, the published ports) and
travels as JSON in the caller's records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import child
from ..errors import NetworkError
from .cni import BridgeNetwork, Cni, PortMapping

NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps them
# No masquerade and no default route (see BridgeNetwork): a sandbox reaches the host, the
# other sandboxes of the bridge and its published ports, nothing beyond; connections to its
# published ports reach it with the bridge's address as their source (_masquerade_rule).
DEFAULT_NETWORK = BridgeNetwork(name="runv", bridge="runv0", subnet="10.89.0.0/16",
                                data_dir=Path("/var/lib/runv/cni"))
IFNAME = "eth0"


@dataclass(frozen=True, slots=True)
class Lease:
    sandbox_id: str
    netns: str
    network: BridgeNetwork
    ports: tuple[PortMapping, ...] = ()
    addresses: tuple[str, ...] = ()  # CIDRs CNI gave the sandbox
    host_interface: str = ""  # the host end of its veth, on the bridge
    mac: str = ""             # its interface's, in the namespace

    def to_json(self) -> str:
        raw = asdict(self)
        raw["network"]["data_dir"] = str(self.network.data_dir)
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> Lease:
        try:
            raw: dict[str, Any] = json.loads(text)
            network = dict(raw["network"], data_dir=Path(raw["network"]["data_dir"]))
            return cls(raw["sandbox_id"], raw["netns"], BridgeNetwork(**network),
                       tuple(PortMapping(**p) for p in raw["ports"]),
                       tuple(raw["addresses"]), str(raw.get("host_interface", "")),
                       str(raw.get("mac", "")))
        except (ValueError, KeyError, TypeError) as exc:
            raise NetworkError(f"network lease: not readable: {exc}") from exc


async def _ip_netns(*args: str) -> None:
    done = await child.run(["ip", "netns", *args], timeout_s=30)
    if done.returncode != 0:
        raise NetworkError(f"ip netns {' '.join(args)}: "
                           f"{done.stderr.decode(errors='replace').strip()}")


def _masquerade_rule(lease: Lease, address: str) -> tuple[str, list[str]]:
    """(the iptables command, the rule): connections to the sandbox's published ports that
    portmap DNATed from anywhere but the bridge (the host's own addresses, another machine)
    leave towards the sandbox with the bridge's address as their source. The sandbox has no
    default route, so it could not answer them otherwise; portmap's own snat covers
    127.0.0.1."""
    ip = address.split("/", 1)[0]
    command = "ip6tables" if ":" in ip else "iptables"
    return command, ["POSTROUTING", "-d", ip, "-o", lease.network.bridge, "-m", "conntrack",
                     "--ctstate", "DNAT", "-m", "comment", "--comment",
                     f"runv-py published ports of {lease.sandbox_id}", "-j", "MASQUERADE"]


async def _iptables(command: str, action: str, rule: list[str]) -> bool:
    done = await child.run([command, "-w", "-t", "nat", action, *rule], timeout_s=30)
    if action != "-C" and done.returncode != 0:
        raise NetworkError(f"{command} {action} {' '.join(rule)}: "
                           f"{done.stderr.decode(errors='replace').strip()}")
    return done.returncode == 0


async def _publish_to_all(lease: Lease) -> None:
    for address in lease.addresses if lease.ports else ():
        command, rule = _masquerade_rule(lease, address)
        if not await _iptables(command, "-C", rule):
            await _iptables(command, "-A", rule)


async def _unpublish(lease: Lease) -> None:
    for address in lease.addresses if lease.ports else ():
        command, rule = _masquerade_rule(lease, address)
        while await _iptables(command, "-C", rule):
            await _iptables(command, "-D", rule)


async def attach(sandbox_id: str, network: BridgeNetwork = DEFAULT_NETWORK,
                 ports: tuple[PortMapping, ...] = ()) -> Lease:
    """A new network namespace for the sandbox, with an interface on `network` and `ports`
    published. Nothing stays behind on failure."""
    name = f"runv-{sandbox_id}"
    await _ip_netns("add", name)
    netns = str(NETNS_DIR / name)
    try:
        await _ip_netns("exec", name, "ip", "link", "set", "lo", "up")
        result = await Cni(network.conflist()).add(sandbox_id, netns, IFNAME, ports)
    except BaseException:
        await _ip_netns("delete", name)
        raise
    addresses = tuple(str(ip.get("address", "")) for ip in result.get("ips", []))
    interfaces = [i for i in result.get("interfaces", []) if isinstance(i, dict)]
    host = next((i for i in interfaces if not i.get("sandbox") and i.get("name") !=
                 network.bridge), {})
    own = next((i for i in interfaces if i.get("sandbox")), {})
    lease = Lease(sandbox_id, netns, network, ports, addresses, str(host.get("name", "")),
                  str(own.get("mac", "")))
    try:
        await _publish_to_all(lease)
    except BaseException:
        await detach(lease)
        raise
    return lease


async def detach(lease: Lease) -> None:
    """Undo attach(): CNI DEL (addresses and port mappings released), then the namespace.
    Idempotent."""
    try:
        await _unpublish(lease)
        await Cni(lease.network.conflist()).delete(lease.sandbox_id, lease.netns, IFNAME,
                                                   lease.ports)
    finally:
        if Path(lease.netns).exists():
            await _ip_netns("delete", Path(lease.netns).name)
