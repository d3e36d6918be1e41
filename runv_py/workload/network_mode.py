"""The container's network, the one place hyperctl and the API decide it:

  none     a spec without a namespace path: the VM has loopback only (the default);
  default  a network namespace of the container's own on runv-py's CNI bridge network
           ([network] in config.toml; bridge + host-local + portmap), with -p ports published,
           isolated on the host from the other sandboxes and the host, its egress limited by
           its policy (runv_py/network/isolation.py, egress.py).

The namespace lives as long as the container's VM: attach() before the bundle is written (the
lease goes to the container's record directory, then the isolation is made), release() when
the VM is freed (isolation, CNI DEL, the namespace)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import NetworkError, NotSupported
from ..network import egress as egress_mod
from ..network import isolation, managed
from ..network.cni import BridgeNetwork, PortMapping
from ..network.egress import EgressPolicy

NETWORK_MODES = ("none", "default")
LEASE_FILE = "network.json"
OWNERS_DIR = "owners"  # under the CNI data dir: owner_file()


def check(mode: str, publish: tuple[str, ...]) -> tuple[PortMapping, ...]:
    """The port mappings; NotSupported/NetworkError naming a bad flag."""
    if mode not in NETWORK_MODES:
        raise NotSupported(f"--network {mode!r}: use none or default")
    ports = tuple(PortMapping.parse(text) for text in publish)
    if ports and mode == "none":
        raise NotSupported(f"-p {publish[0]}: --network none has no ports to publish "
                           "(use --network default)")
    return ports


def configure_network(spec: dict[str, Any], mode: str, publish: tuple[str, ...],
                      netns: str | None = None) -> None:
    """Fit the container's OCI spec: a new, empty network namespace, or `netns` (default)."""
    check(mode, publish)
    namespaces = spec["linux"].setdefault("namespaces", [])
    for ns in namespaces:
        if ns.get("type") == "network":
            ns.pop("path", None)
            if netns:
                ns["path"] = netns
            return
    namespaces.append({"type": "network", **({"path": netns} if netns else {})})


def policy(given: EgressPolicy | None, settings: config_mod.NetworkConfig) -> EgressPolicy:
    """The sandbox's egress policy: its own, else the config's `egress`."""
    return given if given is not None else egress_mod.parse(settings.egress,
                                                            "[network] egress")


def dns_servers(given: tuple[str, ...], settings: config_mod.NetworkConfig) -> tuple[str, ...]:
    """The sandbox's DNS servers: its own (--dns), else the config's `dns`."""
    return given or egress_mod.parse_servers(settings.dns, "[network] dns")


def resolv_conf(servers: tuple[str, ...]) -> str:
    return "".join(f"nameserver {server}\n" for server in servers)


def owner_file(settings: config_mod.NetworkConfig, sandbox_id: str) -> Path:
    """Says whose the network sandbox is (NetworkOwner) where any hyperctl, whatever its
    roots, finds it: the network's state is host-wide, its records are not (the reconciler
    reads it)."""
    return settings.cni_data_dir / OWNERS_DIR / sandbox_id


@dataclass(frozen=True, slots=True)
class NetworkOwner:
    record_dir: Path            # the workload's record
    sandbox_dir: Path | None    # where its supervisor owns its VM (vm_dir.py)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"record_dir": str(self.record_dir),
                                    "sandbox_dir": str(self.sandbox_dir or "")}))

    @classmethod
    def read(cls, path: Path) -> NetworkOwner | None:
        try:
            raw = json.loads(path.read_text())
            return cls(Path(raw["record_dir"]),
                       Path(raw["sandbox_dir"]) if raw["sandbox_dir"] else None)
        except (OSError, ValueError, KeyError, TypeError):
            return None


def sandbox_id(workload_id: str) -> str:
    return f"hc-{workload_id[:12]}"


async def attach(workload_id: str, mode: str, publish: tuple[str, ...], record_dir: Path,
                 settings: config_mod.NetworkConfig, *, egress: EgressPolicy | None = None,
                 dns: tuple[str, ...] = (), vm_dir: Path | None = None) -> str | None:
    """For --network default: the namespace path for the spec, its lease saved in
    record_dir, the sandbox isolated with its egress policy (host names resolved now). None
    for --network none. `vm_dir`: where the workload's supervisor will own its VM (recorded
    with the owner file)."""
    ports = check(mode, publish)
    if mode == "none":
        return None
    servers = dns_servers(dns, settings)
    wanted = await egress_mod.resolve(policy(egress, settings), servers)
    network = BridgeNetwork(name="runv", bridge=settings.bridge, subnet=settings.subnet,
                            data_dir=settings.cni_data_dir, ip_masq=settings.ip_masq,
                            default_route=wanted.mode != "none")
    owner = owner_file(settings, sandbox_id(workload_id))
    NetworkOwner(record_dir, vm_dir).write(owner)
    try:
        lease = await managed.attach(sandbox_id(workload_id), network, ports)
    except BaseException:
        owner.unlink(missing_ok=True)
        raise
    try:
        (record_dir / LEASE_FILE).write_text(lease.to_json())
        await isolation.apply(_port(lease), wanted, servers)
    except BaseException:
        await release(record_dir, lease)
        raise
    return lease.netns


def _port(lease: managed.Lease) -> isolation.SandboxPort:
    addresses = [a.partition("/")[0] for a in lease.addresses]
    v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
    if not (v4 and lease.host_interface and lease.mac):
        raise NetworkError(f"CNI gave sandbox {lease.sandbox_id} no IPv4 address, host "
                           "interface or MAC: it cannot be isolated")
    return isolation.SandboxPort(lease.sandbox_id, lease.network.bridge, lease.host_interface,
                                 lease.mac, v4[0], lease.network.subnet)


async def release(record_dir: Path, lease: managed.Lease | None = None) -> None:
    """Undo attach() (the isolation, CNI DEL, the namespace, the owner file); nothing to do
    without a lease. Idempotent."""
    path = record_dir / LEASE_FILE
    if lease is None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        lease = managed.Lease.from_json(text)
    try:
        await isolation.remove(lease.sandbox_id)
    finally:
        await managed.detach(lease)
    path.unlink(missing_ok=True)
    (lease.network.data_dir / OWNERS_DIR / lease.sandbox_id).unlink(missing_ok=True)
