"""Network state of dead sandboxes. hyperctl's `--network default` sandbox `hc-<id prefix>`
(workload/network_mode.py) has: a namespace `runv-hc-<id prefix>` in /run/netns, its
isolation tables `runv-hc-<id prefix>` (network/isolation.py), a host-local IPAM lease and
portmap's DNAT chain (both CNI's, keyed by that sandbox id), a MASQUERADE rule for its
published ports, and the lease file in its record directory. A sandbox in a namespace
someone else gave (runv under podman, the shim) leaves only tc redirects to its gone taps on
that namespace's interfaces (network/endpoint.py says how such a one is told apart from a
live sandbox's)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from .. import child
from ..errors import NetworkError
from ..network import attachment, isolation, managed
from ..network.cni import BridgeNetwork, Cni, PortMapping
from ..workload import network_mode
from ..workload.records import Records, Workload
from .model import HYPERCTL_SANDBOX_PREFIX, Found, Owners, Scope

SANDBOX_ID = re.compile(r"hc-[0-9a-f]{12}")
NETNS_PREFIX = "runv-"   # managed.attach: runv-<sandbox id>
TABLE = re.compile(rf"{re.escape(isolation.TABLE_PREFIX)}(hc-[0-9a-f]{{12}})")
PORTMAP_ID = re.compile(r'dnat name: \\?"([^"\\]+)\\?" id: \\?"(hc-[0-9a-f]{12})\\?"')
MASQUERADE = re.compile(r"runv-py published ports of (hc-[0-9a-f]{12})")
IPTABLES = ("iptables", "ip6tables")
# portmap's DEL does nothing without a port mapping; with one (any) it drops the sandbox's
# chain, which it finds by the sandbox id.
ANY_PORT = PortMapping(1, 1)


def _network(scope: Scope) -> BridgeNetwork:
    settings = scope.network
    return BridgeNetwork(name="runv", bridge=settings.bridge, subnet=settings.subnet,
                         data_dir=settings.cni_data_dir, ip_masq=settings.ip_masq)


async def _cni_delete(network: BridgeNetwork, sandbox_id: str, netns_dir: Path) -> None:
    netns = netns_dir / f"{NETNS_PREFIX}{sandbox_id}"
    await Cni(network.conflist()).delete(sandbox_id, str(netns) if netns.exists() else "",
                                         managed.IFNAME, (ANY_PORT,))


@dataclass(frozen=True, slots=True)
class StaleRedirect(Found):
    netns: Path
    interface: str

    kind = "tc-redirect"

    async def remove(self) -> None:
        attachment.sweep(str(self.netns), self.interface)


@dataclass(frozen=True, slots=True)
class Masquerade(Found):
    command: str
    rule: tuple[str, ...]     # as `iptables -S` prints it, without -A

    kind = "masquerade-rule"

    async def remove(self) -> None:
        await child.run([self.command, "-w", "-t", "nat", "-D", *self.rule], timeout_s=30)


@dataclass(frozen=True, slots=True)
class PortmapChain(Found):
    """Its sandbox's portmap chain, and the IPAM lease (one CNI DEL removes both)."""

    sandbox: str
    network: BridgeNetwork
    netns_dir: Path

    kind = "portmap-chain"

    async def remove(self) -> None:
        await _cni_delete(self.network, self.sandbox, self.netns_dir)


@dataclass(frozen=True, slots=True)
class IpamLease(PortmapChain):
    """`name`: the lease file."""

    kind = "ipam-lease"

    async def remove(self) -> None:
        if Path(self.name).exists():
            await _cni_delete(self.network, self.sandbox, self.netns_dir)


@dataclass(frozen=True, slots=True)
class IsolationTable(Found):
    sandbox: str

    kind = "nft-table"

    async def remove(self) -> None:
        await isolation.remove(self.sandbox)


@dataclass(frozen=True, slots=True)
class Namespace(Found):
    path: Path

    kind = "netns"

    async def remove(self) -> None:
        if self.path.exists():
            done = await child.run(["ip", "netns", "delete", self.path.name], timeout_s=30)
            if done.returncode != 0 and self.path.exists():
                raise NetworkError(f"ip netns delete {self.path.name}: "
                                   f"{done.stderr.decode(errors='replace').strip()}")


@dataclass(frozen=True, slots=True)
class WorkloadNetwork(Found):
    """The lease file of a workload whose container is dead: releasing it undoes whatever
    of its network the kinds above did not find (it runs after them)."""

    record_dir: Path

    kind = "network-lease"

    async def remove(self) -> None:
        await network_mode.release(self.record_dir)


# -- finders --------------------------------------------------------------------------------------

def _namespaces(scope: Scope) -> list[Path]:
    try:
        return sorted(p for p in scope.netns_dir.iterdir() if not p.is_dir())
    except FileNotFoundError:
        return []


async def find_redirects(scope: Scope, owners: Owners) -> list[StaleRedirect]:
    found = []
    for path in _namespaces(scope):
        try:
            found += [StaleRedirect(f"{name} in {path}", "a sandbox whose tap is gone", path,
                                    name) for name in attachment.stale(str(path))]
        except (NetworkError, OSError):
            continue  # a namespace file that is not one (or went meanwhile)
    return found


async def _nat_rules(command: str) -> list[str]:
    try:
        done = await child.run([command, "-w", "-t", "nat", "-S"], timeout_s=30)
    except FileNotFoundError:
        return []
    return done.stdout.decode(errors="replace").splitlines() if done.returncode == 0 else []


async def find_masquerades(scope: Scope, owners: Owners) -> list[Masquerade]:
    found = []
    for command in IPTABLES:
        for line in await _nat_rules(command):
            match = MASQUERADE.search(line)
            if match and line.startswith("-A ") and owners.hyperctl_sandbox_dead(match[1]):
                found.append(Masquerade(f"{command} -t nat POSTROUTING (published ports)",
                                        match[1], command, tuple(shlex.split(line)[1:])))
    return found


async def find_portmaps(scope: Scope, owners: Owners) -> list[PortmapChain]:
    network = _network(scope)
    found = []
    for command in IPTABLES:
        seen = set()
        for line in await _nat_rules(command):
            match = PORTMAP_ID.search(line)
            if match and match[1] == network.name and match[2] not in seen:
                seen.add(match[2])
                if owners.hyperctl_sandbox_dead(match[2]):
                    found.append(PortmapChain(f"{command} -t nat: CNI-DN chain of {match[2]}",
                                              match[2], match[2], network, scope.netns_dir))
    return found


async def find_leases(scope: Scope, owners: Owners) -> list[IpamLease]:
    network = _network(scope)
    directory = network.data_dir / network.name   # host-local: <dataDir>/<network>/<ip>
    found = []
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        try:
            sandbox = path.read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        if SANDBOX_ID.fullmatch(sandbox) and owners.hyperctl_sandbox_dead(sandbox):
            found.append(IpamLease(str(path), sandbox, sandbox, network, scope.netns_dir))
    return found


async def find_tables(scope: Scope, owners: Owners) -> list[IsolationTable]:
    try:
        done = await child.run([isolation.NFT, "-j", "list", "tables"], timeout_s=30)
    except FileNotFoundError:
        return []
    try:
        items = json.loads(done.stdout or b"{}").get("nftables", [])
    except ValueError:
        return []
    found = []
    for item in items:
        table = item.get("table") if isinstance(item, dict) else None
        if not isinstance(table, dict):
            continue
        match = TABLE.fullmatch(str(table.get("name", "")))
        if match and owners.hyperctl_sandbox_dead(match[1]):
            found.append(IsolationTable(f"{table.get('family')} {match[0]}", match[1],
                                        match[1]))
    return found


async def find_namespaces(scope: Scope, owners: Owners) -> list[Namespace]:
    found = []
    for path in _namespaces(scope):
        sandbox = path.name.removeprefix(NETNS_PREFIX)
        if path.name.startswith(NETNS_PREFIX + HYPERCTL_SANDBOX_PREFIX) and \
                SANDBOX_ID.fullmatch(sandbox) and owners.hyperctl_sandbox_dead(sandbox):
            found.append(Namespace(str(path), sandbox, path))
    return found


def _sandbox_of(workload: Workload) -> str:
    return network_mode.sandbox_id(workload.id)


async def find_workload_networks(scope: Scope, owners: Owners) -> list[WorkloadNetwork]:
    found = []
    records: Records
    for records, workload in owners.workloads():
        directory = records.dir(workload.id)
        if (directory / network_mode.LEASE_FILE).exists() and \
                owners.hyperctl_sandbox_dead(_sandbox_of(workload)):
            found.append(WorkloadNetwork(str(directory / network_mode.LEASE_FILE),
                                         f"workload {workload.id} (exited)", directory))
    return found
